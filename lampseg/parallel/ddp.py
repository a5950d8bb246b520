"""Data parallelism: ``DistributedDataParallel`` with a heartbeat before every gradient all-reduce, so that a
failed or stalled collective can name the rank that fell behind (``distributed.failure_message``).
``parallelize`` is its only caller in a training run."""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from lampseg.runtime import distributed


def _allreduce_with_heartbeat(group, bucket):
    """DDP's own all-reduce of a gradient bucket, after noting that this rank got that far."""
    distributed.heartbeat("syncing gradients")
    return default_hooks.allreduce_hook(group, bucket)


def data_parallel(module: nn.Module, device: torch.device, group=None) -> DistributedDataParallel:
    """``module`` replicated with gradients averaged over ``group`` (None: every process of the job)."""
    ddp = DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None,
                                  process_group=group)
    ddp.register_comm_hook(group, _allreduce_with_heartbeat)
    return ddp


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (itself otherwise)."""
    return module.module if isinstance(module, DistributedDataParallel) else module
