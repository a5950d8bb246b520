"""Atomic file writes and checkpoints (``torch.load(weights_only=True)`` only)."""
from __future__ import annotations

import io
from pathlib import Path

import torch

from lampseg.io import atomic_write_bytes


class CheckpointError(ValueError):
    """A file is not a loadable lampseg checkpoint; the message names it."""


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Serialise ``state`` (tensors, numbers, strings, lists, dicts only) atomically."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint safely (weights_only: no arbitrary objects are unpickled).

    Raises:
        FileNotFoundError: naming the path when it does not exist.
        CheckpointError: naming the path when it is not a lampseg checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        # torch's own message suggests weights_only=False, which lampseg never does: keep only its type.
        raise CheckpointError(f"checkpoint {path} could not be loaded with torch.load(weights_only=True) "
                              f"({type(e).__name__}): truncated, corrupt or not a lampseg checkpoint") from e
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"checkpoint {path} is not a lampseg checkpoint (expected a dict with 'model')")
    return state
