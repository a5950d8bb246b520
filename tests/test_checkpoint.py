"""Checkpoint files (``engine/checkpoint.py``, ``io.py``): atomic writes, weights-only loading."""
from __future__ import annotations

import pytest
import torch

import lampseg.io
from lampseg.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from lampseg.io import atomic_write_text

# -------------------------------------------------------------------------------------- checkpoints


def test_failed_atomic_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "latest.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "epoch": 1})
    text = tmp_path / "summary.json"
    atomic_write_text(text, "old")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(lampseg.io.os, "replace", fail)
    with pytest.raises(CheckpointError, match=r"disk full\).*previous checkpoint there is intact"):
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "epoch": 2})
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(text, "new")
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))
    assert text.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt", "summary.json"]  # no temp files


class NotPlainData:
    pass


def test_load_checkpoint_is_weights_only(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"model": NotPlainData()}, tmp_path / "pickle.pt")
    with pytest.raises(ValueError, match="pickle.pt"):
        load_checkpoint(tmp_path / "pickle.pt")
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a lampseg checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
