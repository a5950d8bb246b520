"""Convolution kernels for slabs: fp32 CPU convolutions steered to oneDNN whatever a slab's size.

``spatial._HaloConv`` convolves every haloed slab with ``conv3d`` and differentiates it with
``conv3d_backward``; on other devices and dtypes they are PyTorch's own ``conv3d`` and
``convolution_backward``. ``steer_convolutions`` puts an unsplit model's ``nn.Conv3d`` layers on the same
kernels (``bench spatial`` compares the split with one process on like kernels), and ``kernel_choice``
says which kernels a model's convolutions take.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lampseg.model import channels_last

PLAIN_CONV3D = (nn.Conv3d, channels_last.Conv3d)  # PyTorch's kernels as PyTorch chooses them (fp32)


def _im2col(x: torch.Tensor) -> bool:
    """PyTorch's own choice for an fp32 CPU convolution of ``x`` at batch 1 (``use_mkldnn`` in
    aten/src/ATen/native/Convolution.cpp): its im2col kernel when batch x channels x X x Y <= 20480."""
    return x.shape[0] == 1 and x.shape[0] * x.shape[1] * x.shape[2] * x.shape[3] <= 20480


def _onednn(x: torch.Tensor) -> bool:
    """Whether to steer a convolution of ``x`` to oneDNN: fp32 on a CPU. PyTorch picks its im2col kernel
    (2-3x slower, with buffers ~27x the input) when batch x channels x X x Y <= 20480, a line that thin
    slabs of small layers cross where the unsplit layer does not (``docs/MODEL_PARALLEL.md``, *Kernels*)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available() \
        and torch.backends.mkldnn.enabled


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation,
            groups: int) -> torch.Tensor:
    """``F.conv3d``; fp32 CPU convolutions take oneDNN's kernel whatever the slab's size (``_onednn``)."""
    if _onednn(x):
        return torch.ops.aten.mkldnn_convolution(x, weight, bias, list(padding), list(stride), list(dilation),
                                                 groups)
    return F.conv3d(x, weight, bias, stride, padding, dilation, groups)


_LAST = (0, 1, 4, 3, 2)  # the split axis last: PyTorch's kernel choice does not look at the last axis


def conv3d_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, has_bias: bool, stride,
                     padding, dilation, groups: int, input_grad: bool = True) -> tuple[torch.Tensor, ...]:
    """Gradients of ``conv3d`` for its input (None without ``input_grad``: an input that needs none, such as
    the image, spares oneDNN its gradient's buffers), weight and bias. ``convolution_backward`` takes no
    backend argument, so an fp32 CPU one that PyTorch would send to im2col runs on views with the split axis
    last (a permutation of the axes, and of the kernel's, is the same convolution): the choice then sees the
    unsplit extent and takes oneDNN (3x faster than im2col for a 16-channel slab of 16 rows, measured,
    and without its buffers; oneDNN copies the permuted views, so only where im2col would be chosen). Where
    the permutation does not help (a cube at batch 1: a pipeline's micro-batch of one sample), oneDNN gets
    copies in its own tensors (``to_mkldnn``), 3-10x faster than im2col and without its 27x buffers."""
    bias_sizes = [weight.shape[0]] if has_bias else None
    mask = [input_grad, True, has_bias]
    if not (_onednn(x) and _im2col(x)):
        return torch.ops.aten.convolution_backward(grad, x, weight, bias_sizes, list(stride), list(padding),
                                                   list(dilation), False, [0, 0, 0], groups, mask)
    if _im2col(x.permute(_LAST)):  # a cube (or near one) at batch 1: oneDNN's own tensors instead
        grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad.contiguous().to_mkldnn(), x.contiguous().to_mkldnn(), weight, bias_sizes, list(stride),
            list(padding), list(dilation), False, [0, 0, 0], groups, mask)
        return grad_x.to_dense() if input_grad else None, grad_weight, grad_bias
    grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad.permute(_LAST), x.permute(_LAST), weight.permute(_LAST), bias_sizes, list(stride)[::-1],
        list(padding)[::-1], list(dilation)[::-1], False, [0, 0, 0], groups, mask)
    return grad_x.permute(_LAST) if input_grad else None, grad_weight.permute(_LAST), grad_bias


class _Conv3d(torch.autograd.Function):
    """A 3D convolution on ``conv3d`` and ``conv3d_backward``: an unsplit layer on the kernels a slab's
    ``spatial._HaloConv`` takes (its forward and backward without the halo)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.conv, ctx.has_bias = (stride, padding, dilation, groups), bias is not None
        return conv3d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = conv3d_backward(grad, x, weight, ctx.has_bias, *ctx.conv,
                                                         input_grad=ctx.needs_input_grad[0])
        grad_weight = torch.empty_like(weight).copy_(grad_weight)  # the weight's layout, as DDP expects
        return grad_x, grad_weight, grad_bias if ctx.has_bias else None, None, None, None, None


def autocast_operands(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The operands in autocast's dtype when autocast is on (the steered layers compute with it off, as
    ``spatial.SpatialConv3d`` does), else as they are."""
    if not torch.is_autocast_enabled(x.device.type):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(x.device.type)
    return x.to(dtype), weight.to(dtype), bias.to(dtype) if bias is not None else None


class SteeredConv3d(nn.Conv3d):
    """``nn.Conv3d`` whose convolutions take the kernels of a split model's slabs (``conv3d``,
    ``conv3d_backward``): oneDNN for fp32 on a CPU whatever the input's size, PyTorch's choice otherwise.
    Under autocast it computes in autocast's dtype, as ``spatial.SpatialConv3d`` does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super().forward(x)
        x, weight, bias = autocast_operands(x, self.weight, self.bias)
        with torch.autocast(x.device.type, enabled=False):
            return _Conv3d.apply(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class _ConvTranspose3d(torch.autograd.Function):
    """A transposed 3D convolution whose fp32 CPU batch-1 calls that PyTorch would send to its vol2col kernel
    (the same size rule as ``_im2col``) run on oneDNN's own tensors, forward and backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, output_padding, groups, dilation):
        ctx.save_for_backward(x, weight)
        ctx.conv = (list(stride), list(padding), list(dilation), True, list(output_padding), groups)
        ctx.has_bias = bias is not None
        if _onednn(x) and _im2col(x):
            return torch.ops.aten.convolution(x.contiguous().to_mkldnn(), weight, bias, *ctx.conv).to_dense()
        return torch.ops.aten.convolution(x, weight, bias, *ctx.conv)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        bias_sizes = [weight.shape[1] * ctx.conv[-1]] if ctx.has_bias else None
        mask = [ctx.needs_input_grad[0], True, ctx.has_bias]
        if _onednn(x) and _im2col(x):
            grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
                grad.contiguous().to_mkldnn(), x.contiguous().to_mkldnn(), weight, bias_sizes, *ctx.conv,
                mask)
            grad_x = grad_x.to_dense() if mask[0] else None
        else:
            grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
                grad, x, weight, bias_sizes, *ctx.conv, mask)
        return grad_x, grad_weight, grad_bias if ctx.has_bias else None, None, None, None, None, None


class SteeredConvTranspose3d(nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` on oneDNN for fp32 on a CPU whatever the input's size (``_ConvTranspose3d``),
    PyTorch's choice otherwise; under autocast it computes in autocast's dtype, as ``SteeredConv3d``."""

    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        if self.padding_mode != "zeros" or output_size is not None:
            return super().forward(x, output_size)
        return conv_transpose3d(x, self.weight, self.bias, self.stride, self.padding, self.output_padding,
                                self.groups, self.dilation)


def conv_transpose3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding,
                     output_padding, groups: int, dilation) -> torch.Tensor:
    """``F.conv_transpose3d`` (differentiable, in autocast's dtype under autocast) on oneDNN for fp32 on a
    CPU whatever the input's size: a thin slab would otherwise take PyTorch's vol2col kernel, whose column
    buffer is ~15x the layer's input (``_ConvTranspose3d``)."""
    x, weight, bias = autocast_operands(x, weight, bias)
    with torch.autocast(x.device.type, enabled=False):
        return _ConvTranspose3d.apply(x, weight, bias, stride, padding, output_padding, groups, dilation)


def steer_convolutions(model: nn.Module, transposed: bool = False) -> int:
    """Convert ``model``'s plain 3D convolutions (``PLAIN_CONV3D``) in place to ``SteeredConv3d``
    (parameters, names and state dict unchanged), so that an unsplit model computes on the kernels its split
    copy would.

    Args:
        model: any module; layers already converted (``spatial.SpatialConv3d``, ``SteeredConv3d``) and
            other subclasses of ``nn.Conv3d`` are left as they are.
        transposed: plain ``nn.ConvTranspose3d`` layers too, to ``SteeredConvTranspose3d`` (pipeline stages:
            oneDNN at any micro-batch size; a split model's slabs keep PyTorch's choice for these).

    Returns:
        How many layers were converted.
    """
    converted = 0
    for module in model.modules():
        if type(module) in PLAIN_CONV3D:
            module.__class__ = SteeredConv3d
            converted += 1
        elif transposed and type(module) is nn.ConvTranspose3d:
            module.__class__ = SteeredConvTranspose3d
            converted += 1
    return converted


def kernel_choice(model: nn.Module, device: torch.device, dtype: torch.dtype) -> str:
    """What ``model``'s 3D convolutions run on for ``dtype`` inputs on ``device``, for a benchmark's record.

    Args:
        model: any module.
        device: where it runs.
        dtype: the convolutions' input dtype (autocast's, or fp32).

    Returns:
        ``"onednn"``: every one is steered to oneDNN (``SteeredConv3d`` or a split model's
        ``spatial.SpatialConv3d``, for fp32 on a CPU); ``"pytorch"``: PyTorch's own choice by size (on a CPU
        in fp32 its im2col kernel for thin batch-1 inputs, oneDNN otherwise; on other devices and dtypes
        steered and plain layers alike), also for a model without 3D convolutions; ``"mixed"``: some are
        steered and some are not.
    """
    convs = [m for m in model.modules() if isinstance(m, nn.Conv3d)]
    steered = [type(m) not in PLAIN_CONV3D for m in convs]
    if not any(steered) or not _onednn(torch.empty(0, device=device, dtype=dtype)):
        return "pytorch"
    return "onednn" if all(steered) else "mixed"
