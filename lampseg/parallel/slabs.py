"""What goes in and out of a model split into slabs (``spatial.py``): this rank's slab of a whole tensor, the
whole tensor from every rank's slab (on every rank or on one), inference, and the global training loss.

    infer = SpatialInference(model, group, divisor)
    logits_slab = infer.forward_slab(x_slab)          # this rank's rows in, this rank's logits out
    logits = infer(x)                                 # whole volume in, whole logits out on every rank
    loss = SpatialLoss(build_loss(cfg.optim, targets), group)(logits_slab, target_slab)
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceFocalLoss
from monai.networks.utils import one_hot
from torch import nn

from lampseg.config import ConfigError
from lampseg.data.sampling import split_rows
from lampseg.parallel.spatial import AXIS, all_reduce


def slab(x: torch.Tensor, group, multiple: int = 1) -> torch.Tensor:
    """This rank's slab of the whole tensor ``x`` along the split axis (``data.sampling.split_rows``)."""
    start, stop = split_rows(x.shape[AXIS], dist.get_world_size(group), multiple)[dist.get_rank(group)]
    return x.narrow(AXIS, start, stop - start)


def gather_slabs(x: torch.Tensor, group, lengths: list[int], dst: int | None = None,
                 axis: int = AXIS) -> torch.Tensor | None:
    """The whole tensor from every rank's slab of ``lengths[rank]`` rows along ``axis`` (not differentiable).

    Args:
        x: this rank's slab.
        group: the slabs' process group.
        lengths: every rank's rows, in group order (each rank's slab may be empty).
        dst: the group rank that gets the whole tensor (None: every rank does).
        axis: the split axis of ``x``.

    Returns:
        The whole tensor (on ``dst``, or everywhere); None on the other ranks when ``dst`` is given.
    """
    longest = max(lengths)
    padded = F.pad(x, [0, 0] * (x.dim() - axis - 1) + [0, longest - x.shape[axis]]).contiguous()
    here = dst is None or dist.get_rank(group) == dst
    parts = [torch.empty_like(padded) for _ in lengths] if here else None
    if dst is None:
        dist.all_gather(parts, padded, group=group)
    else:
        dist.gather(padded, parts, group=group, group_dst=dst)
    if not here:
        return None
    return torch.cat([part.narrow(axis, 0, n) for part, n in zip(parts, lengths)], axis)


class SpatialInference(nn.Module):
    """Inference with a model split into slabs, equal to the unsplit model's (for any input whose split axis
    the unsplit model accepts: a multiple of ``divisor`` with at least one ``divisor`` per slab).

    ``forward_slab`` takes this rank's rows (``rows``) of the input and gives this rank's rows of the output:
    no rank holds a whole volume. ``forward`` takes the whole input and gives every rank the whole output
    (sliding windows, whose windows are small, use it).
    """

    def __init__(self, module: nn.Module, group, divisor: int):
        super().__init__()
        self.module, self.group, self.divisor = module, group, divisor

    @property
    def slabs(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def bounds(self, length: int) -> list[tuple[int, int]]:
        """(start, stop) of every rank's rows of an input of ``length`` rows along the split axis."""
        return split_rows(length, self.slabs, self.divisor)

    def rows(self, length: int) -> tuple[int, int]:
        """(start, stop) of this rank's rows of an input of ``length`` rows along the split axis."""
        return self.bounds(length)[self.rank]

    @torch.no_grad()
    def forward_slab(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of the output from this rank's rows of the input (``rows``); every rank of the
        group must call it for the same volume."""
        return self.module(x)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bounds = self.bounds(x.shape[AXIS])
        out = self.module(slab(x, self.group, self.divisor))
        return gather_slabs(out, self.group, [stop - start for start, stop in bounds])


class SpatialLoss(nn.Module):
    """MONAI's ``DiceCELoss`` or ``DiceFocalLoss`` over the whole split volume: called with this rank's slab
    of the logits and of the target, it returns the unsplit loss's value on every rank.

    Dice comes from true-positive, false-positive and false-negative sums all-reduced over the group; the
    cross-entropy (focal) term from the slabs' means weighted by their voxels.

    Raises:
        ConfigError: for options whose terms do not add up over slabs (squared or soft-label Dice, ignored
            labels, class weights, another activation).
    """

    def __init__(self, loss: nn.Module, group):
        super().__init__()
        if not isinstance(loss, (DiceCELoss, DiceFocalLoss)):
            raise ConfigError(f"config key 'optim.loss': {type(loss).__name__} has no spatial split")
        dice = loss.dice
        if dice.squared_pred or dice.soft_label or dice.other_act is not None or \
                dice.ignore_index is not None or dice.class_weight is not None or dice.reduction != "mean":
            raise ConfigError("config key 'optim.loss': only plain Dice (mean, no squared prediction, soft "
                              "labels, ignored labels or class weights) adds up over slabs")
        self.loss, self.group = loss, group

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss, dice = self.loss, self.loss.dice
        channels = logits.shape[1]
        if isinstance(loss, DiceFocalLoss):
            if loss.to_onehot_y and channels > 1:
                target = one_hot(target, num_classes=channels)
            second, weight = loss.focal(logits, target), loss.lambda_focal
        else:
            second = loss.ce(logits, target) if channels != 1 else loss.bce(logits, target)
            weight = loss.lambda_ce
        voxels = float(target[:, 0].numel())
        second, voxels = all_reduce(torch.stack([second * voxels, second.new_tensor(voxels)]), self.group)
        second = second / voxels
        return loss.lambda_dice * self._dice(logits, target, dice) + weight * second

    def _dice(self, logits: torch.Tensor, target: torch.Tensor, dice: nn.Module) -> torch.Tensor:
        """MONAI ``DiceLoss.forward`` with its sums all-reduced before the ratio."""
        channels = logits.shape[1]
        pred = torch.sigmoid(logits) if dice.sigmoid else logits
        if dice.softmax and channels > 1:
            pred = torch.softmax(pred, 1)
        if dice.to_onehot_y and channels > 1:
            target = one_hot(target, num_classes=channels)
        if not dice.include_background and channels > 1:
            pred, target = pred[:, 1:], target[:, 1:]
        axes = ([0] if dice.batch else []) + list(range(2, pred.dim()))
        tp = torch.sum(pred * target, dim=axes)
        sums = all_reduce(torch.stack([tp, pred.sum(axes) - tp, target.sum(axes) - tp]),
                         self.group)
        tp, fp, fn = sums.unbind(0)
        if not dice.jaccard:
            fp, fn = 0.5 * fp, 0.5 * fn
        return torch.mean(1 - (2 * tp + dice.smooth_nr) / (2 * (tp + fp + fn) + dice.smooth_dr))
