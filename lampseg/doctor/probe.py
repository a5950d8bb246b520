"""The small problem every ``lampseg doctor`` check runs: a two-level U-Net (8-16-32 channels) on a random
batch of two 2-channel 32x24x16 volumes with three labels, seeded, in fp32 (so that a split can be compared
with the unsplit model to rounding).

A check passes when the parallel version computes what one process computes: the same loss, and the same
gradients (relative to their largest entry) within ``TOLERANCE``.
"""
from __future__ import annotations

import copy
import math

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lampseg.config import Config
from lampseg.model.losses import Targets, build_loss
from lampseg.model.unet import build_model

LABELS = {0: "background", 1: "a", 2: "b"}
SHAPE = [2, 32, 24, 16]  # (C, X, Y, Z): 32 rows split into two slabs of 16 (the U-Net divides by 4)
BATCH = 2
TOLERANCE = 1e-3  # fp32: a split sums in another order; a wrong split is off by far more


def probe_config(parallel: dict | None = None, device: str = "cpu") -> DictConfig:
    """The probe U-Net's config under ``parallel`` (``parallel.*`` keys) on ``device``."""
    cfg = OmegaConf.structured(Config)
    cfg.model.merge_with({"name": "doctor", "channels": [8, 16, 32], "strides": [2, 2], "kernel_size": 3,
                          "num_res_units": 1, "norm": "instance", "dropout": 0.0})
    cfg.data.batch_size, cfg.trainer.precision, cfg.trainer.device = BATCH, "fp32", device
    cfg.trainer.channels_last = False
    if parallel:
        cfg.parallel.merge_with(parallel)
    return cfg


def probe_problem(cfg: DictConfig, device: torch.device
                  ) -> tuple[nn.Module, nn.Module, nn.Module, Targets, torch.Tensor, torch.Tensor]:
    """The probe model (seed 0) on ``device``, an unsplit copy, the loss, the targets and the batch."""
    targets = Targets.from_config(LABELS, None)
    torch.manual_seed(0)
    model = build_model(cfg.model, SHAPE[0], targets.out_channels).to(device)
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(BATCH, *SHAPE, generator=generator)
    label = torch.randint(0, len(LABELS), (BATCH, 1, *SHAPE[1:]), generator=generator)
    return (model, copy.deepcopy(model), build_loss(cfg.optim, targets), targets, image.to(device),
            targets.loss_target(label).to(device))


def reference_step(reference: nn.Module, loss_fn: nn.Module, image: torch.Tensor, target: torch.Tensor
                   ) -> tuple[float, float]:
    """Loss and gradient norm of the unsplit model on the whole batch (gradients left in it)."""
    loss = loss_fn(reference(image), target)
    loss.backward()
    return float(loss.detach()), grad_norm(reference)


def grad_norm(model: nn.Module) -> float:
    return math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters()
                         if p.grad is not None))


def relative(got: float, want: float) -> float:
    return abs(got - want) / max(abs(want), 1e-12)


def max_grad_error(model: nn.Module, reference: nn.Module) -> float:
    """Largest gradient difference between two copies of the model, relative to the largest gradient."""
    scale = max(float(p.grad.abs().max()) for p in reference.parameters())
    pairs = zip(model.parameters(), reference.parameters())
    return max(float((p.grad - q.grad).abs().max()) for p, q in pairs) / max(scale, 1e-12)


def failure_line(error: BaseException) -> str:
    """A failed check's detail: the exception's type and the first line of its message."""
    return f"{type(error).__name__}: {error}".splitlines()[0][:300]


def agree(name: str, errors: dict[str, float]) -> str:
    """``errors`` as one line, or AssertionError when one exceeds ``TOLERANCE``."""
    text = ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
    if any(not (v <= TOLERANCE) for v in errors.values()):  # NaN fails too
        raise AssertionError(f"{name} differs from one process beyond {TOLERANCE:g} (relative): {text}")
    return f"{name} match one process (relative differences: {text})"
