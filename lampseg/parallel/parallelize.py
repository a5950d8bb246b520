"""Apply the run's parallelisms to a model, in a fixed order: ``parallelize(model, dims, cfg, ...)``. The one
place that wraps a model; the engine, evaluation and the benchmarks all come through here.

0. **Spatial (SP)**, ``parallel=spatial``: the model's layers are converted in place to work on slabs of
   each volume (``spatial.py``); training feeds each rank its slab (``data.sampling.Slab``), with the
   planner's activation checkpointing (``capacity.spatial_plan``); ``parallel_loss`` makes the loss global
   and ``inference_module`` takes and gives whole volumes.
1. **Pipeline (PP)**, ``parallel=pipeline``, or stages of slabs (SP x PP: ``parallel=spatial
   parallel.pp=P``, planned per slab by ``capacity.hybrid_plan``): plan the split (``plan.py``), then
   - ``parallel.engine=pipelining`` (default): this process keeps one stage (``pipelining.PipelinedUNet``,
     ``torch.distributed.pipelining``) of the pipeline it belongs to in the ``(dp, pp)`` device mesh;
     rank 0 plans for every pipeline;
   - ``parallel.engine=gpipe``: torchgpipe's ``GPipe`` over ``parallel.pp`` devices in this process
     (``gpipe.py``).
2. **Data (DP)**, ``parallel.dp > 1``: ``DistributedDataParallel`` (``ddp.py``) over the replicas: of the
   whole model (``parallel=ddp``), or of each stage over the ``dp`` dimension of the mesh (DP x PP).
   Inference never goes through DDP (``train=False``): validation shards cases, not batches. Under SP, DDP
   spans all ``dp x sp`` processes (of each stage: ``ParallelDims.replica_group``): averaging the slabs'
   gradients gives the unsplit gradient (``spatial.py``).

``split_for_inference`` pipelines an unsplit model over several devices for one whole volume that does not
fit one device (``inference.mode=auto``).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from lampseg.model.unet import build_model
from lampseg.parallel import distributed
from lampseg.parallel.blocks import BlockSequence, unet_blocks
from lampseg.parallel.capacity import SpatialPlan, hybrid_plan_for, spatial_plan_for
from lampseg.parallel.ddp import data_parallel, unwrap
from lampseg.parallel.dims import ParallelDims
from lampseg.parallel.gpipe import even_balance, gpipe
from lampseg.parallel.plan import Plan, plan_for
from lampseg.parallel.slabs import SpatialInference, SpatialLoss
from lampseg.parallel.spatial import spatial_parallel


def parallelize(model: nn.Module, dims: ParallelDims, cfg, input_shape: list[int], device: torch.device,
                targets=None, train: bool = True) -> tuple[nn.Module, Plan | SpatialPlan | None]:
    """The module to run, and the plan (None when neither pipelined nor split).

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
    if dims.staged or dims.spatial:
        dims.build_mesh(device.type)
    if dims.spatial:  # each rank gets its slab of every sample (data.sampling.Slab)
        spatial_parallel(model, dims.sp_group)
    # DDP averages the gradients of every copy of a parameter: over dp, and over sp (the slabs' shares)
    replicate = train and (dims.dp_enabled or dims.spatial)
    if dims.staged:
        # lazy: torch.distributed.pipelining adds 2 s to every process's start-up; only this engine needs it
        from lampseg.parallel.pipelining import PipelinedUNet

        plan = None  # rank 0 plans for all: a measured profile differs between ranks, the split must not
        if distributed.is_main():
            plan = _stage_plan(cfg, dims, model, input_shape, device, targets)
        plan = distributed.broadcast_object(plan)
        with torch.device("meta"):
            probe = build_model(cfg.model, input_shape[0], int(model.out_channels))
        net = PipelinedUNet(model, probe, plan, device, cfg.trainer.precision, group=dims.pp_group)
        if replicate:
            net.wrap_stage(lambda stage: data_parallel(stage, device, dims.replica_group))
        return net, plan
    if dims.spatial:
        plan = None
        if train:  # rank 0 plans for all (checkpointing must agree: the collectives pair up)
            if distributed.is_main():
                plan = spatial_plan_for(cfg, input_shape[0], int(model.out_channels), input_shape, device,
                                        targets)
            plan = distributed.broadcast_object(plan)
        net = model
        if plan is not None and plan.checkpoint != "none":
            net = BlockSequence(unet_blocks(model)[0], plan.checkpoint)
        return (data_parallel(net, device) if train else net), plan
    if dims.engine == "gpipe":
        plan, _ = plan_for(cfg, input_shape[0], int(model.out_channels), input_shape, device, targets)
        balance = [len(stage.blocks) for stage in plan.stages]
        return gpipe(model, balance, device, plan.microbatches, plan.checkpoint), plan
    if replicate:
        return data_parallel(model, device), None
    return model, None


def _stage_plan(cfg, dims: ParallelDims, model: nn.Module, input_shape: list[int], device: torch.device,
                targets) -> Plan:
    """The pipeline plan: of whole volumes, or (SP x PP) of the slabs each stage's ranks hold."""
    if not dims.spatial:
        return plan_for(cfg, input_shape[0], int(model.out_channels), input_shape, device, targets)[0]
    return hybrid_plan_for(cfg, input_shape[0], int(model.out_channels), input_shape, device, targets)


def parallel_loss(loss: nn.Module, dims: ParallelDims) -> nn.Module:
    """The training loss for this layout: under SP, global over the slabs (called with this rank's slabs of
    the logits and the target)."""
    return SpatialLoss(loss, dims.sp_group) if dims.spatial else loss


def inference_module(model: nn.Module, net: nn.Module, dims: ParallelDims, divisor: int) -> nn.Module:
    """What validation runs: ``net`` (``parallelize``'s module) without DDP; under SP, the split ``model``
    (or, SP x PP, this rank's pipeline of slabs) taking whole volumes and giving every rank the whole
    logits."""
    if not dims.spatial:
        return unwrap(net)
    return SpatialInference(net if dims.staged else model, dims.sp_group, divisor)


def split_for_inference(model: nn.Module, devices: int, device: torch.device) -> nn.Module:
    """A copy of the unsplit U-Net ``model`` pipelined (torchgpipe, one micro-batch) over ``devices``
    devices: ``cuda:0..devices-1``, or the CPU repeated. Blocks are divided evenly, which puts the two
    full-resolution ends (where most activation memory is) on different devices. Built per call (the
    weights are copied, so training's validation sees its current weights); the original stays whole on
    its device."""
    copied = copy.deepcopy(model)
    return gpipe(copied, even_balance(len(unet_blocks(copied)[0]), devices), device, chunks=1).eval()
