"""Process-group lifecycle for runs launched by torchrun (DDP replicas and/or pipeline stages).

    torchrun --nproc_per_node 2 -m lampseg train parallel=ddp
    torchrun --nproc_per_node 4 -m lampseg train parallel=pipeline parallel.dp=2 parallel.pp=2

``init_from_env`` joins the job torchrun started (``WORLD_SIZE``/``RANK``/``MASTER_ADDR`` in the
environment) with ``parallel.backend`` (auto: gloo for CPU tensors, NCCL for CUDA tensors) and a
collective timeout; ``shutdown`` leaves it without the "terminate called without an active exception"
abort. ``heartbeat`` records each rank's progress in the job's store so that ``failure_message`` can
name the rank that fell behind when a collective fails or times out. Only rank 0 writes files (``is_main``).
"""
from __future__ import annotations

import gc
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from lampseg.config import ConfigError


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by torchrun (or another env:// launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(timeout_s: float | None = None, alone: bool = False, backend: str | None = None) -> bool:
    """Join the torchrun job once (no-op when not launched by torchrun or already joined).

    Args:
        timeout_s: collective timeout; default ``$LAMPSEG_DIST_TIMEOUT`` or 600 s (the CLI passes the
            composed ``parallel.timeout_s``).
        alone: also join a job of one process (``torchrun --nproc_per_node 1``).
        backend: ``auto`` (gloo for CPU tensors, plus NCCL for CUDA tensors when every process on this node
            has a GPU of its own; else gloo), ``gloo``,
            ``nccl`` or ``cpu:gloo,cuda:nccl``; default ``$LAMPSEG_DIST_BACKEND`` or ``auto`` (the CLI
            passes the composed ``parallel.backend``).

    Returns:
        Whether a process group is active.
    """
    if dist.is_initialized():
        return True
    if not (launched_by_torchrun() or (alone and "RANK" in os.environ)):
        return False
    timeout = timedelta(seconds=float(timeout_s or os.environ.get("LAMPSEG_DIST_TIMEOUT", 600)))
    backend = backend or os.environ.get("LAMPSEG_DIST_BACKEND", "auto")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_gpu())
    if backend == "auto":  # objects and CPU tensors over gloo, CUDA tensors over NCCL
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() and not gpus_shared() else "gloo"
    if "nccl" in backend and not (dist.is_nccl_available() and torch.cuda.is_available()):
        raise ConfigError(f"config key 'parallel.backend': {backend!r} needs NCCL and a CUDA GPU, which this "
                          f"process does not have; use parallel.backend=gloo or auto")
    if "nccl" in backend and gpus_shared():
        raise ConfigError(f"config key 'parallel.backend': {backend!r} with {os.environ['LOCAL_WORLD_SIZE']} "
                          f"processes on {torch.cuda.device_count()} GPU(s): NCCL refuses two ranks on one "
                          "GPU; use parallel.backend=gloo or auto, or one process per GPU")
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
    """This process's device: its GPU (``local_gpu``) for CUDA runs under torchrun, else ``device``."""
    if device.type == "cuda" and device.index is None and dist.is_initialized():
        return torch.device("cuda", local_gpu())
    return device


def local_gpu() -> int:
    """This process's GPU index: ``LOCAL_RANK``, wrapped around the visible GPUs when the node runs more
    processes than it has GPUs (several processes share one GPU, as ``doctor`` and the GPU check do)."""
    return int(os.environ.get("LOCAL_RANK", 0)) % max(torch.cuda.device_count(), 1)


def gpus_shared() -> bool:
    """Whether this node runs more processes than it has GPUs: NCCL refuses two ranks on one GPU, so
    ``parallel.backend=auto`` takes gloo (which also moves CUDA tensors, for broadcasts and all-reduces)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1)) > max(torch.cuda.device_count(), 1)


def _store():
    """The job's key-value store (torchrun's agent hosts it, so it outlives any one worker), or None."""
    try:
        return dist.distributed_c10d._get_default_store() if dist.is_initialized() else None
    except (RuntimeError, AttributeError, ValueError):
        return None


PHASES = ("started", "syncing gradients", "finished")
_progress = {"step": 0, "label": ""}


def heartbeat(phase: str, step: int | None = None, label: str | None = None) -> None:
    """Record in the job's store how far this rank got: ``phase`` (one of ``PHASES``) of training step
    ``step`` (default: the last one given), now. ``failure_message`` reads these to name the rank that fell
    behind when a collective fails. One small store write per call."""
    store = _store()
    if store is None:
        return
    if step is not None:
        _progress.update(step=step, label=label or "")
    store.set(f"lampseg/heartbeat/{rank()}",
              f"{time.time():.3f} {_progress['step']} {PHASES.index(phase)} {_progress['label']}")


def _heartbeats() -> dict[int, tuple[float, int, int, str]]:
    """rank -> (time, step, phase index, label) of every rank that recorded progress."""
    store, beats = _store(), {}
    if store is None:
        return beats
    for r in range(world_size()):
        key = f"lampseg/heartbeat/{r}"
        try:
            if store.check([key]):
                stamp, step, phase, label = store.get(key).decode().split(" ", 3)
                beats[r] = (float(stamp), int(step), int(phase), label)
        except (RuntimeError, ValueError):
            continue
    return beats


def _behind() -> str:
    """Which rank's progress is behind all others' (the one that stalled or died), in words."""
    beats, now = _heartbeats(), time.time()
    silent = sorted(set(range(world_size())) - set(beats))
    if silent:
        return f" Rank(s) {', '.join(map(str, silent))} never recorded any progress."
    if len(beats) < 2:
        return ""
    position = {r: (b[1], b[2]) for r, b in beats.items()}
    last = min(position.values())
    laggards = [r for r, p in position.items() if p == last]
    if len(laggards) == len(beats):
        return ""  # all at the same point: the heartbeats cannot tell
    others = max(position.values())
    stamp, step, phase, label = beats[laggards[0]]
    return (f" Rank(s) {', '.join(map(str, laggards))} fell behind: last progress {PHASES[phase]} step "
            f"{step} ({label}) {now - stamp:.1f} s ago, while others had {PHASES[others[1]]} step "
            f"{others[0]}.")


def collective_failure(error: BaseException) -> bool:
    """Whether ``error`` is a failed or timed-out collective (gloo and NCCL raise plain RuntimeErrors too)."""
    if isinstance(error, dist.DistError):
        return True
    markers = ("gloo", "NCCL", "ProcessGroup", "Connection closed by peer", "Connection reset by peer")
    return isinstance(error, RuntimeError) and dist.is_initialized() and any(m in str(error) for m in markers)


def failure_message(error: BaseException, run_dir: str | None = None) -> str:
    """What a collective failure means for the user: which rank saw it, which rank fell behind (from the
    heartbeats), how to resume."""
    timeout = os.environ.get("LAMPSEG_DIST_TIMEOUT", "600")
    first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    resume = f" Relaunch the same command to resume from {run_dir}/checkpoints/latest.pt." if run_dir else ""
    return (f"rank {rank()} of {world_size()}: a collective operation failed ({first}).{_behind()} A rank "
            f"that dies or stalls stops the others after at most the collective timeout ({timeout} s, "
            f"parallel.timeout_s); torchrun's 'Root Cause' section names a rank that exited.{resume}")


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
