"""The planner's decisions for a run, from its config: which layout ``parallel=auto`` takes, whether a
pipeline split fits before the data is prepared, and the split that ``parallel.parallelize`` applies.

    python -m lampseg plan parallel=auto parallel.devices=4 data.patch_size=[128,128,128]

The engines (``lampseg.parallel``) run a split and never decide one: the run builder asks ``plan_split``
for the decision (a ``Plan``, a ``SpatialPlan`` or None) and hands it to ``parallelize``.
"""
from __future__ import annotations

import os
from collections.abc import Callable

import torch

from lampseg.config import ConfigError, enum_value, patch_size_of
from lampseg.data.msd import load_dataset
from lampseg.data.prepare import dataset_root, resolve_channels, resolve_targets
from lampseg.model.unet import size_divisor
from lampseg.planner.capacity import choose_layout, hybrid_plan_for, spatial_plan_for
from lampseg.planner.decisions import Plan, SpatialPlan
from lampseg.planner.plan import OPTIMIZER_STATES, plan_for, profile_for
from lampseg.runtime import distributed
from lampseg.runtime.device import resolve_device


def split_kind(parallel_cfg) -> str:
    """What ``parallel.*`` splits: ``stages`` (one pipeline stage per process, of whole volumes or of
    slabs), ``slabs`` (``parallel=spatial``), ``gpipe`` (every stage in this process) or ``none``."""
    p = parallel_cfg
    engine = enum_value(p.engine)
    if (p.name == "pipeline" and engine == "pipelining") or (p.name == "spatial" and p.pp > 1):
        return "stages"
    if p.name == "spatial":
        return "slabs"
    return "gpipe" if p.name == "pipeline" else "none"


def plan_split(cfg, in_channels: int, out_channels: int, input_shape: list[int], device: torch.device | str,
               targets=None, train: bool = True) -> Plan | SpatialPlan | None:
    """The split ``parallelize`` applies: the pipeline plan (of whole volumes, or SP x PP of the slabs each
    stage's ranks hold), the spatial plan (its activation checkpointing; training only), or None.

    Rank 0 plans and every rank takes its plan: a measured profile differs between ranks, and stage
    boundaries and checkpointing must agree (the collectives pair up).

    Args:
        cfg: the resolved config (``parallel``, ``model``, ``optim``, ``data.batch_size``,
            ``trainer.precision``).
        in_channels: input channels of the model.
        out_channels: output channels of the model.
        input_shape: (C, X, Y, Z) of the largest training sample.
        device: where a measured profile runs.
        targets: the label mapping when training (the plan then counts the loss's memory).
        train: plan for training; inference needs only a pipeline's stages.

    Returns:
        The decision, or None when nothing is split (``single``, ``ddp``, inference of slabs).
    """
    kind = split_kind(cfg.parallel)
    if kind == "none" or (kind == "slabs" and not train):
        return None
    if kind == "gpipe":  # one process: nothing to agree on
        return plan_for(cfg, in_channels, out_channels, input_shape, device, targets)[0]
    plan = None
    if distributed.is_main():
        if kind == "slabs":
            plan = spatial_plan_for(cfg, in_channels, out_channels, input_shape, device, targets)
        elif cfg.parallel.name == "spatial":
            plan = hybrid_plan_for(cfg, in_channels, out_channels, input_shape, device, targets)
        else:
            plan = plan_for(cfg, in_channels, out_channels, input_shape, device, targets)[0]
    return distributed.broadcast_object(plan)


def preflight_plan(cfg, log: Callable[[str], None] = print) -> None:
    """Plan the pipeline split from ``dataset.json`` alone (meta tensors) before ``train`` preprocesses the
    data, so that an impossible ``parallel.memory_gb`` or micro-batch setting fails in seconds rather than
    after the cache is built. Only for a fixed patch size (whole volumes need the preprocessed shapes) and
    estimated costs.

    Raises:
        PlanError: nothing fits; the message says what would.
    """
    patch = patch_size_of(cfg)
    if cfg.parallel.name != "pipeline" or patch is None or cfg.trainer.curriculum is not None \
            or cfg.parallel.profile != "estimate":
        return
    dataset = load_dataset(dataset_root(cfg.data, log))
    channels, targets = resolve_channels(dataset, cfg.data), resolve_targets(dataset, cfg.data)
    plan_for(cfg, len(channels), targets.out_channels, [len(channels), *patch], "cpu", targets)


def auto_layout(cfg, log: Callable[[str], None] = print) -> dict | None:
    """``parallel=auto``: the planner's layout of ``parallel.devices`` processes (default: WORLD_SIZE) as
    ``parallel.*`` keys (``capacity.choose_layout``: DDP when a sample fits one device, else slabs or stages,
    whichever is faster), logged with why; None for any other ``parallel``. Every rank computes the same
    choice from ``dataset.json`` and meta-tensor estimates.

    Raises:
        ConfigError: without a fixed ``data.patch_size``, or when no layout fits.
    """
    p = cfg.parallel
    if p.name != "auto":
        return None
    patch = patch_size_of(cfg)
    if patch is None:
        raise ConfigError("config key 'parallel': parallel=auto plans for a fixed data.patch_size (e.g. "
                          "data.patch_size=[128,128,128]); use parallel=spatial or pipeline with whole "
                          "volumes")
    dataset = load_dataset(dataset_root(cfg.data, log))
    channels, targets = resolve_channels(dataset, cfg.data), resolve_targets(dataset, cfg.data)
    shape = [len(channels), *patch]
    devices = p.devices or int(os.environ.get("WORLD_SIZE", "1"))
    costs = profile_for(cfg, len(channels), targets.out_channels, shape, resolve_device(cfg.trainer.device),
                        targets)
    keys, why = choose_layout(costs, devices, cfg.data.batch_size, p.memory_gb, shape,
                              OPTIMIZER_STATES.get(enum_value(cfg.optim.name), 2), size_divisor(cfg.model),
                              p.schedule, enum_value(cfg.optim.name))
    layout = f"dp={keys['dp']} x pp={keys['pp']} x sp={keys['sp']}"
    log(f"parallel=auto over {devices} device(s): parallel={keys['name']} {layout}; {why}")
    return keys
