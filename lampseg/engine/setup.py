"""The pieces a training run is built from, each decided from the config alone (``engine/build.py``
assembles them, in its fixed order): this process's device, the prepared data (``data.patch_size=auto``
decided), ``parallel=auto``'s layout and the run's ``trainer.precision`` -- as values the builder derives
the resolved config from, never written into the config they were read from --, the loss scaler, and the
config as the run directory and checkpoints keep it.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from lampseg.config import ConfigError, enum_value, to_container
from lampseg.data.prepare import DataBundle, prepare_data
from lampseg.model.unet import size_divisor
from lampseg.parallel.dims import ParallelDims
from lampseg.planner.layout import auto_layout
from lampseg.planner.patch import choose_patch_size
from lampseg.runtime import distributed
from lampseg.runtime.device import PrecisionChoice, resolve_device, resolve_precision
from lampseg.runtime.memory import keep_freed_cpu_memory


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


def layout_changes(cfg, log: Callable[[str], None] = print) -> dict:
    """``parallel=auto``: the planner's layout (``planner.layout.auto_layout``) as changes to derive the
    resolved config with (``{"parallel": {...}}``); no changes for any other ``parallel``."""
    keys = auto_layout(cfg, log)
    return {} if keys is None else {"parallel": keys}


def check_samples(cfg, dims: ParallelDims) -> None:
    """``data.samples_per_epoch`` makes at least one step of the global batch."""
    if cfg.data.samples_per_epoch < dims.dp * cfg.data.batch_size:
        raise ConfigError(f"config key 'data.samples_per_epoch': {cfg.data.samples_per_epoch} samples make "
                          f"no step of data.batch_size {cfg.data.batch_size} on each of {dims.dp} replicas")


def make_grad_scaler(cfg, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for fp16 on CUDA (bf16 and fp32 need none; a disabled scaler is a no-op)."""
    fp16 = resolve_precision(cfg.trainer.precision, device).name == "fp16"
    return torch.amp.GradScaler(device.type, enabled=fp16 and device.type == "cuda")


def resolve_run_precision(cfg, dims: ParallelDims, device: torch.device) -> PrecisionChoice:
    """``trainer.precision`` for this run (``runtime.device.resolve_precision``), the same on every rank
    (rank 0's choice: pipeline stages must agree on the dtype they send). ``cfg`` is left as it is: the
    builder derives the resolved config, which every later reader sees, with ``choice.name``.

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
    return choice


def saved_config(cfg, precision: PrecisionChoice) -> dict:
    """The run's config as files and checkpoints keep it: ``trainer.precision`` as it was asked for (``auto``
    resolves anew where the checkpoint is used: an H100's bf16 would be emulated on an AVX2 laptop)."""
    saved = to_container(cfg)
    saved["trainer"]["precision"] = precision.setting
    return saved
