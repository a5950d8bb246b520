"""Apply the run's parallelisms to a model, in a fixed order: ``parallelize(model, dims, cfg, ...)``.

1. **Pipeline (PP)**, ``parallel=pipeline``: plan the split (``plan.py``), then
   - ``parallel.engine=pipelining`` (default): this process keeps one stage (``pipelining.PipelinedUNet``,
     ``torch.distributed.pipelining``) of the pipeline it belongs to in the ``(dp, pp)`` device mesh;
     rank 0 plans for every pipeline;
   - ``parallel.engine=gpipe``: torchgpipe's ``GPipe`` over ``parallel.pp`` devices in this process (LAMP's
     engine; ``['cpu', 'cpu', ...]`` on a CPU). Its blocks share the model's parameters, so optimisers,
     checkpoints (unsplit parameter names) and ``evaluate`` keep using the original model object.
2. **Data (DP)**, ``parallel.dp > 1``: ``DistributedDataParallel`` over the replicas: of the whole model
   (``parallel=ddp``), or of each stage over the ``dp`` dimension of the mesh (DP x PP). Inference never
   goes through DDP (``train=False``): validation shards cases, not batches.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from lampseg.config import ConfigError
from lampseg.parallel import distributed
from lampseg.parallel.blocks import sequential_unet
from lampseg.parallel.dims import ParallelDims
from lampseg.parallel.plan import Plan, plan_for

# lampseg's checkpointing policies in torchgpipe's terms (it checkpoints whole partitions per micro-batch).
GPIPE_CHECKPOINT = {"none": "never", "block": "except_last", "all": "always"}


def pipeline_devices(pp: int, device: torch.device) -> list[torch.device]:
    """One device per stage: ``cpu`` repeated, or ``cuda:0 .. cuda:pp-1``."""
    if device.type != "cuda":
        return [torch.device("cpu")] * pp
    if torch.cuda.device_count() < pp:
        raise ConfigError(f"config key 'parallel.pp': {pp} stages need {pp} GPUs, this machine has "
                          f"{torch.cuda.device_count()}")
    return [torch.device("cuda", i) for i in range(pp)]


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


def parallelize(model: nn.Module, dims: ParallelDims, cfg, input_shape: list[int], device: torch.device,
                targets=None, train: bool = True) -> tuple[nn.Module, Plan | None]:
    """The module to run, and the plan (None when not pipelined).

    Args:
        model: the unsplit network, already on ``device``.
        dims: the run's parallel dimensions (``dims.resolve_dims``).
        cfg: the full config (``parallel.*``, ``data.batch_size``, ``trainer.precision``, ``model``).
        input_shape: (C, X, Y, Z) of one training sample.
        device: the run's device (the first stage's device when pipelined in one process).
        targets: the label mapping (``Targets``) when training: the plan then counts the loss's memory.
        train: wrap for training (DDP); inference runs each replica on its own cases instead.

    Raises:
        ConfigError: for an engine that is not available or too few devices.
    """
    if dims.staged:
        from lampseg.model.unet import build_model
        from lampseg.parallel.pipelining import PipelinedUNet

        dims.build_mesh(device.type)
        plan = None  # rank 0 plans for all: a measured profile differs between ranks, the split must not
        if distributed.is_main():
            plan, _ = plan_for(cfg, input_shape[0], int(model.out_channels), input_shape, device, targets)
        plan = distributed.broadcast_object(plan)
        with torch.device("meta"):
            probe = build_model(cfg.model, input_shape[0], int(model.out_channels))
        dp_group = dims.dp_group if (train and dims.dp_enabled) else None
        return PipelinedUNet(model, probe, plan, device, cfg.trainer.precision, group=dims.pp_group,
                             dp_group=dp_group), plan
    if dims.engine == "gpipe":
        plan, _ = plan_for(cfg, input_shape[0], int(model.out_channels), input_shape, device, targets)
        from torchgpipe import GPipe

        balance = [len(stage.blocks) for stage in plan.stages]
        devices = pipeline_devices(cfg.parallel.pp, device)
        pipe = GPipe(sequential_unet(model), balance=balance, devices=devices,
                     chunks=plan.microbatches, checkpoint=GPIPE_CHECKPOINT[plan.checkpoint])
        return pipe, plan
    if train and dims.dp_enabled:
        return data_parallel(model, device), None
    return model, None
