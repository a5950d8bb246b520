"""Apply the run's parallelisms to a model, in a fixed order: ``parallelize(model, dims, plan, ...)``. The one
place that wraps a model; the engine, evaluation and the benchmarks all come through here. It runs the
planner's decision (``planner.layout.plan_split``) and decides nothing itself.

0. **Spatial (SP)**, ``parallel=spatial``: the model's layers are converted in place to work on slabs of
   each volume (``spatial.py``); training feeds each rank its slab (``data.sampling.Slab``), with the
   planner's activation checkpointing (``planner.capacity.spatial_plan``); ``parallel_loss`` makes the
   loss global and ``inference_module`` takes and gives whole volumes.
1. **Pipeline (PP)**, ``parallel=pipeline``, or stages of slabs (SP x PP: ``parallel=spatial
   parallel.pp=P``, planned per slab by ``planner.capacity.hybrid_plan``), as planned, then
   - ``parallel.engine=pipelining`` (default): this process keeps one stage (``pipelining.PipelinedUNet``,
     ``torch.distributed.pipelining``) of the pipeline it belongs to in the ``(dp, pp)`` device mesh;
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

from lampseg.model.blocks import BlockSequence, unet_blocks
from lampseg.model.unet import build_model
from lampseg.parallel.ddp import data_parallel, unwrap
from lampseg.parallel.dims import ParallelDims
from lampseg.parallel.gpipe import even_balance, gpipe
from lampseg.parallel.slabs import SpatialInference, SpatialLoss
from lampseg.parallel.spatial import spatial_parallel
from lampseg.planner.decisions import Plan, SpatialPlan


def parallelize(model: nn.Module, dims: ParallelDims, plan: Plan | SpatialPlan | None, device: torch.device,
                precision: str = "fp32", model_cfg=None, train: bool = True) -> nn.Module:
    """The module to run ``model`` as ``dims`` and the planner's ``plan`` say.

    Args:
        model: the unsplit network, already on ``device``.
        dims: the run's parallel dimensions (``dims.resolve_dims``).
        plan: the planner's split (``planner.layout.plan_split``): the stages of a pipeline, the spatial
            plan's checkpointing, or None.
        device: the run's device (the first stage's device when pipelined in one process).
        precision: the resolved ``trainer.precision`` (the dtype pipeline stages send).
        model_cfg: ``model``'s config, for one stage per process (the shapes crossing stage boundaries
            come from a copy on the meta device).
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

        with torch.device("meta"):
            probe = build_model(model_cfg, int(model.in_channels), int(model.out_channels))
        net = PipelinedUNet(model, probe, plan, device, precision, group=dims.pp_group)
        if replicate:
            net.wrap_stage(lambda stage: data_parallel(stage, device, dims.replica_group))
        return net
    if dims.spatial:
        net = model
        if plan is not None and plan.checkpoint != "none":
            net = BlockSequence(unet_blocks(model)[0], plan.checkpoint)
        return data_parallel(net, device) if train else net
    if dims.engine == "gpipe":
        balance = [len(stage.blocks) for stage in plan.stages]
        return gpipe(model, balance, device, plan.microbatches, plan.checkpoint)
    if replicate:
        return data_parallel(model, device)
    return model


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
