"""The ``gpipe`` engine: torchgpipe's ``GPipe`` runs every stage of the U-Net in this process, one device per
stage (LAMP's engine; ``['cpu', 'cpu', ...]`` on a CPU). Built here for training (the plan's stages,
micro-batches and checkpointing) and for whole-volume inference split over devices (blocks divided evenly).
Its blocks share the model's parameters, so optimisers, checkpoints (unsplit names) and ``evaluate`` keep
using the original model object.

Skip connections use torchgpipe's skip API, as LAMP's code did: each ``down`` block *stashes* its output
and the ``up`` block of its level *pops* it, so torchgpipe copies the skip straight from the producing
stage's device to the consuming one; the stages in between receive and send only the activation
(``plan.stage_cost(skips="direct")`` plans with that).
"""
from __future__ import annotations

import torch
from torch import nn
from torchgpipe import GPipe
from torchgpipe.skip import pop, skippable, stash

from lampseg.config import ConfigError
from lampseg.model.blocks import unet_blocks

# lampseg's checkpointing policies in torchgpipe's terms (it checkpoints whole partitions per micro-batch).
GPIPE_CHECKPOINT = {"none": "never", "block": "except_last", "all": "always"}


class _Stash(nn.Module):
    """A ``down`` block: its output goes on as the activation and is stashed as its level's skip."""

    def __init__(self, module: nn.Module, name: str):
        super().__init__()
        self.block, self.name = module, name

    def forward(self, x: torch.Tensor):
        y = self.block(x)
        yield stash(self.name, y)
        return y


class _Pop(nn.Module):
    """An ``up`` block: pops its level's skip and puts it in front of the activation (MONAI's
    ``SkipConnection`` concatenates ``[skip, x]``)."""

    def __init__(self, module: nn.Module, name: str):
        super().__init__()
        self.block, self.name = module, name

    def forward(self, x: torch.Tensor):
        skip = yield pop(self.name)
        return self.block(torch.cat([skip, x], dim=1))


def skip_unet(model: nn.Module) -> nn.Sequential:
    """The U-Net as ``nn.Sequential`` of blocks whose skips travel by torchgpipe's stash and pop (module
    docstring); same outputs and the same parameter objects as ``model``."""
    blocks, specs = unet_blocks(model)
    layers = []
    for block, spec in zip(blocks, specs):
        name = f"skip{spec.level}"
        if spec.kind == "down":
            layers.append(skippable(stash=[name])(_Stash)(block.module, name))
        elif spec.kind == "up":
            layers.append(skippable(pop=[name])(_Pop)(block.module, name))
        else:
            layers.append(block.module)
    return nn.Sequential(*layers)


def pipeline_devices(pp: int, device: torch.device) -> list[torch.device]:
    """One device per stage: ``cpu`` repeated, or ``cuda:0 .. cuda:pp-1``."""
    if device.type != "cuda":
        return [torch.device("cpu")] * pp
    if torch.cuda.device_count() < pp:
        raise ConfigError(f"config key 'parallel.pp': {pp} stages need {pp} GPUs, this machine has "
                          f"{torch.cuda.device_count()}")
    return [torch.device("cuda", i) for i in range(pp)]


def even_balance(blocks: int, stages: int) -> list[int]:
    """Blocks per stage, divided as evenly as possible (the first stages take the remainder)."""
    return [blocks // stages + (1 if k < blocks % stages else 0) for k in range(stages)]


def gpipe(model: nn.Module, balance: list[int], device: torch.device, chunks: int,
          checkpoint: str = "none") -> GPipe:
    """The U-Net ``model`` as a ``GPipe`` of ``len(balance)`` stages.

    Args:
        model: the unsplit MONAI UNet; its blocks are shared, not copied.
        balance: blocks per stage (``Plan.stages`` or ``even_balance``).
        device: the run's device (CUDA: stage k on ``cuda:k``; CPU: every stage on the CPU).
        chunks: micro-batches per batch.
        checkpoint: lampseg's activation checkpointing policy (none|block|all).
    """
    return GPipe(skip_unet(model), balance=balance, devices=pipeline_devices(len(balance), device),
                 chunks=chunks, checkpoint=GPIPE_CHECKPOINT[checkpoint])
