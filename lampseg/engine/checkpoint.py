"""Checkpoints: written atomically with a checksum, loaded with ``torch.load(weights_only=True)`` only.

``torch.load`` notices a truncated file but not flipped bytes inside a tensor (it loads them silently),
so every checkpoint carries a SHA-256 over its content (``checksum``) that loading recomputes. ``latest.pt``
also keeps its predecessor as ``latest.prev.pt``, which resuming falls back to when ``latest.pt`` is
corrupt.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from lampseg.errors import LampsegError
from lampseg.io import atomic_write_bytes

CHECKSUM_KEY = "checksum"


class CheckpointError(LampsegError, ValueError):
    """A file is not a loadable lampseg checkpoint, or one could not be written; the message names it."""


def previous_path(path: str | Path) -> Path:
    """Where ``save_checkpoint(..., keep_previous=True)`` keeps the file it replaces: ``X.prev.pt``."""
    path = Path(path)
    return path.with_name(path.stem + ".prev" + path.suffix)


def state_digest(state) -> str:
    """SHA-256 over a checkpoint's content (without its ``checksum`` entry) in a canonical order: tensors
    by dtype, shape and bytes, other leaves by ``repr``."""
    h = hashlib.sha256()

    def walk(obj) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(obj, dict):
            h.update(f"D{len(obj)}".encode())
            for key in sorted(obj, key=repr):
                h.update(repr(key).encode())
                walk(obj[key])
        elif isinstance(obj, (list, tuple)):
            h.update(f"L{len(obj)}".encode())
            for item in obj:
                walk(item)
        else:
            h.update(f"V{obj!r}".encode())

    walk(state)
    return h.hexdigest()


def save_checkpoint(path: str | Path, state: dict, keep_previous: bool = False) -> None:
    """Serialise ``state`` (tensors, numbers, strings, lists, dicts only) with its checksum, atomically
    (temp file, fsync, rename): a crash, a kill or a full disk leaves the old file or the new one.

    Args:
        path: the checkpoint file.
        state: what to save.
        keep_previous: keep the file being replaced as ``previous_path(path)`` (a hard link, or a copy
            where links are unsupported) so that a later-corrupted ``path`` has a fallback.

    Raises:
        CheckpointError: the file could not be written (full disk, quota, permissions); the message says
            that the previous file is intact.
    """
    path = Path(path)
    buffer = io.BytesIO()
    torch.save({**state, CHECKSUM_KEY: state_digest(state)}, buffer)
    try:
        if keep_previous and path.is_file():
            _keep_copy(path, previous_path(path))
        atomic_write_bytes(path, buffer.getvalue())
    except OSError as e:
        kept = "the previous checkpoint there is intact" if path.is_file() else "nothing was written"
        raise CheckpointError(f"could not write checkpoint {path} ({e.strerror or e}): {kept}; free space or "
                              f"fix the folder, then rerun the same command to resume") from e


def _keep_copy(path: Path, keep: Path) -> None:
    """``keep`` becomes the current content of ``path`` (atomically replaced)."""
    tmp = keep.with_name(f".{keep.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copyfile(path, tmp)
    os.replace(tmp, keep)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint safely (weights_only: no arbitrary objects are unpickled).

    Raises:
        FileNotFoundError: naming the path when it does not exist.
        CheckpointError: naming the path when it is not a lampseg checkpoint or fails its checksum.
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
    saved = state.pop(CHECKSUM_KEY, None)  # absent in checkpoints older than the checksum
    if saved is not None and saved != state_digest(state):
        raise CheckpointError(f"checkpoint {path} is corrupt: its content does not match the checksum it was "
                              f"saved with (changed on disk after writing)")
    return state


def load_weights(model: torch.nn.Module, weights, path: str | Path | None, model_name: str) -> None:
    """Load a checkpoint's ``model`` state dict into ``model`` (the network its config describes).

    Raises:
        CheckpointError: naming ``path``, when ``weights`` is not a state dict of tensors or does not fit
            (a checkpoint of another model, or of another version): the first keys missing or unexpected,
            else PyTorch's reason.
    """
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"checkpoint {path}: 'model' is not a state dict of tensors")
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        theirs, ours = set(weights), set(model.state_dict())
        detail = f"unexpected {sorted(theirs - ours)[:3]}, missing {sorted(ours - theirs)[:3]}" \
            if theirs != ours else str(e).splitlines()[-1].strip()[:300]
        raise CheckpointError(f"checkpoint {path}: its 'model' weights do not fit the U-Net its config's "
                              f"'model' section describes (model.name={model_name}; {detail}): a "
                              f"checkpoint of another model") from e


def load_latest(latest: Path, log: Callable[[str], None], main: bool = True) -> tuple[Path, dict] | None:
    """The checkpoint to resume a run from: ``latest`` or, when it is corrupt or unreadable, its
    predecessor (``previous_path``), with a warning. Rank 0 (``main``) first removes temp files of writes a
    kill interrupted and renames a corrupt ``latest`` to ``latest.corrupt.pt`` (kept for inspection, and
    so that it never becomes the next fallback).

    Returns:
        ``(path, content)``, or None when neither file exists (a fresh run).

    Raises:
        CheckpointError: both files exist and neither loads; the message names both.
    """
    if main:
        for stale in latest.parent.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
    problems = []
    for path in [p for p in (latest, previous_path(latest)) if p.is_file()]:
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if problems:
            log(f"warning: {problems[0]}; resuming from the previous checkpoint {path} "
                f"(epoch {ckpt['train_state']['epoch']}) instead")
            if main and latest.is_file():
                os.replace(latest, latest.with_name("latest.corrupt.pt"))
        return path, ckpt
    if problems:
        raise CheckpointError(" and ".join(problems) + ": no usable checkpoint to resume from; move the "
                              "checkpoints folder away to start over (trainer.resume=never)")
    return None


def optimizer_state_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimiser's state dict keyed by parameter name instead of position, so it loads into an
    optimiser over any subset of the parameters (one pipeline stage) or all of them.

    Args:
        model: the module whose ``named_parameters`` name the optimiser's parameters.
        optimizer: an optimiser over some of ``model``'s parameters.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    position = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    state = optimizer.state_dict()
    return {"state": {position[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [position[i] for i in g["params"]]}
                             for g in state["param_groups"]]}


def merge_optimizer_states(parts: list[dict]) -> dict:
    """One named optimiser state from the named states of several stages (same groups, disjoint params)."""
    merged = {"state": {}, "param_groups": [dict(g, params=[]) for g in parts[0]["param_groups"]]}
    for part in parts:
        merged["state"].update(part["state"])
        for group, new in zip(merged["param_groups"], part["param_groups"]):
            group["params"] = group["params"] + list(new["params"])
    return merged


def load_optimizer_state_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                                 saved: dict) -> None:
    """Load a state from ``optimizer_state_by_name`` (or a positional one from an older checkpoint) into an
    optimiser over some of ``model``'s parameters; hyperparameters come from the saved groups in order."""
    groups = saved["param_groups"]
    if groups and groups[0]["params"] and not isinstance(groups[0]["params"][0], str):
        optimizer.load_state_dict(saved)  # positional: saved by the same layout
        return
    names = {id(p): n for n, p in model.named_parameters()}
    index, state, new_groups = 0, {}, []
    for group, old in zip(optimizer.param_groups, groups):
        ids = []
        for p in group["params"]:
            name = names[id(p)]
            if name in saved["state"]:  # absent for a parameter that never had a gradient
                state[index] = saved["state"][name]
            ids.append(index)
            index += 1
        new_groups.append({**{k: v for k, v in old.items() if k != "params"}, "params": ids})
    optimizer.load_state_dict({"state": state, "param_groups": new_groups})
