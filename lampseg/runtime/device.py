"""Devices, dtypes, autocast and random state: what every layer that runs tensors needs."""
from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

from lampseg.config import enum_value

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # trainer.precision


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


MAX_LOADER_WORKERS = 8  # beyond this a 3D patch loader rarely gains (nnU-Net's default is 12 per GPU)


def loader_workers(setting: int | str, processes: int | None = None) -> int:
    """``data.num_workers``: a number, or ``auto``: the cores this process may use, shared by the
    ``processes`` training processes on this node (default ``$LOCAL_WORLD_SIZE``, else 1), less one core
    each for the training loop itself; at most ``MAX_LOADER_WORKERS``. A 2-core machine gets 1; a 16-core
    node with one GPU 8; with 8 GPUs 1 per process."""
    if setting != "auto":
        return int(setting)
    processes = processes or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(cores // max(processes, 1) - 1, MAX_LOADER_WORKERS))


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast context for ``trainer.precision`` (fp32: no autocast; fp16 only on CUDA)."""
    precision = enum_value(precision)
    if precision == "fp32" or (precision == "fp16" and device.type != "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; ``deterministic`` also asks torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def rng_state() -> dict:
    """Python's, NumPy's, torch's (and CUDA's) random state, as plain values a checkpoint can hold."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": keys.tolist(),
             "numpy_pos": [int(pos), int(has_gauss), float(gauss)], "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` returned, so every random stream continues where it was."""
    torch.set_rng_state(state["torch"])
    pos, has_gauss, gauss = state.get("numpy_pos", [624, 0, 0.0])  # position, so the stream continues
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), int(pos), int(has_gauss),
                         float(gauss)))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
