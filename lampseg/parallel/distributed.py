"""Process-group lifecycle for runs launched by torchrun (one process per pipeline stage).

    torchrun --nproc_per_node 2 -m lampseg train parallel=pipeline parallel.pp=2

``init_from_env`` joins the job torchrun started (``WORLD_SIZE``/``RANK``/``MASTER_ADDR`` in the
environment) with gloo for CPU tensors and NCCL for CUDA tensors; ``shutdown`` leaves it without the
"terminate called without an active exception" abort. Only rank 0 writes files (``is_main``).
"""
from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from lampseg.config import ConfigError


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by torchrun (or another env:// launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(timeout_s: float | None = None, alone: bool = False) -> bool:
    """Join the torchrun job once (no-op when not launched by torchrun or already joined).

    Args:
        timeout_s: collective timeout; default ``$LAMPSEG_DIST_TIMEOUT`` or 600 s.
        alone: also join a job of one process (``torchrun --nproc_per_node 1``).

    Returns:
        Whether a process group is active.
    """
    if dist.is_initialized():
        return True
    if not (launched_by_torchrun() or (alone and "RANK" in os.environ)):
        return False
    timeout = timedelta(seconds=float(timeout_s or os.environ.get("LAMPSEG_DIST_TIMEOUT", 600)))
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        backend = "cpu:gloo,cuda:nccl"  # objects and CPU tensors over gloo, stage tensors over NCCL
    dist.init_process_group(backend, timeout=timeout)
    return True


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0 (or a single process): the one that writes logs, checkpoints and summaries."""
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. builds a shared cache), then the others (which find it built)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (pickled; only between processes of this job)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def local_device(device: torch.device) -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` for CUDA runs under torchrun, else ``device``."""
    if device.type == "cuda" and device.index is None and dist.is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def check_world(dp: int, pp: int) -> None:
    """``parallel.dp * parallel.pp`` must equal the number of processes torchrun started."""
    world = world_size()
    if dp * pp != world:
        raise ConfigError(f"config keys 'parallel.dp' x 'parallel.pp': {dp} x {pp} = {dp * pp} processes "
                          f"needed, but WORLD_SIZE is {world}; launch with `torchrun --nproc_per_node "
                          f"{dp * pp} -m lampseg ...` or change parallel.pp")


def shutdown(failed: bool = False) -> None:
    """Leave the process group cleanly: collect dead references, wait for everyone (not after a failure,
    when others may never arrive), destroy."""
    if not dist.is_initialized():
        return
    gc.collect()
    try:
        if not failed:
            dist.barrier()
    finally:
        dist.destroy_process_group()
