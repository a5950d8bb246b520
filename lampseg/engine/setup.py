"""Everything a training run needs, built once: ``setup(cfg, log) -> Run``.

The order is fixed, and it matters for exact numbers: join the job and check the parallel dimensions, pick
the device, seed, check the plan on ``dataset.json`` alone, prepare the data (rank 0 first), build the model
(its initial weights are the first random draws after the seed), apply the parallelisms (``parallelize``),
build the optimiser, scheduler, loss and scaler, then restore a checkpoint when resuming.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from lampseg.config import ConfigError, enum_value, to_container, validate
from lampseg.data.prepare import (
    DataBundle,
    curriculum_phases,
    prepare_data,
)
from lampseg.engine.checkpoint import load_checkpoint, load_latest, load_optimizer_state_by_name
from lampseg.engine.optim import build_optimizer, build_scheduler, lr_scale
from lampseg.io import atomic_write_text
from lampseg.model.losses import build_loss
from lampseg.model.unet import build_model, count_parameters, size_divisor
from lampseg.parallel.dims import ParallelDims, resolve_dims
from lampseg.parallel.parallelize import inference_module, parallel_loss, parallelize
from lampseg.planner.decisions import Plan, SpatialPlan
from lampseg.planner.layout import auto_layout, plan_split, preflight_plan
from lampseg.planner.patch import choose_patch_size
from lampseg.runtime import distributed
from lampseg.runtime.device import (
    PrecisionChoice,
    resolve_device,
    resolve_precision,
    seed_everything,
    set_rng_state,
)
from lampseg.runtime.memory import keep_freed_cpu_memory

Phase = tuple[int, list[int], bool]  # (first epoch, patch size, whole volume)


def select_device(cfg) -> torch.device:
    """This process's device for ``trainer.device`` (under torchrun: its local GPU), with
    ``trainer.cache_cpu_memory`` applied."""
    device = distributed.local_device(resolve_device(cfg.trainer.device))
    if device.type == "cpu" and cfg.trainer.cache_cpu_memory:
        keep_freed_cpu_memory()
    return device


def load_data(cfg, run_dir: Path, log: Callable[[str], None] = print) -> DataBundle:
    """``data.prepare.prepare_data``, with the planner deciding ``data.patch_size=auto``
    (``planner.patch.choose_patch_size``: the largest patch whose plan fits ``parallel.memory_gb`` per stage,
    by default the training device's free memory)."""
    bundle = prepare_data(cfg, run_dir, size_divisor(cfg.model), log)
    return choose_patch_size(cfg, bundle, resolve_device(cfg.trainer.device), log)


def resolve_auto_layout(cfg, log: Callable[[str], None] = print) -> None:
    """``parallel=auto``: write the planner's layout (``planner.layout.auto_layout``) into ``cfg.parallel``
    before anything reads it."""
    keys = auto_layout(cfg, log)
    if keys is not None:
        OmegaConf.update(cfg, "parallel", keys, merge=True)


@dataclass
class TrainState:
    """What a run has done so far; saved in every checkpoint (``train_state``) and restored on resume."""

    epoch: int = 0
    step: int = 0
    best_val_dice: float = -math.inf
    best_epoch: int | None = None
    best_metrics: dict = field(default_factory=dict)
    history: list = field(default_factory=list)  # metrics.csv's rows
    train_time_s: float = 0.0
    train_samples: int = 0
    wall_s: float = 0.0
    skipped_steps: int = 0

    @classmethod
    def from_dict(cls, saved: dict) -> TrainState:
        """The state a checkpoint saved (keys it lacks keep their defaults)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Run:
    """What one training run needs, built by ``setup``.

    ``model`` is the unsplit network (checkpoints keep its parameter names); ``net`` is what trains
    (``model`` itself, DDP over it, a ``GPipe``, or this rank's pipeline stage); ``infer_net`` is what
    validates (``net`` without DDP: validation shards cases, not batches).
    """

    cfg: object
    run_dir: Path
    log: Callable[[str], None]
    main: bool  # rank 0 (or one process): writes files and prints
    dims: ParallelDims
    device: torch.device
    bundle: DataBundle
    phases: list[Phase]
    model: nn.Module
    net: nn.Module
    infer_net: nn.Module
    plan: Plan | SpatialPlan | None
    params: int
    lr_scale: float
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loss_fn: nn.Module
    scaler: torch.amp.GradScaler
    precision: PrecisionChoice
    state: TrainState
    started: float  # perf_counter at which this run's wall clock started (resumed runs: minus wall_s)

    @property
    def staged(self) -> bool:
        """One pipeline stage per process (``parallel.engine=pipelining``)."""
        return self.dims.staged

    @property
    def engine(self) -> str | None:
        return self.dims.engine


def make_grad_scaler(cfg, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for fp16 on CUDA (bf16 and fp32 need none; a disabled scaler is a no-op)."""
    fp16 = resolve_precision(cfg.trainer.precision, device).name == "fp16"
    return torch.amp.GradScaler(device.type, enabled=fp16 and device.type == "cuda")


def _check_samples(cfg, dims: ParallelDims) -> None:
    if cfg.data.samples_per_epoch < dims.dp * cfg.data.batch_size:
        raise ConfigError(f"config key 'data.samples_per_epoch': {cfg.data.samples_per_epoch} samples make "
                          f"no step of data.batch_size {cfg.data.batch_size} on each of {dims.dp} replicas")


def resolve_run_precision(cfg, dims: ParallelDims, device: torch.device) -> PrecisionChoice:
    """``trainer.precision`` for this run (``runtime.device.resolve_precision``), the same on every rank
    (rank 0's choice: pipeline stages must agree on the dtype they send), written into ``cfg`` so that every
    later reader sees the resolved value.

    Raises:
        ConfigError: fp16 set explicitly with one pipeline stage per process on CUDA (``auto`` takes fp32
            there instead).
    """
    choice = distributed.broadcast_object(resolve_precision(cfg.trainer.precision, device))
    if dims.staged and choice.name == "fp16" and device.type == "cuda":
        why = "fp16 loss scaling is not coordinated across pipeline stages"
        if enum_value(cfg.trainer.precision) != "auto":
            raise ConfigError(f"config key 'trainer.precision': {why}; use bf16 or fp32 with "
                              "parallel.engine=pipelining")
        choice = PrecisionChoice("fp32", f"{choice.reason}; but {why}, so fp32", choice.setting)
    OmegaConf.update(cfg, "trainer.precision", choice.name, merge=False)
    return choice


def saved_config(cfg, precision: PrecisionChoice) -> dict:
    """The run's config as files and checkpoints keep it: ``trainer.precision`` as it was asked for (``auto``
    resolves anew where the checkpoint is used: an H100's bf16 would be emulated on an AVX2 laptop)."""
    saved = to_container(cfg)
    saved["trainer"]["precision"] = precision.setting
    return saved


def _build_model(cfg, bundle: DataBundle, device: torch.device) -> nn.Module:
    model = build_model(cfg.model, len(bundle.channels), bundle.targets.out_channels).to(device)
    if cfg.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    return model


def _resume(cfg, run: Run) -> None:
    """``trainer.resume``: never, auto (``load_latest``, with its fallback) or a path loaded as is."""
    resume = str(cfg.trainer.resume)
    if resume == "never":
        return
    found = (Path(resume), load_checkpoint(resume)) if resume != "auto" else \
        load_latest(run.run_dir / "checkpoints" / "latest.pt", run.log, run.main)
    if found is None:
        return
    path, ckpt = found
    optimizer, scheduler = run.optimizer, run.scheduler
    run.model.load_state_dict(ckpt["model"])
    load_optimizer_state_by_name(run.model, optimizer, ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scheduler.base_lrs = [cfg.optim.lr * run.lr_scale] * len(optimizer.param_groups)  # this launch's dp, lr
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)  # a changed trainer.max_epochs applies at once
    earlier = ckpt.get("precision", run.precision.name)
    if earlier != run.precision.name:  # trainer.precision=auto on another machine
        run.log(f"resuming a {earlier} run at {run.precision.name} ({run.precision.reason})")
    if ckpt["scaler"] or not run.scaler.is_enabled():  # a bf16/fp32 run saved no loss scale for fp16
        run.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])  # on CPU: RNG states must stay CPU tensors (load_checkpoint maps to CPU)
    run.state = TrainState.from_dict(ckpt["train_state"])
    run.log(f"resumed from {path} at epoch {run.state.epoch}")


def setup(cfg, log: Callable[[str], None] = print) -> Run:
    """Build everything ``cfg`` asks for, in the order that keeps runs reproducible (module docstring).

    Args:
        cfg: the composed config; ``cfg.run_dir`` is the run directory.
        log: where progress lines go (rank 0 only).
    """
    validate(cfg)
    resolve_auto_layout(cfg, log if os.environ.get("RANK", "0") == "0" else (lambda *_: None))
    dims = resolve_dims(cfg)  # joins the torchrun job, checks dp x pp x sp against WORLD_SIZE
    _check_samples(cfg, dims)
    main = distributed.is_main()
    log = log if main else (lambda *_: None)
    run_dir = Path(cfg.run_dir)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    device = select_device(cfg)
    precision = resolve_run_precision(cfg, dims, device)
    log(f"device {device}, {precision.line()}")
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    with distributed.main_first():  # rank 0 builds the cache and splits.json, the others read them
        preflight_plan(cfg, log)
        bundle = load_data(cfg, run_dir, log)
    if main:
        atomic_write_text(run_dir / ".hydra" / "config.yaml", OmegaConf.to_yaml(saved_config(cfg, precision)))
    model = _build_model(cfg, bundle, device)
    phases = curriculum_phases(cfg, bundle)
    largest = max((patch for _, patch, _ in phases), key=math.prod)  # plan stages for the largest input
    shape = [len(bundle.channels), *largest]
    plan = plan_split(cfg, shape[0], bundle.targets.out_channels, shape, device, bundle.targets)
    net = parallelize(model, dims, plan, device, precision.name, cfg.model)
    scale = lr_scale(cfg.optim, dims.dp)
    optimizer = build_optimizer(net if dims.staged else model, cfg.optim, scale)  # a stage's parameters only
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.trainer.max_epochs)
    infer_net = inference_module(model, net, dims, size_divisor(cfg.model))
    run = Run(cfg, run_dir, log, main, dims, device, bundle, phases, model, net, infer_net, plan,
              count_parameters(model), scale, optimizer, scheduler,
              parallel_loss(build_loss(cfg.optim, bundle.targets), dims), make_grad_scaler(cfg, device),
              precision, TrainState(), 0.0)
    _describe(run)
    _resume(cfg, run)
    if dims.dp_rank > 0:  # replicas start identical (DDP broadcasts rank 0's weights), then draw their own
        torch.manual_seed(cfg.seed + 1_000_003 * dims.dp_rank + run.state.epoch)  # dropout masks
    run.started = time.perf_counter() - run.state.wall_s
    return run


def _describe(run: Run) -> None:
    """The run's model, layout and plan, in the log."""
    cfg, dims, bundle = run.cfg, run.dims, run.bundle
    run.log(f"model {cfg.model.name}: {run.params:,} parameters; {len(bundle.channels)} input channels "
            f"({', '.join(bundle.modality_names)}) -> {bundle.targets.out_channels} outputs "
            f"({', '.join(bundle.targets.names)})")
    if dims.world > 1:
        layout = f"dp={dims.dp} x pp={dims.stage_processes}" + (f" x sp={dims.sp}" if dims.spatial else "")
        run.log(f"{dims.world} processes: {layout}; global batch {dims.dp * cfg.data.batch_size} "
                f"({cfg.data.batch_size} per replica); lr {cfg.optim.lr:g} x {run.lr_scale:g} "
                f"(optim.lr_scaling={cfg.optim.lr_scaling})")
    if run.plan is not None:
        run.log(run.plan.table())
