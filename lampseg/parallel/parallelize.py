"""Apply the configured parallelism to a model: ``parallelize(model, cfg, input_shape, device)``.

``parallel=single`` returns the model as it is. ``parallel=pipeline`` plans the split (``plan.py``) and,
with ``parallel.engine=gpipe``, wraps the U-Net's blocks in torchgpipe's ``GPipe`` over
``parallel.pp`` devices in this process (LAMP's engine; ``['cpu', 'cpu', ...]`` on a CPU). The blocks
share the model's parameters, so optimisers, checkpoints (unsplit parameter names) and ``evaluate`` keep
using the original model object.
"""
from __future__ import annotations

import torch
from torch import nn

from lampseg.config import ConfigError
from lampseg.parallel.blocks import sequential_unet
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


def parallelize(model: nn.Module, cfg, input_shape: list[int], device: torch.device
                ) -> tuple[nn.Module, Plan | None]:
    """The module to run forward passes with, and the plan (None when not pipelined).

    Args:
        model: the unsplit network, already on ``device``.
        cfg: the full config (``parallel.*``, ``data.batch_size``, ``trainer.precision``, ``model``).
        input_shape: (C, X, Y, Z) of one training sample.
        device: the run's device (the first stage's device when pipelined).

    Raises:
        ConfigError: for an engine that is not available or too few devices.
    """
    p = cfg.parallel
    if p.name == "single":
        return model, None
    if p.engine != "gpipe":
        raise ConfigError(f"config key 'parallel.engine': {p.engine!r} is not available yet; "
                          "parallel.engine=gpipe runs the pipeline in this process")
    plan, _ = plan_for(cfg, input_shape[0], int(model.out_channels), input_shape, device)
    from torchgpipe import GPipe

    balance = [len(stage.blocks) for stage in plan.stages]
    pipe = GPipe(sequential_unet(model), balance=balance, devices=pipeline_devices(p.pp, device),
                 chunks=plan.microbatches, checkpoint=GPIPE_CHECKPOINT[plan.checkpoint])
    return pipe, plan
