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

from lampseg.config import ConfigError, enum_value
from lampseg.model.unet import size_divisor
from lampseg.parallel.blocks import sequential_unet
from lampseg.parallel.plan import Plan, make_plan, profile_blocks

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


def plan_for(model: nn.Module, cfg, input_shape: list[int], device: torch.device) -> Plan:
    """The partition plan for ``model`` on ``input_shape`` (C, X, Y, Z) under ``cfg.parallel``."""
    p = cfg.parallel
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        enum_value(cfg.trainer.precision)]
    if p.profile == "estimate":
        from lampseg.model.unet import build_model

        with torch.device("meta"):
            probe = build_model(cfg.model, input_shape[0], _out_channels(model))
        costs = profile_blocks(probe, input_shape, "estimate", device_tflops=p.device_tflops, dtype=dtype)
    else:
        import copy

        costs = profile_blocks(copy.deepcopy(model), input_shape, "measure", device, dtype=dtype)
    return make_plan(costs, p.pp, cfg.data.batch_size, p.memory_gb, input_shape, p.microbatches, p.schedule,
                     p.checkpoint, enum_value(cfg.optim.name), p.profile, size_divisor(cfg.model))


def _out_channels(model: nn.Module) -> int:
    return int(model.out_channels)


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
    plan = plan_for(model, cfg, input_shape, device)
    from torchgpipe import GPipe

    balance = [len(stage.blocks) for stage in plan.stages]
    pipe = GPipe(sequential_unet(model), balance=balance, devices=pipeline_devices(p.pp, device),
                 chunks=plan.microbatches, checkpoint=GPIPE_CHECKPOINT[plan.checkpoint])
    return pipe, plan
