"""Optimisers (AdamW, SGD-Nesterov) and per-epoch LR schedules (poly, cosine, constant) with warm-up."""
from __future__ import annotations

import math

import torch
from torch import nn

from lampseg.config import enum_value


def lr_scale(optim_cfg, replicas: int) -> float:
    """The learning-rate multiplier for ``replicas`` data-parallel replicas (``optim.lr_scaling``): the global
    batch grows with them; Berral et al. scaled the rate linearly, ``sqrt`` is the gentler rule."""
    rule = optim_cfg.lr_scaling
    return float(replicas) if rule == "linear" else math.sqrt(replicas) if rule == "sqrt" else 1.0


def build_optimizer(model: nn.Module, optim_cfg, scale: float = 1.0) -> torch.optim.Optimizer:
    """AdamW or SGD with Nesterov momentum, from the ``optim`` config, at ``optim.lr * scale``."""
    name, lr = enum_value(optim_cfg.name), optim_cfg.lr * scale
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=optim_cfg.momentum,
                               nesterov=optim_cfg.nesterov, weight_decay=optim_cfg.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=optim_cfg.weight_decay,
                             betas=(optim_cfg.beta1, optim_cfg.beta2), amsgrad=optim_cfg.amsgrad)


def lr_factor(epoch: int, max_epochs: int, schedule: str, warmup: int = 0, power: float = 0.9) -> float:
    """LR multiplier at the start of ``epoch`` (0-based): linear warm-up, then poly/cosine/constant decay."""
    if epoch < warmup:
        return (epoch + 1) / (warmup + 1)
    progress = (epoch - warmup) / max(max_epochs - warmup, 1)
    if schedule == "poly":
        return (1 - progress) ** power
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, optim_cfg, max_epochs: int):
    """A ``LambdaLR`` stepped once per epoch."""
    schedule = enum_value(optim_cfg.schedule)
    warmup, power = optim_cfg.warmup_epochs, optim_cfg.poly_power
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: lr_factor(epoch, max_epochs, schedule, warmup, power))
