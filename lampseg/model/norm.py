"""Instance normalisation that keeps a channels-last volume channels-last (pure PyTorch).

PyTorch's ``instance_norm`` runs through ``batch_norm`` on a ``(1, B*C, ...)`` view, which needs a contiguous
(channels-first) tensor: a channels-last input is copied to channels-first, normalised there, and the next
convolution copies it back. On a whole 4.7 M-voxel volume of 16 channels (2-core Xeon, fp32, one thread) that
norm took 1.16 s and the following convolution 1.70 s instead of 0.70 s. Here the statistics come from the
channels-last memory read as ``(B, voxels, C)`` rows, and one ``addcmul`` writes the channels-last result:
0.39 s, same values within 1e-6 (``tests/test_model.py``).

Used where it was measured: inference (no autograd graph) on the CPU. Training keeps PyTorch's kernel, whose
saved tensors the memory planner was calibrated on.

    model = build_model(cfg.model, 4, 3)   # its InstanceNorm3d layers are this module's
"""
from __future__ import annotations

import torch
from torch import nn

CHUNK_BYTES = 4 << 20  # float32 bytes per chunk: a chunk's temporaries stay in cache
ROW_VALUES = 16  # values per row at least (one AVX-512 register of float32): narrow layers are folded


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
    voxels = x[0, 0].numel()
    # fold consecutive voxels into one row so that a row fills a vector register (4 channels: 4 voxels)
    fold = next((f for f in range(max(1, ROW_VALUES // c), 0, -1) if voxels % f == 0), 1)
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


class InstanceNorm3d(nn.InstanceNorm3d):
    """``torch.nn.InstanceNorm3d`` with the channels-last path above where it was measured (module
    docstring); anywhere else PyTorch's own. Same parameters, buffers and state-dict keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.track_running_stats or torch.is_grad_enabled() or x.device.type != "cpu" or x.dim() != 5
                or x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last_3d)):
            return super().forward(x)
        return channels_last_instance_norm(x, self.weight, self.bias, self.eps)


def channels_last_norms(model: nn.Module) -> nn.Module:
    """Give ``model``'s ``torch.nn.InstanceNorm3d`` layers the channels-last path (in place; the weights
    and their names are unchanged). Returns ``model``."""
    for module in model.modules():
        if type(module) is nn.InstanceNorm3d:
            module.__class__ = InstanceNorm3d
    return model
