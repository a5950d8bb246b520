"""A MONAI ``UNet`` as an ordered sequence of blocks with explicit skip connections (for partitioning).

MONAI builds ``UNet`` recursively as ``Sequential(down, SkipConnection(inner), up)``. Executed in order,
that is ``down_0 .. down_{n-2}, bottom, up_{n-2} .. up_0``, where ``up_i`` consumes ``cat([down_i output,
previous output])``. Each block here takes and returns a *state*: the stack of pending skip tensors
followed by the current activation, so an ``nn.Sequential`` of blocks (or any contiguous slice of it: a
pipeline stage) computes exactly what the ``UNet`` computes. Blocks wrap the original submodules, so
parameters are shared with the unsplit model and keep its names (see ``BlockSpec.prefix``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from monai.networks.layers.simplelayers import SkipConnection
from monai.networks.nets import UNet
from torch import nn
from torch.utils.checkpoint import checkpoint as recompute

State = torch.Tensor | tuple[torch.Tensor, ...]


class UNetBlock(nn.Module):
    """One U-Net block acting on a state: a tuple of tensors whose last entry is the current activation,
    preceded by the stack of pending skip tensors (a plain tensor for the first block).

    After a ``down`` block its output is both the activation and the top skip, and it appears in the
    state only once (``after_down``): a tensor repeated in a tuple breaks pipeline engines' gradient
    bookkeeping.

    Args:
        module: the original MONAI submodule (shared, not copied).
        kind: ``down`` (output also pushed as a skip), ``bottom``, or ``up`` (pops a skip and concatenates
            it in front of the activation, as MONAI's ``SkipConnection`` does).
        after_down: whether the previous block was a ``down`` block.
    """

    def __init__(self, module: nn.Module, kind: str, after_down: bool):
        super().__init__()
        if kind not in ("down", "bottom", "up"):
            raise ValueError(f"unknown block kind {kind!r}")
        self.module, self.kind, self.after_down = module, kind, after_down

    def forward(self, state: State) -> State:
        state = (state,) if isinstance(state, torch.Tensor) else tuple(state)
        x = state[-1]
        skips = state if self.after_down else state[:-1]
        if self.kind == "up":
            x, skips = torch.cat([skips[-1], x], dim=1), skips[:-1]
        out = skips + (self.module(x),)
        return out[0] if len(out) == 1 else out


@dataclass(frozen=True)
class BlockSpec:
    """What the planner needs to know about a block besides its cost.

    Attributes:
        name: readable name (``down0``, ``bottom``, ``up0``...).
        kind: down | bottom | up.
        prefix: the block's module path in the unsplit ``UNet`` (state-dict names start with it).
        level: U-Net level (0 = full resolution); a down block's skip is consumed by the up block of the
            same level.
    """

    name: str
    kind: str
    prefix: str
    level: int


def unet_blocks(model: UNet) -> tuple[list[UNetBlock], list[BlockSpec]]:
    """Flatten a MONAI ``UNet`` into its execution-ordered blocks.

    Args:
        model: a ``monai.networks.nets.UNet`` (as ``lampseg.model.unet.build_model`` makes).

    Returns:
        The blocks (sharing the model's submodules) and their specs, in execution order.
    """
    downs: list[tuple[nn.Module, str]] = []
    ups: list[tuple[nn.Module, str]] = []
    node, prefix = model.model, "model"
    while True:
        if not (isinstance(node, nn.Sequential) and len(node) == 3 and isinstance(node[1], SkipConnection)):
            raise TypeError(f"{prefix} is not a MONAI UNet level (Sequential(down, SkipConnection, up))")
        downs.append((node[0], f"{prefix}.0"))
        ups.append((node[2], f"{prefix}.2"))
        inner, inner_prefix = node[1].submodule, f"{prefix}.1.submodule"
        if isinstance(inner, nn.Sequential) and len(inner) == 3 and isinstance(inner[1], SkipConnection):
            node, prefix = inner, inner_prefix
            continue
        bottom = (inner, inner_prefix)
        break
    specs = [BlockSpec(f"down{level}", "down", path, level) for level, (_, path) in enumerate(downs)]
    specs.append(BlockSpec("bottom", "bottom", bottom[1], len(downs)))
    specs += [BlockSpec(f"up{level}", "up", ups[level][1], level) for level in reversed(range(len(ups)))]
    modules = [m for m, _ in downs] + [bottom[0]] + [ups[level][0] for level in reversed(range(len(ups)))]
    blocks = [UNetBlock(m, spec.kind, after_down=i > 0 and specs[i - 1].kind == "down")
              for i, (m, spec) in enumerate(zip(modules, specs))]
    return blocks, specs


class BlockSequence(nn.Module):
    """Blocks run in order under an activation checkpointing policy: ``none``; ``block`` (keep each block's
    output, recompute one block at a time in the backward); ``all`` (keep only the input, recompute all).

    Args:
        blocks: consecutive ``UNetBlock``s (all of a U-Net, or one pipeline stage's).
        checkpoint: none | block | all.
    """

    def __init__(self, blocks: list[nn.Module], checkpoint: str = "none"):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.checkpoint = checkpoint

    def _run(self, state: State) -> State:
        for block in self.blocks:
            if self.checkpoint == "block" and torch.is_grad_enabled():
                state = recompute(block, state, use_reentrant=False)
            else:
                state = block(state)
        return state

    def forward(self, state: State) -> State:
        if self.checkpoint == "all" and torch.is_grad_enabled():
            return recompute(self._run, state, use_reentrant=False)
        return self._run(state)


def sequential_unet(model: UNet) -> nn.Sequential:
    """The UNet as ``nn.Sequential`` of blocks: same outputs and the same parameter objects."""
    return nn.Sequential(*unet_blocks(model)[0])
