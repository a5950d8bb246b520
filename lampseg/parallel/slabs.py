"""What goes in and out of a model split into slabs (``spatial.py``): this rank's slab of a whole tensor, the
whole tensor from every rank's slab, whole-volume inference, and the global training loss.

    infer = SpatialInference(model, group, divisor)   # whole volume in, whole logits out on every rank
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


def gather_slabs(x: torch.Tensor, group, lengths: list[int]) -> torch.Tensor:
    """The whole tensor from every rank's slab of ``lengths[rank]`` rows (not differentiable)."""
    longest = max(lengths)
    padded = F.pad(x, [0, 0] * (x.dim() - AXIS - 1) + [0, longest - x.shape[AXIS]]).contiguous()
    parts = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part.narrow(AXIS, 0, n) for part, n in zip(parts, lengths)], AXIS)


class SpatialInference(nn.Module):
    """Inference wrapper: the whole input in, the whole output out on every rank of the group, equal to the
    unsplit model's (any input whose split axis the unsplit model accepts: a multiple of ``divisor`` with
    at least one ``divisor`` per slab)."""

    def __init__(self, module: nn.Module, group, divisor: int):
        super().__init__()
        self.module, self.group, self.divisor = module, group, divisor

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bounds = split_rows(x.shape[AXIS], dist.get_world_size(self.group), self.divisor)
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
