"""Resuming is equivalent to not stopping (in-process ``lampseg.engine.train.run``)."""
from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose, lampseg, train_here
from omegaconf import OmegaConf

from lampseg.engine.checkpoint import save_checkpoint
from lampseg.engine.train import run
from lampseg.runtime.device import rng_state, set_rng_state

# trainer.num_threads=1: on 2 shared cores a second intra-op thread only adds stalls to these tiny steps.
DETERMINISTIC = ["+exp=smoke", "trainer.precision=fp32", "trainer.deterministic=true", "trainer.max_epochs=4",
                 "trainer.val_every=2", "trainer.hd95=false", "trainer.num_threads=1"]


def _train(run_dir: Path, *overrides: str) -> tuple[dict, list[str]]:
    lines: list[str] = []
    return train_here(run_dir, *overrides, log=lines.append), lines


def _rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_resume_equals_uninterrupted(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    summary_a, _ = _train(a, *DETERMINISTIC)
    assert summary_a["status"] == "completed" and summary_a["epochs"] == 4

    summary_b, _ = _train(b, *DETERMINISTIC, "trainer.stop_after_epochs=2")
    assert summary_b["status"] == "running" and summary_b["epochs"] == 2
    assert json.loads((b / "summary.json").read_text())["status"] == "running"
    assert _load(b / "checkpoints" / "latest.pt")["epoch"] == 2
    assert not (b / "checkpoints" / "final.pt").exists()

    summary_b, lines = _train(b, *DETERMINISTIC)  # trainer.resume=auto
    assert any(line.startswith("resumed from") for line in lines), lines
    assert summary_b["status"] == "completed" and summary_b["epochs"] == 4

    final_a, final_b = _load(a / "checkpoints" / "final.pt"), _load(b / "checkpoints" / "final.pt")
    assert final_a["model"].keys() == final_b["model"].keys()
    for name, tensor in final_a["model"].items():
        other = final_b["model"][name]
        assert torch.equal(tensor, other) or torch.allclose(tensor, other, rtol=0, atol=1e-6), name
    rows_a, rows_b = _rows(a), _rows(b)
    assert [r["epoch"] for r in rows_b] == ["1", "2", "3", "4"]
    for ra, rb in zip(rows_a, rows_b):
        assert float(ra["train_loss"]) == pytest.approx(float(rb["train_loss"]), rel=1e-6, abs=1e-7)
        if ra["val_dice"] or rb["val_dice"]:  # validated epochs only (empty = not validated)
            assert float(ra["val_dice"]) == pytest.approx(float(rb["val_dice"]), abs=1e-6)
        assert ra["step"] == rb["step"] and ra["lr"] == rb["lr"]
    assert summary_a["best_epoch"] == summary_b["best_epoch"]
    assert summary_a["best_val_dice"] == pytest.approx(summary_b["best_val_dice"])


def test_resume_auto_and_never(tmp_path):
    short = ["+exp=smoke", "trainer.max_epochs=1", "data.samples_per_epoch=2", "trainer.hd95=false",
             "trainer.num_threads=1"]
    first, lines = _train(tmp_path, *short)
    assert first["status"] == "completed"
    assert any(line.startswith("epoch 1/1") for line in lines)

    again, lines = _train(tmp_path, *short)  # auto: finds latest.pt at epoch 1, nothing left to do
    assert any(line.startswith("resumed from") for line in lines)
    assert not any(line.startswith("epoch 1/1") for line in lines)
    assert again["status"] == "completed" and len(_rows(tmp_path)) == 1

    fresh, lines = _train(tmp_path, *short, "trainer.resume=never")  # starts over
    assert not any(line.startswith("resumed from") for line in lines)
    assert any(line.startswith("epoch 1/1") for line in lines)
    assert fresh["status"] == "completed" and len(_rows(tmp_path)) == 1

    ckpt = _load(tmp_path / "checkpoints" / "latest.pt")  # weights_only=True: plain data only
    assert {"model", "optimizer", "epoch"} <= set(ckpt)
    assert ckpt["epoch"] == 1
    assert all(isinstance(v, torch.Tensor) for v in ckpt["model"].values())


def test_rng_state_round_trip(tmp_path):
    np.random.seed(0)
    np.random.random(5)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's legacy state
    save_checkpoint(tmp_path / "rng.pt", {"model": {}, "rng": rng_state()})
    state = _load(tmp_path / "rng.pt")["rng"]
    first = (np.random.random(3).tolist(), np.random.standard_normal(), random.random(), torch.rand(2))
    set_rng_state(state)
    again = (np.random.random(3).tolist(), np.random.standard_normal(), random.random(), torch.rand(2))
    assert first[:3] == again[:3]
    assert torch.equal(first[3], again[3])


def test_reporter_and_resume_from_path(tmp_path):
    """``run(cfg, reporter)`` reports every epoch with its checkpoint; ``trainer.resume=PATH`` continues."""
    short = ["+exp=smoke", "trainer.max_epochs=2", "data.samples_per_epoch=2", "trainer.hd95=false",
             "trainer.num_threads=1"]
    reports: list[dict] = []
    cfg = compose(*short)
    OmegaConf.update(cfg, "run_dir", str(tmp_path / "a"), merge=False)
    checkpoints: list[Path] = []
    run(cfg, reporter=lambda row, ckpt: (reports.append(row), checkpoints.append(ckpt)), log=lambda _: None)
    assert [r["epoch"] for r in reports] == [1, 2]
    assert checkpoints == [tmp_path / "a" / "checkpoints" / "latest.pt"] * 2
    assert all(0.0 <= r["val_dice"] <= 1.0 and "val_dice_edema" in r for r in reports)

    latest = tmp_path / "a" / "checkpoints" / "latest.pt"
    summary, lines = _train(tmp_path / "b", *short, "trainer.max_epochs=3", f"trainer.resume={latest}")
    assert any(line == f"resumed from {latest} at epoch 2" for line in lines), lines
    assert summary["epochs"] == 3 and [r["epoch"] for r in _rows(tmp_path / "b")] == ["1", "2", "3"]


def _kill_when(cmd: list[str], run_dir: Path, rows: int, delay_s: float) -> None:
    """Start ``cmd`` and SIGKILL it ``delay_s`` seconds after ``metrics.csv`` has ``rows`` rows."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if (run_dir / "metrics.csv").is_file() and len(_rows(run_dir)) >= rows:
                break
            time.sleep(0.02)
        time.sleep(delay_s)
        assert proc.poll() is None, "training ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)


@pytest.mark.extended
def test_sigkill_twice_then_same_command_matches_uninterrupted(tmp_path):
    """A training process killed with SIGKILL at a random moment, twice (the second time while resuming),
    resumes with the same command and ends where an uninterrupted run ends (deterministic fp32 CPU
    config): nothing is lost or half-written, whatever the kill interrupted (a step, validation, a
    checkpoint write)."""
    rng = random.Random()
    delays = [rng.uniform(0.0, 0.5), rng.uniform(0.0, 0.5)]
    print(f"kill delays after the epoch rows: {delays}")  # shown on failure, to reproduce the moments
    args = ["train", *DETERMINISTIC, "trainer.max_epochs=8", "data.samples_per_epoch=6"]
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    cmd = [sys.executable, "-m", "lampseg", *args, f"run_dir={killed}"]
    _kill_when(cmd, killed, 2, delays[0])  # row 2 exists: epoch 1's checkpoint was written before it
    first = _load(killed / "checkpoints" / "latest.pt")["epoch"]
    assert json.loads((killed / "summary.json").read_text())["status"] == "running"
    _kill_when(cmd, killed, first + 2, delays[1])  # the relaunch resumes, then dies again
    second = _load(killed / "checkpoints" / "latest.pt")["epoch"]
    assert 1 <= first < second < 8, (first, second)

    lampseg(*args, f"run_dir={killed}")
    lampseg(*args, f"run_dir={clean}")
    assert json.loads((killed / "summary.json").read_text())["status"] == "completed"
    assert [r["epoch"] for r in _rows(killed)] == [str(e) for e in range(1, 9)]
    assert not list((killed / "checkpoints").glob(".*.tmp")), "a killed write's temp file was left behind"
    final_killed = _load(killed / "checkpoints" / "final.pt")
    final_clean = _load(clean / "checkpoints" / "final.pt")
    for name, tensor in final_clean["model"].items():
        assert torch.allclose(tensor, final_killed["model"][name], rtol=0, atol=1e-6), name


@pytest.mark.extended
def test_resume_with_more_epochs_uses_the_new_schedule_at_once(tmp_path):
    """Extending ``trainer.max_epochs`` on resume: the first resumed epoch already runs at the new
    schedule's rate (poly decay had reached 0 at the old end)."""
    from lampseg.config import enum_value
    from lampseg.engine.optim import lr_factor

    short = ["+exp=smoke", "trainer.num_threads=1", "trainer.hd95=false", "optim.warmup_epochs=0"]
    train_here(tmp_path, *short, "trainer.max_epochs=2")
    train_here(tmp_path, *short, "trainer.max_epochs=4")
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    cfg = compose(*short)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    expected = cfg.optim.lr * lr_factor(2, 4, enum_value(cfg.optim.schedule), 0, cfg.optim.poly_power)
    assert float(rows[2]["lr"]) == pytest.approx(expected)
    assert float(rows[2]["lr"]) > 0
