"""Convolution kernels for slabs: fp32 CPU convolutions steered to oneDNN whatever a slab's size.

``spatial._HaloConv`` convolves every haloed slab with ``conv3d`` and differentiates it with
``conv3d_backward``; on other devices and dtypes they are PyTorch's own ``conv3d`` and
``convolution_backward``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
                     padding, dilation, groups: int) -> tuple[torch.Tensor, ...]:
    """Gradients of ``conv3d`` for its input, weight and bias. ``convolution_backward`` takes no backend
    argument, so an fp32 CPU one that PyTorch would send to im2col runs on views with the split axis last
    (a permutation of the axes, and of the kernel's, is the same convolution): the choice then sees the
    unsplit extent and takes oneDNN (3x faster than im2col for a 16-channel slab of 16 rows, measured,
    and without its buffers; oneDNN copies the permuted views, so only where im2col would be chosen)."""
    bias_sizes = [weight.shape[0]] if has_bias else None
    mask = [True, True, has_bias]
    if not (_onednn(x) and _im2col(x) and not _im2col(x.permute(_LAST))):  # permuted copies only if it pays
        return torch.ops.aten.convolution_backward(grad, x, weight, bias_sizes, list(stride), list(padding),
                                                   list(dilation), False, [0, 0, 0], groups, mask)
    grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad.permute(_LAST), x.permute(_LAST), weight.permute(_LAST), bias_sizes, list(stride)[::-1],
        list(padding)[::-1], list(dilation)[::-1], False, [0, 0, 0], groups, mask)
    return grad_x.permute(_LAST), grad_weight.permute(_LAST), grad_bias
