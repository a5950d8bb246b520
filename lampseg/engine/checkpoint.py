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
