"""Spatial (domain) parallelism: one volume split into slabs along its first spatial axis over the ranks of a
process group, with results equal to the unsplit model's.

    torchrun --nproc_per_node 2 -m lampseg train parallel=spatial parallel.sp=2 data.patch_size=[128,128,128]

``spatial_parallel(model, group)`` converts a MONAI U-Net in place; the parameters stay where they were, so
checkpoints keep the unsplit names and load into any layout:

- every ``Conv3d`` (stride 1 or 2) first exchanges the *halo* its kernel reaches into the neighbouring
  slabs (forward: boundary rows to the neighbours; backward: their gradients back), then convolves without
  padding along the split axis, keeping only the slab and its halo rows for the backward; the first and
  last slabs pad with zeros as the unsplit convolution does;
- every ``ConvTranspose3d`` takes the rows its overlap needs from the next slab and keeps its own outputs;
- instance and group normalisation use the statistics of the **whole** volume (sums and sums of squared
  deviations all-reduced over the group; the backward all-reduces its two sums too), saving no more than
  PyTorch's own normalisation saves;
- ``slabs.SpatialLoss`` makes MONAI's Dice + cross-entropy (or focal) loss global: Dice from all-reduced
  true/false positive sums, cross-entropy from the slabs' means weighted by their voxels;
  ``slabs.SpatialInference`` runs inference on this rank's slab (``engine.slab_inference``: no rank holds a
  whole volume's logits), or on whole inputs with gathered outputs (sliding windows).

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
from torch import nn

from lampseg.config import ConfigError
from lampseg.model import channels_last
from lampseg.parallel.agreement import agree
from lampseg.parallel.kernels import autocast_operands, conv3d, conv3d_backward, conv_transpose3d

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


def _receive_halo(x: torch.Tensor, before: int, after: int, group) -> tuple[torch.Tensor, torch.Tensor]:
    """The previous slab's last ``before`` rows and the next slab's first ``after`` rows (zeros where there
    is no neighbour: the unsplit layer's zero padding)."""
    _, _, prev, nxt = _peers(group)
    length, shape = x.shape[AXIS], list(x.shape)
    head = x.new_zeros(shape[:AXIS] + [before] + shape[AXIS + 1:])
    tail = x.new_zeros(shape[:AXIS] + [after] + shape[AXIS + 1:])
    to_prev = x.narrow(AXIS, 0, after).contiguous()
    to_next = x.narrow(AXIS, length - before, before).contiguous()
    agree(x.device)  # after this rank's allocations, right before the exchange
    _swap(to_prev, to_next, head, tail, prev, nxt, group)
    # in the slab's layout: concatenated with a channels-last slab, contiguous rows would make the haloed
    # slab contiguous, which the convolution then copies back to channels-last (a second copy of the slab)
    layout = torch.channels_last_3d if x.dim() == 5 and not x.is_contiguous() and \
        x.is_contiguous(memory_format=torch.channels_last_3d) else torch.contiguous_format
    return head.contiguous(memory_format=layout), tail.contiguous(memory_format=layout)


def _haloed(head: torch.Tensor, x: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """The slab with its halo rows, in the slab's memory layout (an empty piece would make ``cat`` fall back
    to the contiguous layout, and the convolution would then copy the haloed slab back to channels-last)."""
    return torch.cat([t for t in (head, x, tail) if t.shape[AXIS] or t is x], AXIS)


def _return_halo_grad(grad: torch.Tensor, before: int, after: int, group) -> torch.Tensor:
    """The gradient of the haloed slab ``grad`` as the gradient of the slab: the halo rows' gradients go
    back to the neighbours that lent them, and theirs for this slab's rows are added."""
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
    return grad_x


class _HaloExchange(torch.autograd.Function):
    """``x`` with ``before`` rows of the previous slab and ``after`` rows of the next one around it along
    ``AXIS``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, before: int, after: int, group) -> torch.Tensor:
        ctx.before, ctx.after, ctx.group = before, after, group
        head, tail = _receive_halo(x, before, after, group)
        return _haloed(head, x, tail)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _return_halo_grad(grad, ctx.before, ctx.after, ctx.group), None, None, None


class _HaloConv(torch.autograd.Function):
    """A 3D convolution of the haloed slab that keeps only the slab (alive anyway) and its halo rows for
    the backward, not the haloed copy: the split layer then saves what the unsplit one saves. Under
    autocast the backward computes in the dtype of the output gradient, as autocast's own would."""

    @staticmethod
    def forward(ctx, x, weight, bias, before, after, stride, padding, dilation, groups, group):
        head, tail = _receive_halo(x, before, after, group)
        y = conv3d(_haloed(head, x, tail), weight, bias, stride, padding, dilation, groups)
        ctx.save_for_backward(x, head, tail, weight)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.halo, ctx.group, ctx.has_bias = (before, after), group, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        x, head, tail, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        haloed = _haloed(head, x, tail).to(grad.dtype)
        grad_haloed, grad_weight, grad_bias = conv3d_backward(
            grad, haloed, weight.to(grad.dtype), ctx.has_bias, stride, padding, dilation, groups)
        del haloed
        grad_x = _return_halo_grad(grad_haloed, *ctx.halo, ctx.group).to(x.dtype)
        grad_bias = grad_bias.to(weight.dtype) if ctx.has_bias else None
        # in the weight's own layout (channels_last_3d too), as DDP's gradient buckets expect
        grad_weight = torch.empty_like(weight).copy_(grad_weight)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None, None


def _check_halo(x: torch.Tensor, before: int, after: int) -> None:
    if x.shape[AXIS] < max(before, after):
        raise ValueError(f"a slab of {x.shape[AXIS]} rows cannot lend a halo of {max(before, after)}")


def halo_exchange(x: torch.Tensor, before: int, after: int, group) -> torch.Tensor:
    """``x`` extended along the split axis by its neighbours' boundary rows (differentiable)."""
    if before == 0 and after == 0:
        return x
    _check_halo(x, before, after)
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
        before, after = p, max(k - s - p, 0)
        _check_halo(x, before, after)
        padding = (0, *self.padding[1:])
        x, weight, bias = autocast_operands(x, self.weight, self.bias)  # autocast's dtype, as F.conv3d would
        with torch.autocast(x.device.type, enabled=False):
            return _HaloConv.apply(x, weight, bias, before, after, self.stride, padding, self.dilation,
                                   self.groups, self.sp_group)


class SpatialConvTranspose3d(nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` on one slab: the rows its kernel overlap needs from the next slab (and the
    previous one for large kernels), then this slab's ``stride x rows`` outputs."""

    sp_group = None

    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        k, s, p = _axis_args(self, transposed=True)
        before = max((k - 1 - p) // s, 0)
        after = (s - 1 + p) // s
        length = x.shape[AXIS]
        y = conv_transpose3d(halo_exchange(x, before, after, self.sp_group), self.weight, self.bias,
                             self.stride, (0, *self.padding[1:]), (0, *self.output_padding[1:]), self.groups,
                             self.dilation)
        return y.narrow(AXIS, s * before + p, s * length)


def _global_moments(x: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, biased variance and voxel count of each (sample, group) of the whole split tensor; ``x`` is
    (N, G, k). One fast local pass (``var_mean``), then one all-reduce of (count x mean, the sum of squared
    deviations from the global origin, count): Chan et al.'s pairwise combination, so slabs may differ in
    length and no second pass over the activations is needed."""
    var, mean = torch.var_mean(x, dim=-1, correction=0)
    voxels = float(x.shape[-1])
    packed = torch.cat([(mean * voxels).flatten(), ((var + mean * mean) * voxels).flatten(),
                        mean.new_full((1,), voxels)])
    agree(x.device)
    with COMM.timing("allreduce"):
        dist.all_reduce(packed, group=group)
    total = packed[-1]
    sums, squares = packed[:-1].view(2, *mean.shape).unbind(0)
    mean = sums / total
    return mean.unsqueeze(-1), (squares / total - mean * mean).clamp_min(0).unsqueeze(-1), total


def _wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least fp32 (statistics of half-precision activations are taken in fp32)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class _GlobalNorm(torch.autograd.Function):
    """``(x - mean) / sqrt(var + eps)`` with each (sample, group)'s mean and variance over the whole split
    volume; ``x`` is (N, G, k), k = this slab's voxels of the group. Saves only ``x`` and the statistics
    (as ``torch.nn.functional.instance_norm`` does), not the centred copies autograd would keep."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float, group) -> torch.Tensor:
        xf = _wide(x)
        mean, var, voxels = _global_moments(xf, group)
        rstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(x, mean, rstd)
        ctx.group, ctx.voxels = group, voxels
        n, g, k = xf.shape  # normalise in one fused pass: batch norm in eval mode with these statistics
        y = F.batch_norm(xf.reshape(1, n * g, k), mean.flatten(), var.flatten(), training=False, eps=eps)
        return y.view(n, g, k).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # dx = rstd * (dy - mean(dy) - xhat * mean(dy * xhat)), both means over the whole volume
        # two activation-sized buffers at a time (xhat and the result), as a fused kernel would nearly do:
        # the dot product by einsum (no product tensor), the rest in place
        x, mean, rstd = ctx.saved_tensors
        xhat = (_wide(x) - mean).mul_(rstd)
        dy = _wide(grad)
        n, g = dy.shape[:2]
        both = torch.cat([dy.sum(-1), torch.einsum("ngk,ngk->ng", dy, xhat)], dim=1)  # (N, 2G)
        with COMM.timing("allreduce"):
            dist.all_reduce(both, group=ctx.group)
        mean_dy, mean_dy_xhat = (both / ctx.voxels).view(n, 2, g, 1).unbind(1)
        grad_x = (dy - mean_dy).sub_(xhat.mul_(mean_dy_xhat)).mul_(rstd)
        return grad_x.to(x.dtype), None, None


def _global_norm(x: torch.Tensor, groups: int, eps: float, weight: torch.Tensor | None,
                 bias: torch.Tensor | None, group) -> torch.Tensor:
    """Group normalisation over the whole split volume (``groups`` = channels: instance norm)."""
    n, c = x.shape[:2]
    y = _GlobalNorm.apply(x.reshape(n, groups, -1), eps, group).view(x.shape)
    if weight is not None:
        y = y * weight.view(1, -1, 1, 1, 1) + bias.view(1, -1, 1, 1, 1)
    return y


class SpatialInstanceNorm3d(nn.InstanceNorm3d):
    """Instance normalisation with each (sample, channel)'s statistics over the whole volume."""

    sp_group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = (self.weight, self.bias) if self.affine else (None, None)
        return _global_norm(x.contiguous(), x.shape[1], self.eps, weight, bias, self.sp_group)


class SpatialGroupNorm(nn.GroupNorm):
    """Group normalisation with each (sample, group)'s statistics over the whole volume."""

    sp_group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = (self.weight, self.bias) if self.affine else (None, None)
        return _global_norm(x.contiguous(), self.num_groups, self.eps, weight, bias, self.sp_group)


_SPLIT = {nn.Conv3d: SpatialConv3d, channels_last.Conv3d: SpatialConv3d,
          nn.ConvTranspose3d: SpatialConvTranspose3d, nn.InstanceNorm3d: SpatialInstanceNorm3d,
          channels_last.InstanceNorm3d: SpatialInstanceNorm3d, nn.GroupNorm: SpatialGroupNorm}


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
