"""Apply the configured parallelism to a model: ``parallelize(model, cfg, input_shape, device)``.

``parallel=single`` returns the model as it is. ``parallel=pipeline`` plans the split (``plan.py``), then:

- ``parallel.engine=pipelining`` (default): this process keeps one stage (``pipelining.PipelinedUNet``,
  ``torch.distributed.pipelining``); torchrun starts one process per stage and rank 0 plans for all.
- ``parallel.engine=gpipe``: torchgpipe's ``GPipe`` over ``parallel.pp`` devices in this process (LAMP's
  engine; ``['cpu', 'cpu', ...]`` on a CPU). Its blocks share the model's parameters, so optimisers,
  checkpoints (unsplit parameter names) and ``evaluate`` keep using the original model object.
"""
from __future__ import annotations

import torch
from torch import nn

from lampseg.config import ConfigError, enum_value
from lampseg.parallel import distributed
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


def uses_process_group(cfg) -> bool:
    """Whether ``cfg`` runs one stage per process; if so, join the torchrun job and check its size,
    otherwise check that this is the only process (copies of an in-process run would overwrite each
    other's files).

    Raises:
        ConfigError: for the pipelining engine outside torchrun, or a world size other than dp x pp.
    """
    p = cfg.parallel
    if p.name != "pipeline" or enum_value(p.engine) != "pipelining":
        distributed.check_world(1, 1)
        return False
    if not distributed.init_from_env():
        raise ConfigError(f"config key 'parallel.engine': 'pipelining' runs one stage per process; launch "
                          f"with `torchrun --nproc_per_node {p.dp * p.pp} -m lampseg ...`, or set "
                          f"parallel.engine=gpipe to run all {p.pp} stages in this process")
    distributed.check_world(p.dp, p.pp)
    return True


def parallelize(model: nn.Module, cfg, input_shape: list[int], device: torch.device, targets=None
                ) -> tuple[nn.Module, Plan | None]:
    """The module to run forward passes with, and the plan (None when not pipelined).

    Args:
        model: the unsplit network, already on ``device``.
        cfg: the full config (``parallel.*``, ``data.batch_size``, ``trainer.precision``, ``model``).
        input_shape: (C, X, Y, Z) of one training sample.
        device: the run's device (the first stage's device when pipelined).
        targets: the label mapping (``Targets``) when training: the plan then counts the loss's memory.

    Raises:
        ConfigError: for an engine that is not available or too few devices.
    """
    p = cfg.parallel
    if p.name == "single":
        return model, None
    if uses_process_group(cfg):
        from lampseg.model.unet import build_model
        from lampseg.parallel.pipelining import PipelinedUNet

        plan = None  # rank 0 plans: a measured profile differs between ranks, the split must not
        if distributed.is_main():
            plan, _ = plan_for(cfg, input_shape[0], int(model.out_channels), input_shape, device, targets)
        plan = distributed.broadcast_object(plan)
        with torch.device("meta"):
            probe = build_model(cfg.model, input_shape[0], int(model.out_channels))
        return PipelinedUNet(model, probe, plan, device, cfg.trainer.precision), plan
    plan, _ = plan_for(cfg, input_shape[0], int(model.out_channels), input_shape, device, targets)
    from torchgpipe import GPipe

    balance = [len(stage.blocks) for stage in plan.stages]
    pipe = GPipe(sequential_unet(model), balance=balance, devices=pipeline_devices(p.pp, device),
                 chunks=plan.microbatches, checkpoint=GPIPE_CHECKPOINT[plan.checkpoint])
    return pipe, plan
