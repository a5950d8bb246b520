"""One training run, built in one place: ``build_run(cfg, log) -> Run``.

The config is validated once per command (here only when the caller has not: ``config.is_checked``) and
resolved once: ``parallel=auto``'s layout and the run's ``trainer.precision`` (rank 0's choice) are derived
into one read-only config, ``Run.cfg``, that every later step reads; the caller's config is never changed.
The run directory records it in ``.hydra/config.yaml`` (``trainer.precision`` as asked).

The order is fixed, and it matters for exact numbers: validate, decide the layout, join the job and check
the parallel dimensions, pick the device and the precision, seed, check the plan on ``dataset.json`` alone,
prepare the data (rank 0 first), build the model (its initial weights are the first random draws after the
seed), apply the parallelisms (``parallelize``), build the optimiser, scheduler, scaler and loss, restore a
checkpoint when resuming, reseed the replicas' dropout, then the training data (this rank's slab under SP,
the sampler) and the step function.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lampseg.config import derive, is_checked, validate
from lampseg.data.prepare import DataBundle, curriculum_phases, training_dataset
from lampseg.data.sampling import EpochSampler, PatchDataset, Slab
from lampseg.engine.checkpoint import load_checkpoint, load_latest, load_optimizer_state_by_name
from lampseg.engine.optim import build_optimizer, build_scheduler, lr_scale
from lampseg.engine.setup import (
    check_samples,
    layout_changes,
    load_data,
    make_grad_scaler,
    resolve_run_precision,
    saved_config,
    select_device,
)
from lampseg.engine.state import TrainState
from lampseg.engine.steps import GlobalStep, local_step, pipelined_step
from lampseg.io import atomic_write_text
from lampseg.model.losses import build_loss
from lampseg.model.unet import build_model, count_parameters, size_divisor
from lampseg.parallel.dims import ParallelDims, resolve_dims
from lampseg.parallel.parallelize import inference_module, parallel_loss, parallelize
from lampseg.planner.decisions import Plan, SpatialPlan
from lampseg.planner.layout import plan_split, preflight_plan
from lampseg.runtime import distributed
from lampseg.runtime.device import PrecisionChoice, loader_workers, seed_everything, set_rng_state

Phase = tuple[int, list[int], bool]  # (first epoch, patch size, whole volume)
Log = Callable[[str], None]


def _quiet(*_) -> None:
    """The log of ranks other than 0."""


@dataclass(frozen=True)
class Placement:
    """Where this process computes, and how."""

    dims: ParallelDims
    device: torch.device
    precision: PrecisionChoice
    main: bool  # rank 0 (or one process): writes files and prints


@dataclass(frozen=True)
class Nets:
    """The network: ``model`` is the unsplit one (checkpoints keep its parameter names); ``net`` is what
    trains (``model`` itself, DDP over it, a ``GPipe``, or this rank's pipeline stage); ``infer_net`` is what
    validates (``net`` without DDP: validation shards cases, not batches)."""

    model: nn.Module
    net: nn.Module
    infer_net: nn.Module
    plan: Plan | SpatialPlan | None
    params: int


@dataclass(frozen=True)
class Optimisation:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    lr_scale: float  # optim.lr's factor for this launch's data-parallel degree


@dataclass(frozen=True)
class TrainingData:
    """The prepared data and what the trainer's loader is made of, epoch by epoch."""

    bundle: DataBundle
    phases: list[Phase]  # the curriculum
    dataset: PatchDataset  # under SP: this rank's slab of each sample
    sampler: EpochSampler
    workers: int  # loader worker processes


@dataclass(frozen=True)
class Run:
    """Everything a training run uses, built by ``build_run``; ``cfg`` is the resolved, read-only config."""

    cfg: DictConfig
    log: Log
    place: Placement
    nets: Nets
    optim: Optimisation
    data: TrainingData
    step: GlobalStep
    state: TrainState
    started: float  # perf_counter at which this run's wall clock started (resumed runs: minus wall_s)

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)


def build_run(cfg, log: Log = print) -> Run:
    """Build everything ``cfg`` asks for, in the order that keeps runs reproducible (module docstring).

    Args:
        cfg: the config, checked and read-only (the CLI's) or not (tests, Ray Tune trials: validated here);
            ``cfg.run_dir`` is the run directory. It is not changed.
        log: where progress lines go (rank 0 only).
    """
    cfg, place, log = resolve(cfg, log)
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    bundle = _prepare_data(cfg, place, log)
    model = _build_model(cfg, bundle, place.device)
    phases = curriculum_phases(cfg, bundle)
    plan = _plan(cfg, bundle, phases, place.device)
    net = parallelize(model, place.dims, plan, place.device, place.precision.name, cfg.model)
    optim = _optimisation(cfg, model, net, place)
    nets = Nets(model, net, inference_module(model, net, place.dims, size_divisor(cfg.model)), plan,
                count_parameters(model))
    loss_fn = parallel_loss(build_loss(cfg.optim, bundle.targets), place.dims)
    _describe(cfg, place, nets, optim, bundle, log)
    state = _resume(cfg, model, optim, place, log)
    if place.dims.dp_rank > 0:  # replicas start identical (DDP broadcasts rank 0's weights), then draw
        torch.manual_seed(cfg.seed + 1_000_003 * place.dims.dp_rank + state.epoch)  # their own dropout masks
    started = time.perf_counter() - state.wall_s
    data = _training_data(cfg, bundle, phases, place.dims)
    step = _global_step(cfg, nets, optim, loss_fn, place, state)
    return Run(cfg, log, place, nets, optim, data, step, state, started)


def resolve(cfg, log: Log = print) -> tuple[DictConfig, Placement, Log]:
    """Validate ``cfg`` unless checked; decide ``parallel=auto``'s layout, join the job (its dimensions
    checked against WORLD_SIZE), pick the device and the run's precision; make the run directory.

    Returns:
        The resolved config (derived from ``cfg``, read-only), where this process computes, and its log
        (quiet on ranks other than 0).
    """
    if not is_checked(cfg):
        validate(cfg)
    layout = layout_changes(cfg, log if os.environ.get("RANK", "0") == "0" else _quiet)
    dims = resolve_dims(derive(cfg, layout, check=False) if layout else cfg)  # joins the torchrun job
    check_samples(cfg, dims)
    main = distributed.is_main()
    log = log if main else _quiet
    (Path(cfg.run_dir) / "checkpoints").mkdir(parents=True, exist_ok=True)
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    device = select_device(cfg)
    precision = resolve_run_precision(cfg, dims, device)
    log(f"device {device}, {precision.line()}")
    resolved = derive(cfg, {**layout, "trainer.precision": precision.name}, check=False)
    return resolved, Placement(dims, device, precision, main), log


def _prepare_data(cfg, place: Placement, log: Log) -> DataBundle:
    """The prepared data (rank 0 builds the cache and splits.json, the others read them), after checking
    the plan on ``dataset.json`` alone; the run directory's ``.hydra/config.yaml``."""
    run_dir = Path(cfg.run_dir)
    with distributed.main_first():
        preflight_plan(cfg, log)
        bundle = load_data(cfg, run_dir, log)
    if place.main:
        atomic_write_text(run_dir / ".hydra" / "config.yaml",
                          OmegaConf.to_yaml(saved_config(cfg, place.precision)))
    return bundle


def _build_model(cfg, bundle: DataBundle, device: torch.device) -> nn.Module:
    model = build_model(cfg.model, len(bundle.channels), bundle.targets.out_channels).to(device)
    if cfg.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    return model


def _plan(cfg, bundle: DataBundle, phases: list[Phase], device: torch.device) -> Plan | SpatialPlan | None:
    """The planner's split, for the largest input of the curriculum."""
    largest = max((patch for _, patch, _ in phases), key=math.prod)
    shape = [len(bundle.channels), *largest]
    return plan_split(cfg, shape[0], bundle.targets.out_channels, shape, device, bundle.targets)


def _optimisation(cfg, model: nn.Module, net: nn.Module, place: Placement) -> Optimisation:
    dims = place.dims
    scale = lr_scale(cfg.optim, dims.dp)
    optimizer = build_optimizer(net if dims.staged else model, cfg.optim, scale)  # a stage's parameters only
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.trainer.max_epochs)
    return Optimisation(optimizer, scheduler, make_grad_scaler(cfg, place.device), scale)


def _resume(cfg, model: nn.Module, optim: Optimisation, place: Placement, log: Log) -> TrainState:
    """``trainer.resume``: never, auto (``load_latest``, with its fallback) or a path loaded as is; the
    state restored, or a new one."""
    resume = str(cfg.trainer.resume)
    if resume == "never":
        return TrainState()
    found = (Path(resume), load_checkpoint(resume)) if resume != "auto" else \
        load_latest(Path(cfg.run_dir) / "checkpoints" / "latest.pt", log, place.main)
    if found is None:
        return TrainState()
    path, ckpt = found
    optimizer, scheduler, precision = optim.optimizer, optim.scheduler, place.precision
    model.load_state_dict(ckpt["model"])
    load_optimizer_state_by_name(model, optimizer, ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scheduler.base_lrs = [cfg.optim.lr * optim.lr_scale] * len(optimizer.param_groups)  # this dp, lr
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)  # a changed trainer.max_epochs applies at once
    earlier = ckpt.get("precision", precision.name)
    if earlier != precision.name:  # trainer.precision=auto on another machine
        log(f"resuming a {earlier} run at {precision.name} ({precision.reason})")
    if ckpt["scaler"] or not optim.scaler.is_enabled():  # a bf16/fp32 run saved no loss scale for fp16
        optim.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])  # on CPU: RNG states must stay CPU tensors (load_checkpoint maps to CPU)
    state = TrainState.from_dict(ckpt["train_state"])
    log(f"resumed from {path} at epoch {state.epoch}")
    return state


def _training_data(cfg, bundle: DataBundle, phases: list[Phase], dims: ParallelDims) -> TrainingData:
    slab = Slab(dims.sp_rank, dims.sp, size_divisor(cfg.model)) if dims.spatial else None
    dataset = training_dataset(cfg, bundle, slab)
    return TrainingData(bundle, phases, dataset, EpochSampler(len(dataset), dims.dp, dims.dp_rank),
                        loader_workers(cfg.data.num_workers))


def _global_step(cfg, nets: Nets, optim: Optimisation, loss_fn: nn.Module, place: Placement,
                 state: TrainState) -> GlobalStep:
    """This process's replica step (a pipeline stage's, or a whole model's) as a step of the global batch."""
    if place.dims.staged:
        replica_step = pipelined_step(nets.net, optim.optimizer, loss_fn, cfg)
    else:
        replica_step = local_step(nets.net, optim.optimizer, loss_fn, cfg, place.device, optim.scaler)
    return GlobalStep(replica_step, nets.net, optim.optimizer, place.dims, place.device, state,
                      cfg.trainer.max_nan_steps, Path(cfg.run_dir))


def _describe(cfg, place: Placement, nets: Nets, optim: Optimisation, bundle: DataBundle, log: Log) -> None:
    """The run's model, layout and plan, in the log."""
    dims = place.dims
    log(f"model {cfg.model.name}: {nets.params:,} parameters; {len(bundle.channels)} input channels "
        f"({', '.join(bundle.modality_names)}) -> {bundle.targets.out_channels} outputs "
        f"({', '.join(bundle.targets.names)})")
    if dims.world > 1:
        layout = f"dp={dims.dp} x pp={dims.stage_processes}" + (f" x sp={dims.sp}" if dims.spatial else "")
        log(f"{dims.world} processes: {layout}; global batch {dims.dp * cfg.data.batch_size} "
            f"({cfg.data.batch_size} per replica); lr {cfg.optim.lr:g} x {optim.lr_scale:g} "
            f"(optim.lr_scaling={cfg.optim.lr_scaling})")
    if nets.plan is not None:
        log(nets.plan.table())
