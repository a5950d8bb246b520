"""Deterministic k-fold splits over cases, saved as ``splits.json`` in the run directory."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lampseg.io import atomic_write_text


def kfold_splits(cases: list[str], folds: int, seed: int = 12345) -> list[dict[str, list[str]]]:
    """Split case names into ``folds`` train/val folds (nnU-Net style: shuffled once, fixed seed).

    Args:
        cases: case names.
        folds: number of folds (>= 2, <= number of cases).
        seed: shuffling seed; the same cases and seed always give the same splits.

    Returns:
        A list of ``{"train": [...], "val": [...]}``, one per fold.
    """
    if folds > len(cases):
        raise ValueError(f"config key 'data.folds': expected at most {len(cases)} (the number of training "
                         f"cases), got {folds}")
    order = sorted(cases)
    np.random.default_rng(seed).shuffle(order)
    parts = np.array_split(np.array(order, dtype=object), folds)
    return [{"train": sorted(c for j, p in enumerate(parts) if j != k for c in p), "val": sorted(parts[k])}
            for k in range(folds)]


def load_or_create_splits(run_dir: Path, cases: list[str], folds: int) -> list[dict[str, list[str]]]:
    """Reuse ``run_dir/splits.json`` when it matches the cases and fold count, else write new splits."""
    path = Path(run_dir) / "splits.json"
    if path.is_file():
        splits = json.loads(path.read_text())
        known = {c for s in splits for c in s["val"]}
        if len(splits) == folds and known == set(cases):
            return splits
    splits = kfold_splits(cases, folds)
    atomic_write_text(path, json.dumps(splits, indent=1))
    return splits
