"""What a study prints while it runs: one line per trial event and a study progress line (``tune.verbose``).

    [ 3/10] started   without T2star, fold 1
    [ 3/10] epoch 10/15 val Dice 0.9312   without T2star, fold 1
    [ 3/10] finished  without T2star, fold 1: best val Dice 0.9312 (epoch 10), held-out Dice 0.9107, 41 s
    study: 4/10 finished, 2 running, 4 pending; best val Dice 0.9500 (all modalities, fold 0); ETA 3 min

At ``tune.verbose=1`` (the default) these lines are all the console shows of the trials: Ray's own tables and
the trials' output stay off (each trial's lines are in its ``log.txt``). ``tune.verbose=2`` adds Ray's
tables and every trial's output; ``tune.verbose=0`` keeps the progress lines and errors only.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray.tune import Callback

FINISHED, FAILED, RUNNING = "TERMINATED", "ERROR", "RUNNING"


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (list, tuple)):
        return "+".join(str(v) for v in value)
    return str(value)


class ParamNames:
    """Names a trial by its parameters, each key by its last part when that is unambiguous
    (``lr=0.001 norm=batch``)."""

    def __call__(self, params: dict[str, Any]) -> str:
        last = [key.rsplit(".", 1)[-1] for key in params]
        return " ".join(f"{short if last.count(short) == 1 else key}={_value(value)}"
                        for (key, value), short in zip(params.items(), last)) or "(no parameters)"


def duration(seconds: float) -> str:
    """``41 s``, ``3 min``, ``2.5 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def first_line_of_error(text: str | None) -> str:
    """The exception line of a traceback (its last non-empty line), shortened to one console line."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    line = lines[-1] if lines else "unknown error"
    return line if len(line) <= 200 else line[:197] + "..."


class StudyConsole(Callback):
    """Ray Tune callback printing the study's trial events (see the module docstring).

    Args:
        total: the number of trials the study will run.
        metric: the study's metric (``tune.metric``); its value is read only from validated epochs.
        mode: ``max`` or ``min``.
        max_epochs: each trial's ``trainer.max_epochs`` (a trial's own value when the space sets it).
        describe: names a trial from its parameters (picklable: Tune saves it with the study);
            default ``ParamNames``.
        verbose: ``tune.verbose``.
        log: where lines go.
    """

    def __init__(self, total: int, metric: str, mode: str, max_epochs: int,
                 describe: Callable[[dict], str] | None = None, verbose: int = 1,
                 log: Callable[[str], None] = print):
        self.total, self.metric, self.mode, self.max_epochs = total, metric, mode, max_epochs
        self.describe, self.verbose, self.log = describe or ParamNames(), verbose, log
        self.setup()

    def setup(self, *args, **info) -> None:  # also on a resumed study: its clock and bests start here
        self.started = time.monotonic()
        self.finished_here = 0
        self.trial_started: dict[str, float] = {}
        self.best: dict[str, tuple[float, int]] = {}  # trial id -> (metric, epoch)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        # the caller's function need not pickle; a resumed study (Tuner.restore takes no callbacks) prints
        state["log"] = print
        return state

    # ---------------------------------------------------------------------------------------- naming
    def number(self, trial) -> str:
        tail = trial.trial_id.rsplit("_", 1)[-1]
        index = int(tail) + 1 if tail.isdigit() else "?"
        return f"[{index:>{len(str(self.total))}}/{self.total}]"

    def name(self, trial) -> str:
        return self.describe(dict(trial.config))

    def _better(self, a: float, b: float) -> bool:
        return a > b if self.mode == "max" else a < b

    def best_of(self, trial) -> tuple[float, int] | None:
        if trial.trial_id in self.best:
            return self.best[trial.trial_id]
        last = trial.last_result or {}  # a trial finished before this process (a resumed study)
        value = last.get(self.metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value), int(last.get("epoch", 0))
        return None

    # ------------------------------------------------------------------------------------------ hooks
    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self.trial_started[trial.trial_id] = time.monotonic()
        if self.verbose >= 1:
            self.log(f"{self.number(trial)} started   {self.name(trial)}")

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        value = result.get(self.metric)
        if not result.get("validated", True) or not isinstance(value, (int, float)) or math.isnan(value):
            return
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        best = self.best.get(trial.trial_id)
        if best is None or self._better(value, best[0]):
            self.best[trial.trial_id] = (float(value), epoch)
        if self.verbose >= 1:
            max_epochs = trial.config.get("trainer.max_epochs", self.max_epochs)
            self.log(f"{self.number(trial)} epoch {epoch}/{max_epochs} {self.label} {value:.4f}   "
                     f"{self.name(trial)}")

    @property
    def label(self) -> str:
        return "val Dice" if self.metric == "val_dice" else self.metric

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self.finished_here += 1
        now = time.monotonic()
        best = self.best_of(trial)
        parts = [f"best {self.label} {best[0]:.4f} (epoch {best[1]})" if best else f"no {self.label}"]
        held_out = Path(trial.path or "") / "eval.json"
        if trial.path and held_out.is_file():  # lampseg loo: the held-out evaluation of the trial
            parts.append(f"held-out Dice {json.loads(held_out.read_text())['mean']['dice']:.4f}")
        if trial.trial_id in self.trial_started:
            parts.append(duration(now - self.trial_started[trial.trial_id]))
        if self.verbose >= 1:  # verbose 0: the study line and failures only
            self.log(f"{self.number(trial)} finished  {self.name(trial)}: {', '.join(parts)}")
        self.progress(trials, trial, FINISHED, now)

    def on_trial_recover(self, iteration: int, trials: list, trial, **info) -> None:
        self.log(f"{self.number(trial)} failed    {self.name(trial)}: {self.error(trial)}; retrying from "
                 "its last checkpoint")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        log = Path(trial.path) / "log.txt" if trial.path else None
        self.log(f"{self.number(trial)} FAILED    {self.name(trial)}: {self.error(trial)}"
                 + (f" (its output: {log})" if log else ""))
        self.progress(trials, trial, FAILED, time.monotonic())

    @staticmethod
    def error(trial) -> str:
        path = trial.error_file
        return first_line_of_error(Path(path).read_text() if path and Path(path).is_file() else None)

    # --------------------------------------------------------------------------------------- progress
    def progress(self, trials: list, ended, status: str, now: float) -> None:
        """The study line: trials finished/failed/running/pending, the best so far and an ETA.

        Args:
            trials: the study's trials.
            ended: the trial that just ended (Tune calls the hook before it changes its status).
            status: its new status.
            now: ``time.monotonic()`` at the event.
        """
        status = [status if t is ended else t.status for t in trials]
        finished, failed, running = status.count(FINISHED), status.count(FAILED), status.count(RUNNING)
        pending = max(self.total - finished - failed - running, 0)
        line = f"study: {finished}/{self.total} finished, " + (f"{failed} failed, " if failed else "") + \
            f"{running} running, {pending} pending"
        scored = [(b, t) for t in trials if (b := self.best_of(t)) is not None]
        if scored:
            (value, _), trial = (max if self.mode == "max" else min)(scored, key=lambda s: s[0][0])
            line += f"; best {self.label} {value:.4f} ({self.name(trial)})"
        left = self.total - finished - failed
        if left and self.finished_here:  # trials finished in this process set the pace
            line += f"; ETA {duration((now - self.started) / self.finished_here * left)}"
        self.log(line)
