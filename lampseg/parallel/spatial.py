"""Spatial (domain) parallelism: one volume split into slabs along its first spatial axis over the ranks of a
process group, with results equal to the unsplit model's.

    torchrun --nproc_per_node 2 -m lampseg train parallel=spatial parallel.sp=2 data.patch_size=[128,128,128]

``spatial_parallel(model, group)`` converts a MONAI U-Net in place; the parameters stay where they were, so
checkpoints keep the unsplit names and load into any layout:

- every ``Conv3d`` (stride 1 or 2) first exchanges the *halo* its kernel reaches into the neighbouring
  slabs (``halo_exchange``: forward sends boundary rows to the neighbours, backward sends their gradients
  back), then convolves without padding along the split axis; the first and last slabs pad with zeros as
  the unsplit convolution does;
- every ``ConvTranspose3d`` takes the rows its overlap needs from the next slab and keeps its own outputs;
- instance and group normalisation use the statistics of the **whole** volume (sums and sums of squared
  deviations all-reduced over the group, differentiably);
- ``SpatialLoss`` makes MONAI's Dice + cross-entropy (or focal) loss global: Dice from all-reduced
  true/false positive sums, cross-entropy as the mean of the equal slabs' means.

Gradients: the collectives differentiate the sum of every rank's (identical) loss, so each rank's
parameter gradient is its slab's share of ``sp`` times the true gradient; averaging over the group (DDP over
all ``dp x sp`` ranks does exactly that) gives the unsplit gradient. No library did this for MONAI's layers
(``docs/MODEL_PARALLEL.md``: DTensor, PhysicsNeMo's ShardTensor, DistConv).
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceFocalLoss
from monai.networks.utils import one_hot
from torch import nn

from lampseg.config import ConfigError
from lampseg.data.sampling import split_rows

AXIS = 2  # (N, C, X, Y, Z): slabs along X
_POINTWISE = (nn.PReLU, nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Identity,
              nn.Dropout, nn.Dropout3d)


class CommTime:
    """Host seconds spent in halo exchanges and all-reduces since ``reset`` (``bench spatial`` reports
    them; on CUDA, NCCL returns before the transfer ends, so they undercount there)."""

    def __init__(self) -> None:
        self.seconds = {"halo": 0.0, "allreduce": 0.0}

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)

    @contextmanager
    def timing(self, kind: str):
        start = time.perf_counter()
        yield
        self.seconds[kind] += time.perf_counter() - start


COMM = CommTime()


def _peers(group) -> tuple[int, int, int | None, int | None]:
    """(rank in group, group size, global rank of the previous slab's owner, of the next one's)."""
    group = group if group is not None else dist.group.WORLD
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    prev = dist.get_global_rank(group, rank - 1) if rank > 0 else None
    nxt = dist.get_global_rank(group, rank + 1) if rank < size - 1 else None
    return rank, size, prev, nxt


def _swap(to_prev: torch.Tensor | None, to_next: torch.Tensor | None, from_prev: torch.Tensor | None,
          from_next: torch.Tensor | None, prev: int | None, nxt: int | None, group) -> None:
    """Send to and receive from both neighbours at once (point-to-point; empty tensors are skipped)."""
    ops = []
    for tensor, peer, op in ((to_prev, prev, dist.isend), (to_next, nxt, dist.isend),
                             (from_prev, prev, dist.irecv), (from_next, nxt, dist.irecv)):
        if peer is not None and tensor is not None and tensor.numel():
            ops.append(dist.P2POp(op, tensor, peer, group))
    with COMM.timing("halo"):
        for request in dist.batch_isend_irecv(ops) if ops else []:
            request.wait()


class _HaloExchange(torch.autograd.Function):
    """``x`` with ``before`` rows of the previous slab and ``after`` rows of the next one around it along
    ``AXIS`` (zeros where there is no neighbour: the unsplit layer's zero padding)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, before: int, after: int, group) -> torch.Tensor:
        ctx.before, ctx.after, ctx.group = before, after, group
        _, _, prev, nxt = _peers(group)
        length = x.shape[AXIS]
        shape = list(x.shape)
        head = x.new_zeros(shape[:AXIS] + [before] + shape[AXIS + 1:])
        tail = x.new_zeros(shape[:AXIS] + [after] + shape[AXIS + 1:])
        _swap(x.narrow(AXIS, 0, after).contiguous(), x.narrow(AXIS, length - before, before).contiguous(),
              head, tail, prev, nxt, group)
        return torch.cat([head, x, tail], AXIS)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        before, after, group = ctx.before, ctx.after, ctx.group
        _, _, prev, nxt = _peers(group)
        length = grad.shape[AXIS] - before - after
        grad_x = grad.narrow(AXIS, before, length).contiguous()
        from_prev = torch.empty_like(grad_x.narrow(AXIS, 0, after))  # my first rows, used by prev's tail
        from_next = torch.empty_like(grad_x.narrow(AXIS, length - before, before))
        _swap(grad.narrow(AXIS, 0, before).contiguous(),
              grad.narrow(AXIS, before + length, after).contiguous(), from_prev, from_next, prev, nxt, group)
        if prev is not None and after:
            grad_x.narrow(AXIS, 0, after).add_(from_prev)
        if nxt is not None and before:
            grad_x.narrow(AXIS, length - before, before).add_(from_next)
        return grad_x, None, None, None


def halo_exchange(x: torch.Tensor, before: int, after: int, group) -> torch.Tensor:
    """``x`` extended along the split axis by its neighbours' boundary rows (differentiable)."""
    if before == 0 and after == 0:
        return x
    if x.shape[AXIS] < max(before, after):
        raise ValueError(f"a slab of {x.shape[AXIS]} rows cannot lend a halo of {max(before, after)}")
    return _HaloExchange.apply(x, before, after, group)


class _AllReduce(torch.autograd.Function):
    """Sum over the group; the backward sums the gradients too (every rank's loss depends on every input)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous().clone()
        with COMM.timing("allreduce"):
            dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        with COMM.timing("allreduce"):
            dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    """The sum of ``x`` over ``group`` (differentiable)."""
    return _AllReduce.apply(x, group)


def _axis_args(module, transposed: bool = False) -> tuple[int, int, int]:
    k, s, p = module.kernel_size[0], module.stride[0], module.padding[0]
    if module.dilation[0] != 1 or isinstance(module.padding, str):
        raise ConfigError(f"config key 'parallel.sp': {type(module).__name__} with dilation "
                          f"{module.dilation} or padding {module.padding!r} cannot be split")
    if transposed and module.output_padding[0] >= s:
        raise ConfigError("config key 'parallel.sp': a transposed convolution's output padding must be "
                          "smaller than its stride")
    return k, s, p


class SpatialConv3d(nn.Conv3d):
    """``nn.Conv3d`` on one slab: halo exchange, then no padding along the split axis."""

    sp_group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s, p = _axis_args(self)
        if x.shape[AXIS] % s:
            raise ValueError(f"a slab of {x.shape[AXIS]} rows does not divide by the stride {s}")
        x = halo_exchange(x, p, max(k - s - p, 0), self.sp_group)
        padding = (0, *self.padding[1:])
        return F.conv3d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)


class SpatialConvTranspose3d(nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` on one slab: the rows its kernel overlap needs from the next slab (and the
    previous one for large kernels), then this slab's ``stride x rows`` outputs."""

    sp_group = None

    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        k, s, p = _axis_args(self, transposed=True)
        before = max((k - 1 - p) // s, 0)
        after = (s - 1 + p) // s
        length = x.shape[AXIS]
        y = F.conv_transpose3d(halo_exchange(x, before, after, self.sp_group), self.weight, self.bias,
                               self.stride, (0, *self.padding[1:]), (0, *self.output_padding[1:]),
                               self.groups, self.dilation)
        return y.narrow(AXIS, s * before + p, s * length)


def _global_moments(x: torch.Tensor, dims: tuple[int, ...], group) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` minus its mean, and its biased variance, over ``dims`` of the whole (split) tensor, in fp32,
    differentiable. Slabs may differ in length: the voxel count travels with the sums."""
    x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    count = x.new_full((1,), x[0, 0].numel())

    def total(local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        summed = all_reduce(torch.cat([local.flatten(), count]), group)
        return summed[:-1].view(local.shape), summed[-1]

    sums, voxels = total(x.sum(dims, keepdim=True))
    centred = x - sums / voxels
    squares, voxels = total((centred * centred).sum(dims, keepdim=True))
    return centred, squares / voxels


class SpatialInstanceNorm3d(nn.InstanceNorm3d):
    """Instance normalisation with each (sample, channel)'s statistics over the whole volume."""

    sp_group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred, var = _global_moments(x, (2, 3, 4), self.sp_group)
        y = centred * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight.view(1, -1, 1, 1, 1) + self.bias.view(1, -1, 1, 1, 1)
        return y.to(x.dtype)


class SpatialGroupNorm(nn.GroupNorm):
    """Group normalisation with each (sample, group)'s statistics over the whole volume."""

    sp_group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        grouped = x.reshape(n, self.num_groups, c // self.num_groups, *x.shape[2:])
        centred, var = _global_moments(grouped, (2, 3, 4, 5), self.sp_group)
        y = (centred * torch.rsqrt(var + self.eps)).reshape(x.shape)
        if self.affine:
            y = y * self.weight.view(1, -1, 1, 1, 1) + self.bias.view(1, -1, 1, 1, 1)
        return y.to(x.dtype)


_SPLIT = {nn.Conv3d: SpatialConv3d, nn.ConvTranspose3d: SpatialConvTranspose3d,
          nn.InstanceNorm3d: SpatialInstanceNorm3d, nn.GroupNorm: SpatialGroupNorm}


def check_splittable(model: nn.Module) -> None:
    """Raise ``ConfigError`` naming the first layer that ``spatial_parallel`` cannot split."""
    for name, module in model.named_modules():
        if isinstance(module, nn.InstanceNorm3d) and module.track_running_stats:
            raise ConfigError(f"config key 'parallel.sp': layer {name!r} tracks running instance-norm "
                              "statistics, which a split volume cannot update; use model.norm=instance")
        known = type(module) in _SPLIT or isinstance(module, (*_SPLIT.values(), *_POINTWISE))
        if not known and not list(module.children()):  # containers (Sequential, SkipConnection, ...) pass
            raise ConfigError(f"config key 'parallel.sp': layer {name!r} ({type(module).__name__}) has no "
                              f"spatial split; use model.norm=instance or group, or parallel.sp=1")


def spatial_parallel(model: nn.Module, group) -> nn.Module:
    """Convert ``model``'s layers in place to work on slabs of ``group``'s split (module docstring).

    Args:
        model: a MONAI U-Net (or any network of 3D convolutions, transposed convolutions, instance/group
            norms and pointwise layers).
        group: the ``sp`` process group; its ranks hold consecutive slabs in rank order.

    Returns:
        ``model`` itself; its parameters and their names are unchanged.
    """
    check_splittable(model)
    for module in model.modules():
        cls = _SPLIT.get(type(module))
        if cls is not None:
            module.__class__ = cls
        if isinstance(module, tuple(_SPLIT.values())):
            module.sp_group = group
    return model


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
