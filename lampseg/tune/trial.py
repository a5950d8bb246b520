"""One Ray Tune trial: ``lampseg.engine.train.run`` with the trial's hyperparameters, in its own directory.

The trial's directory is its lampseg run directory (``metrics.csv``, ``summary.json``, ``checkpoints/``,
``tb/`` next to Ray's ``result.json``). Every epoch, once ``run`` has written ``latest.pt``, the trial reports
the epoch's metrics to Tune with that checkpoint, so ASHA can stop it, PBT can copy it into another trial,
and a failed trial restarts from it (``tune.max_failures``): ``tune.get_checkpoint()`` is copied back to
``checkpoints/latest.pt`` and ``run`` resumes from it as after any relaunch.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lampseg.commands.evaluate import evaluate_checkpoint
from lampseg.config import restore
from lampseg.engine.train import run
from lampseg.io import atomic_write
from lampseg.tune.space import apply_params


def trial_dirname(trial_id: str) -> str:
    """A trial's directory name inside ``run_dir/tune``."""
    return f"trial_{trial_id}"


def trial_config(base: dict, params: dict[str, Any], run_dir: str | Path, resume: str = "never"
                 ) -> DictConfig:
    """The config one trial trains with (checked, read-only): the study's base config, the trial's values,
    its own run dir and ``trainer.resume``."""
    own = {"run_dir": str(run_dir), "trainer.resume": resume}
    return apply_params(restore(base, check=False), {**params, **own})


class TrialLog:
    """A trial's output: appended to its ``log.txt`` (the console shows it only with ``tune.verbose=2``)
    and printed (Ray forwards it to the driver then)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        with open(self.path, "a") as f:  # appended and closed per line: a killed trial keeps its lines
            f.write(line + "\n")


class _Reporter:
    """Reports every epoch to Tune; epochs without validation repeat the last validated metrics (Tune
    needs the study's metric in every result), with ``validated`` saying which epochs measured them."""

    def __init__(self) -> None:
        self.last_val: dict[str, float] = {}

    def __call__(self, row: dict, checkpoint: Path) -> None:
        from ray import tune  # lazy: Ray/Optuna take seconds to import

        validated = not math.isnan(row.get("val_dice", math.nan))
        if validated:
            self.last_val = {k: v for k, v in row.items() if k.startswith("val_")}
        metrics = {**row, **self.last_val, "validated": validated}
        with tempfile.TemporaryDirectory(prefix="lampseg-ckpt-") as folder:
            target = Path(folder) / "latest.pt"
            try:
                os.link(checkpoint, target)  # same file system: no copy; Tune copies it into the trial dir
            except OSError:
                shutil.copy2(checkpoint, target)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def train_trial(params: dict[str, Any], base: dict, held_out: str | None = None) -> None:
    """The Tune trainable: train one configuration (``params``: dotted config keys -> values).

    Args:
        params: this trial's values for the ``tune.space`` keys (chosen by Tune's search algorithm, or
            changed by PBT when it exploits another trial).
        base: the study's resolved config (``to_container``) with absolute paths.
        held_out: after training, evaluate this checkpoint (``final`` or ``best``) on the validation fold
            and write ``eval.json`` (per-case Dice) in the trial's directory (leave-one-out studies).
    """
    from ray import tune  # lazy: see _Reporter

    # The trial's directory in the study (not Ray's staging copy), so metrics.csv and progress.png are live.
    run_dir = Path(base["run_dir"]) / "tune" / trial_dirname(tune.get_context().get_trial_id())
    restored = tune.get_checkpoint()
    if restored is not None:  # a retry after a failure, a resumed study, or PBT's copy of another trial
        with restored.as_directory() as folder:
            source = Path(folder) / "latest.pt"
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            with open(source, "rb") as f:
                atomic_write(run_dir / "checkpoints" / "latest.pt", lambda out: shutil.copyfileobj(f, out))
    # without a reported checkpoint: start over, even if an earlier attempt left a latest.pt behind
    cfg = trial_config(base, params, run_dir, "auto" if restored is not None else "never")
    log = TrialLog(run_dir / "log.txt")
    summary = run(cfg, reporter=_Reporter(), log=log)
    if held_out is not None and summary["status"] == "completed":
        evaluate_checkpoint(run_dir / "checkpoints" / f"{held_out}.pt", run_dir, "val", log=log)
