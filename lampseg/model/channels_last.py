"""Inference paths for channels-last 3D layers on the CPU (pure PyTorch).

Two layers lose most of their time to their memory layout rather than to arithmetic, so whole volumes paid
more per voxel than sliding windows (``bench inference``; a 2-core Xeon with AMX, one thread unless said):

- **Instance norm.** PyTorch's ``instance_norm`` runs through ``batch_norm`` on a ``(1, B*C, ...)`` view,
  which needs a channels-first tensor: a channels-last input is copied channels-first, normalised there, and
  the next convolution copies it back. On a whole 4.7 M-voxel volume of 16 channels (fp32) that norm took
  1.05 s and the following convolution 1.70 s instead of 0.70 s. Here the statistics come from the
  channels-last memory read as ``(B, voxels, C)`` rows, and one ``addcmul`` writes the result channels-last:
  0.40 s, the same values within 1e-6.
- **Narrow convolutions** (fewer than 16 channels in and out, such as a U-Net's last 4 -> 4 convolution at
  full resolution). oneDNN's bf16 kernels fill their vector registers with 16 channels; with 4 the 4 -> 4
  convolution cost 21 ns a voxel on a whole volume and 9 ns on 2 x 96^3 windows (2 threads). Channels-last
  memory already holds ``fold`` voxels along the last axis as ``fold x C`` channels, so the same convolution
  runs as a ``fold*C -> fold*C`` one over a volume ``fold`` times shorter, its weight rearranged (zeros
  where a folded voxel does not reach): 4.7 and 4.0 ns a voxel. The products are the same; fp32 gains
  nothing there (oneDNN's fp32 kernel is not register-starved), so it folds under bf16/fp16 only.

Both apply at inference (no autograd graph): training keeps PyTorch's kernels, whose saved tensors the
memory planner was calibrated on.

    model = build_model(cfg.model, 4, 3)   # its InstanceNorm3d and Conv3d layers are this module's
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CHUNK_BYTES = 4 << 20  # float32 bytes per chunk: a chunk's temporaries stay in cache
REGISTER_VALUES = 16  # values one vector register holds (AVX-512, float32), which narrow layers leave empty


def _fold(channels: int, length: int) -> int:
    """Consecutive voxels to fold into one row of ``fold * channels`` values: the most that fit a vector
    register (``REGISTER_VALUES``) and divide ``length`` (1: none, for 16 channels or more)."""
    return next((f for f in range(REGISTER_VALUES // channels, 1, -1) if length % f == 0), 1)


def _rows(x: torch.Tensor, fold: int) -> torch.Tensor:
    """``x``'s channels-last memory as ``(B, voxels / fold, fold * C)`` rows (a view)."""
    return x.permute(0, 2, 3, 4, 1).reshape(x.shape[0], -1, fold * x.shape[1])


def _moments(rows: torch.Tensor, chunk: int, fold: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (sample, channel) mean and biased variance of ``rows`` (``_rows``), in float32, reading it once:
    each cache-sized chunk's column means and centred sums of squares, merged as in Chan et al.'s parallel
    variance (exact for any mean, unlike E[x^2] - E[x]^2)."""
    b, n, width = rows.shape
    means, sums_sq, counts = [], [], []
    for part in rows.split(chunk, dim=1):
        values = part.float()
        means.append(values.mean(1))
        sums_sq.append((values - means[-1].unsqueeze(1)).square_().sum(1))
        counts += [part.shape[1]] * fold
    # every (chunk, fold) column is one group of each channel's values
    c = width // fold
    group_means = torch.stack(means).view(-1, b, fold, c).transpose(1, 2).reshape(-1, b, c)
    group_sq = torch.stack(sums_sq).view(-1, b, fold, c).sum((0, 2))
    weights = torch.tensor(counts, dtype=torch.float32, device=rows.device).view(-1, 1, 1)
    total = n * fold
    mean = (group_means * weights).sum(0) / total
    variance = (group_sq + ((group_means - mean).square() * weights).sum(0)) / total
    return mean, variance


def channels_last_instance_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                                eps: float) -> torch.Tensor:
    """Instance normalisation of a channels-last ``(B, C, X, Y, Z)`` tensor, returned channels-last.

    Args:
        x: the input, contiguous in ``torch.channels_last_3d``.
        weight: per-channel scale (``affine=True``) or None.
        bias: per-channel shift or None.
        eps: added to the variance.

    Returns:
        ``(x - mean) / sqrt(var + eps) * weight + bias`` per sample and channel (biased variance, as
        ``torch.nn.functional.instance_norm``), in ``x``'s dtype and layout; statistics in float32.
    """
    b, c = x.shape[:2]
    fold = _fold(c, x[0, 0].numel())  # 4 channels: rows of 4 voxels
    chunk = max(1, CHUNK_BYTES // (4 * fold * c))
    rows = _rows(x, fold)
    mean, variance = _moments(rows, chunk, fold)
    scale = torch.rsqrt(variance + eps)
    shift = -mean * scale
    if weight is not None:
        scale, shift = scale * weight, shift * weight + bias
    scale, shift = scale.repeat(1, fold).unsqueeze(1), shift.repeat(1, fold).unsqueeze(1)
    out = torch.empty_like(x, memory_format=torch.channels_last_3d)
    for part, target in zip(rows.split(chunk, dim=1), _rows(out, fold).split(chunk, dim=1)):
        if x.dtype == torch.float32:
            torch.addcmul(shift, part, scale, out=target)
        else:  # in float32 on a cache-sized copy, rounded once into x's dtype
            values = part.float()
            target.copy_(torch.addcmul(shift, values, scale, out=values))
    return out


def _cpu_inference(x: torch.Tensor) -> bool:
    """Whether ``x`` takes this module's paths: a channels-last 5-D CPU tensor with no autograd graph."""
    return (not torch.is_grad_enabled() and x.device.type == "cpu" and x.dim() == 5 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last_3d))


class InstanceNorm3d(nn.InstanceNorm3d):
    """``torch.nn.InstanceNorm3d`` with the channels-last path above where it was measured (module
    docstring); anywhere else PyTorch's own. Same parameters, buffers and state-dict keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.track_running_stats or not _cpu_inference(x):
            return super().forward(x)
        return channels_last_instance_norm(x, self.weight, self.bias, self.eps)


def fold_weight(weight: torch.Tensor, fold: int) -> torch.Tensor:
    """A stride-1 convolution's weight ``(Co, Ci, kx, ky, k)`` (``k`` odd, padded by ``k // 2``) rearranged
    for ``fold`` voxels along the last axis folded into channels: ``(fold*Co, fold*Ci, kx, ky, kq)``.

    Folded channel ``r*C + c`` is channel ``c`` of voxel ``fold*j + r`` (channels-last order). Output voxel
    ``fold*j + a`` reads input voxel ``fold*j + a + d - k//2`` through tap ``d``, which is folded voxel
    ``j + q`` at offset ``r``: ``d = fold*q + r - a + k//2``; taps out of ``[0, k)`` stay zero.
    """
    co, ci, kx, ky, k = weight.shape
    pad = k // 2
    low, high = -(-pad // fold), (fold - 1 + k - 1 - pad) // fold  # the folded voxels one output reaches
    out = weight.new_zeros(fold * co, fold * ci, kx, ky, high + low + 1)
    for a in range(fold):
        for r in range(fold):
            for q in range(-low, high + 1):
                d = fold * q + r - a + pad
                if 0 <= d < k:
                    out[a * co:(a + 1) * co, r * ci:(r + 1) * ci, :, :, q + low] = weight[..., d]
    return out.contiguous(memory_format=torch.channels_last_3d)


def folded_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: tuple,
                  fold: int) -> torch.Tensor:
    """A stride-1 3D convolution of channels-last ``x`` with ``fold`` voxels of the last axis folded into
    channels (``fold_weight``); the same result as ``F.conv3d(x, weight, bias, padding=padding)``, with
    ``padding[2] == k // 2`` and the last axis a multiple of ``fold``."""
    b, c, *size = x.shape
    folded = x.permute(0, 2, 3, 4, 1).reshape(b, *size[:2], size[2] // fold, fold * c).permute(0, 4, 1, 2, 3)
    w = fold_weight(weight, fold)
    y = F.conv3d(folded, w, None if bias is None else bias.repeat(fold),
                 padding=(padding[0], padding[1], (w.shape[-1] - 1) // 2))
    x_out, y_out, z_folded = y.shape[2:]
    return y.permute(0, 2, 3, 4, 1).reshape(b, x_out, y_out, z_folded * fold, -1).permute(0, 4, 1, 2, 3)


class Conv3d(nn.Conv3d):
    """``torch.nn.Conv3d`` that folds voxels into channels when it is narrow (module docstring); anywhere
    else PyTorch's own. Same parameters and state-dict keys."""

    def _fold_for(self, x: torch.Tensor) -> int:
        """Voxels of the last axis to fold into channels for ``x`` (1: none)."""
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        widest = max(self.in_channels, self.out_channels)
        k = self.kernel_size[2]
        if (widest >= REGISTER_VALUES or dtype not in (torch.bfloat16, torch.float16) or self.groups != 1
                or self.stride != (1, 1, 1) or self.dilation != (1, 1, 1) or self.padding_mode != "zeros"
                or isinstance(self.padding, str) or k % 2 == 0 or self.padding[2] != k // 2
                or not _cpu_inference(x)):
            return 1
        return _fold(widest, x.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fold = self._fold_for(x)
        if fold == 1:
            return super().forward(x)
        return folded_conv3d(x, self.weight, self.bias, self.padding, fold)


def channels_last_layers(model: nn.Module) -> nn.Module:
    """Give ``model``'s ``torch.nn.InstanceNorm3d`` and ``torch.nn.Conv3d`` layers this module's inference
    paths (in place; the weights and their names are unchanged). Returns ``model``."""
    for module in model.modules():
        if type(module) is nn.InstanceNorm3d:
            module.__class__ = InstanceNorm3d
        elif type(module) is nn.Conv3d:
            module.__class__ = Conv3d
    return model
