"""Optimiser steps and the epoch that runs them: what ``Trainer.train`` calls every epoch, and what
``bench overhead`` times against a plain MONAI loop.

A *replica step* (``local_step``, ``pipelined_step``) updates this process's model or stage from one batch;
``GlobalStep`` makes it a step of the global batch: heartbeats for failure messages, the loss averaged over
the data-parallel replicas, the guard against diverged training and, for pipeline stages, the memory each
stage measures on its second step.
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from tqdm import tqdm

from lampseg.engine.state import TrainState
from lampseg.errors import TrainingDiverged
from lampseg.parallel.dims import ParallelDims
from lampseg.runtime import distributed
from lampseg.runtime.device import autocast

StepFn = Callable[[torch.Tensor, torch.Tensor], float]  # (image, target) -> loss, NaN when skipped


def local_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module, cfg,
               device: torch.device, scaler: torch.amp.GradScaler) -> StepFn:
    """One optimiser step on a model that runs in this process (unsplit, DDP, or torchgpipe over devices).

    The step returns the loss, or NaN when it skipped the update because the loss or the gradient norm
    was not finite (fp16's GradScaler skips such steps itself; bf16/fp32 need this check, or one
    overflowing step turns every weight into NaN through gradient clipping).
    """
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else math.inf

    def step(image: torch.Tensor, target: torch.Tensor) -> float:
        with autocast(device, cfg.trainer.precision):
            logits = model(image)
        loss = loss_fn(logits.float(), target.to(logits.device))  # pipelines end on their last device
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        value = float(loss.detach())
        if not scaler.is_enabled() and not (math.isfinite(float(norm)) and math.isfinite(value)):
            optimizer.zero_grad(set_to_none=True)
            return math.nan
        scaler.step(optimizer)
        scaler.update()
        return value

    return step


def pipelined_step(net, optimizer: torch.optim.Optimizer, loss_fn: nn.Module, cfg) -> StepFn:
    """One optimiser step of this rank's stage (``PipelinedUNet``): the schedule runs forward and backward
    over micro-batches, gradients are clipped by the norm over all stages, each rank steps its stage."""
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else math.inf

    def step(image: torch.Tensor, target: torch.Tensor) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = net.train_step(image, target, loss_fn)
        norm = net.clip_grad_norm_(max_norm)  # the same all-reduced value on every rank: they agree to skip
        if not (math.isfinite(norm) and math.isfinite(loss)):
            optimizer.zero_grad(set_to_none=True)
            return math.nan
        optimizer.step()
        return loss

    return step


class GlobalStep:
    """A replica step as a step of the global batch (module docstring); call it with one batch.

    Args:
        replica_step: this process's step (``local_step`` or ``pipelined_step``).
        net: what trains (a pipeline stage measures its memory through it and gathers it on the first).
        optimizer: the optimiser ``replica_step`` steps (measured with the stage's memory).
        dims: the run's parallel dimensions.
        device: this process's device.
        state: the run's ``TrainState`` (its step and epoch name a failed or diverged step).
        max_nan_steps: ``trainer.max_nan_steps``.
        run_dir: the run directory (the divergence message names its latest checkpoint).
    """

    def __init__(self, replica_step: StepFn, net: nn.Module, optimizer: torch.optim.Optimizer,
                 dims: ParallelDims, device: torch.device, state: TrainState, max_nan_steps: int,
                 run_dir: Path) -> None:
        self.replica_step, self.net, self.optimizer = replica_step, net, optimizer
        self.dims, self.device, self.state = dims, device, state
        self.max_nan_steps, self.run_dir = max_nan_steps, Path(run_dir)
        self.done = state.step  # optimiser steps so far, this launch included
        self.nan_streak = 0  # consecutive skipped steps: the same on every rank (the loss is all-reduced)
        self.calls = 0  # steps of this launch
        self.stage_memory: dict | None = None  # this stage's measurement, until gathered

    def __call__(self, image: torch.Tensor, target: torch.Tensor) -> float:
        self.calls += 1
        if self.dims.staged and self.calls == 2:  # optimiser state exists by the second step
            loss, self.stage_memory = self.net.measure_step(self._step, self.optimizer, image, target)
            return loss
        return self._step(image, target)

    def _step(self, image: torch.Tensor, target: torch.Tensor) -> float:
        dims, state = self.dims, self.state
        self.done += 1
        if dims.world > 1:  # lets a failed collective name the rank that fell behind
            distributed.heartbeat("started", self.done, f"epoch {state.epoch + 1}")
        loss = self.replica_step(image, target)
        if dims.world > 1:
            distributed.heartbeat("finished")
        loss = dims.dp_mean(loss, self.device)
        self.nan_streak = self.nan_streak + 1 if math.isnan(loss) else 0
        limit = self.max_nan_steps
        if self.nan_streak >= limit:
            raise TrainingDiverged(
                f"training diverged: {self.nan_streak} consecutive steps (up to step {self.done}, epoch "
                f"{state.epoch + 1}) had a non-finite loss or gradients and were skipped "
                f"(trainer.max_nan_steps={limit}); they did not change the weights and "
                f"{self.run_dir / 'checkpoints' / 'latest.pt'} holds epoch {state.epoch}. Try a lower "
                f"optim.lr, optim.grad_clip, trainer.precision=fp32, or check the data (lampseg validate)")
        return loss

    def gather_stage_memory(self) -> list[dict] | None:
        """Every stage's measurement on the first stage, once, after the epoch that measured it (a
        collective: every rank calls it at the same point); None before and after."""
        if self.stage_memory is None:
            return None
        mine, self.stage_memory = self.stage_memory, None
        return self.net.gather_on_first(mine)


class Progress:
    """A tqdm bar on a terminal; otherwise nothing per step (one line per epoch is printed by the loop)."""

    def __init__(self, mode: str, total: int, epoch: int):
        use_bar = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
        self.bar = None
        if use_bar:
            self.bar = tqdm(total=total, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True)

    def update(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class EpochResult(NamedTuple):
    loss: float  # mean over the steps taken (NaN when all were skipped)
    steps: int  # batches
    seconds: float
    wait_s: float  # waiting for the DataLoader
    skipped: int  # steps skipped for a non-finite loss or gradients


def train_epoch(model: nn.Module, step: StepFn, loader, bundle, cfg, device: torch.device,
                progress: Progress) -> EpochResult:
    """One epoch of ``step(image, target)`` over ``loader`` (labels mapped by ``bundle.targets``)."""
    model.train()
    total, steps, wait, skipped = 0.0, 0, 0.0, 0
    start = tick = time.perf_counter()
    for batch in loader:
        wait += time.perf_counter() - tick
        image = batch["image"].to(device, non_blocking=True)
        if cfg.trainer.channels_last:
            image = image.contiguous(memory_format=torch.channels_last_3d)
        target = bundle.targets.loss_target(batch["label"].to(device, non_blocking=True))
        value = step(image, target)
        steps += 1
        if math.isnan(value):
            skipped += 1
        else:
            total += value
            progress.update(value)
        tick = time.perf_counter()
    mean = total / (steps - skipped) if steps > skipped else math.nan
    return EpochResult(mean, steps, time.perf_counter() - start, wait, skipped)
