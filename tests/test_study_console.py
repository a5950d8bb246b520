"""The study console (``lampseg.tune.console``) on stand-in trials: names, progress counts, best, ETA."""
from __future__ import annotations

import pickle
from types import SimpleNamespace

from lampseg.engine.metrics import metric_key
from lampseg.tune.console import ParamNames, StudyConsole, duration, first_line_of_error
from lampseg.tune.loo import ConditionNames


def _trial(index: int, params: dict, status: str = "PENDING", path: str | None = None, last=None):
    return SimpleNamespace(trial_id=f"ab12c_{index:05d}", config=params, status=status, path=path,
                           error_file=None, last_result=last or {})


def test_metric_keys_have_one_spelling_for_every_logger():
    assert metric_key("non-enhancing tumor") == "non-enhancing_tumor"
    assert metric_key("outer lesion zone (mm)/x") == "outer_lesion_zone__mm__x"
    assert metric_key("WT") == "WT" and metric_key("val_dice_enhancing tumour") == "val_dice_enhancing_tumour"


def test_trial_names():
    assert ParamNames()({"optim.lr": 0.0012345, "model.norm": "batch"}) == "lr=0.00123 norm=batch"
    # a last part shared by two keys keeps its whole key
    assert ParamNames()({"optim.lr": 0.1, "sched.lr": 0.2}) == "optim.lr=0.1 sched.lr=0.2"
    assert ParamNames()({"data.modalities": ["A", "B"]}) == "modalities=A+B"
    names = ConditionNames({"none": ["FLAIR", "T2star", "PD"], "T2star": ["FLAIR", "PD"]})
    assert names({"data.modalities": ["flair", "t2star", "pd"], "data.fold": 0}) == "all modalities, fold 0"
    assert names({"data.modalities": ["FLAIR", "PD"], "data.fold": 3}) == "without T2star, fold 3"


def test_durations_and_errors_fit_one_line():
    assert [duration(s) for s in (4.2, 200, 9000)] == ["4 s", "3 min", "2.5 h"]
    trace = "Traceback (most recent call last):\n  File 'x.py'\nRuntimeError: boom\n\n"
    assert first_line_of_error(trace) == "RuntimeError: boom" and first_line_of_error(None) == "unknown error"
    assert len(first_line_of_error("E" * 500)) == 200


def test_console_counts_trials_keeps_the_best_and_estimates_the_rest(monkeypatch, tmp_path):
    clock = iter([0.0, 10.0, 20.0, 30.0, 40.0])
    monkeypatch.setattr("lampseg.tune.console.time.monotonic", lambda: next(clock))
    lines: list[str] = []
    console = StudyConsole(4, "val_dice", "max", 5, verbose=1, log=lines.append)  # clock 0
    trials = [_trial(k, {"optim.lr": lr}) for k, lr in enumerate((0.1, 0.01, 0.001, 0.0001))]
    trials[0].status = trials[1].status = "RUNNING"
    console.on_trial_start(0, trials, trials[0])  # clock 10
    assert lines[-1] == "[1/4] started   lr=0.1"
    console.on_trial_result(0, trials, trials[0], {"epoch": 1, "val_dice": 0.5, "validated": True})
    console.on_trial_result(0, trials, trials[0], {"epoch": 2, "val_dice": 0.5, "validated": False})
    console.on_trial_result(0, trials, trials[0], {"epoch": 3, "val_dice": 0.7, "validated": True})
    console.on_trial_result(0, trials, trials[0], {"epoch": 4, "val_dice": 0.6, "validated": True})
    assert lines[1:] == [f"[1/4] epoch {e}/5 val Dice {d}   lr=0.1"  # an unvalidated epoch says nothing
                         for e, d in ((1, "0.5000"), (3, "0.7000"), (4, "0.6000"))]
    (tmp_path / "eval.json").write_text('{"mean": {"dice": 0.65}}')
    trials[0].path = str(tmp_path)
    console.on_trial_complete(0, trials, trials[0])  # clock 20: 10 s after its start
    assert lines[-2] == "[1/4] finished  lr=0.1: best val Dice 0.7000 (epoch 3), held-out Dice 0.6500, 10 s"
    # 1 of 4 finished 20 s after the start: 3 left at that pace is 60 s
    assert lines[-1] == ("study: 1/4 finished, 1 running, 2 pending; best val Dice 0.7000 (lr=0.1); "
                         "ETA 60 s")
    trials[0].status = "TERMINATED"
    console.on_trial_error(0, trials, trials[1])  # clock 30: 1 finished here in 30 s, 2 left
    assert lines[-2].startswith("[2/4] FAILED    lr=0.01: unknown error")
    assert lines[-1] == ("study: 1/4 finished, 1 failed, 0 running, 2 pending; best val Dice 0.7000 "
                         "(lr=0.1); ETA 60 s")


def test_console_of_a_resumed_study_reads_finished_trials_and_pickles(monkeypatch):
    lines: list[str] = []
    console = StudyConsole(2, "train_loss", "min", 3, log=lines.append)
    done = _trial(0, {"optim.lr": 0.1}, "TERMINATED", last={"train_loss": 0.25, "epoch": 3})
    other = _trial(1, {"optim.lr": 0.2}, "RUNNING")
    console.on_trial_result(0, [done, other], other, {"epoch": 1, "train_loss": 0.5})
    console.on_trial_complete(0, [done, other], other)
    assert lines[-1] == "study: 2/2 finished, 0 running, 0 pending; best train_loss 0.2500 (lr=0.1)"
    restored = pickle.loads(pickle.dumps(console))  # Tune saves its callbacks with the study
    assert restored.total == 2 and restored.log is print and restored.best
    restored.setup()  # Tune calls it when the resumed study starts: its clock and bests start there
    assert restored.best == {} and restored.finished_here == 0


def test_verbose_zero_keeps_the_study_line_and_failures_only():
    lines: list[str] = []
    console = StudyConsole(2, "val_dice", "max", 3, verbose=0, log=lines.append)
    trials = [_trial(0, {"optim.lr": 0.1}, "RUNNING"), _trial(1, {"optim.lr": 0.2}, "RUNNING")]
    console.on_trial_start(0, trials, trials[0])
    console.on_trial_result(0, trials, trials[0], {"epoch": 1, "val_dice": 0.5, "validated": True})
    console.on_trial_complete(0, trials, trials[0])
    console.on_trial_error(0, trials, trials[1])
    assert [line.split()[0] for line in lines] == ["study:", "[2/2]", "study:"], lines
    assert "FAILED" in lines[1]
