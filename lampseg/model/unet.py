"""Pure model builders: a MONAI 3D ``UNet`` from a model config (no training logic here)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from monai.networks.nets import UNet
from torch import nn

from lampseg.config import enum_value
from lampseg.model.channels_last import channels_last_layers


def build_model(model_cfg, in_channels: int, out_channels: int) -> nn.Module:
    """Build a MONAI 3D U-Net.

    Args:
        model_cfg: the ``model`` config node (channels, strides, num_res_units, kernel_size, norm, dropout).
        in_channels: number of input modalities.
        out_channels: number of output channels (classes incl. background, or regions).

    Returns:
        The ``monai.networks.nets.UNet``, its instance norms and convolutions given channels-last CPU
        inference paths (``model.channels_last``; same weights and state-dict keys).
    """
    norm = enum_value(model_cfg.norm)
    if norm == "group":
        # Group norm with at most 8 groups that divide the narrowest level.
        groups = math.gcd(8, min(model_cfg.channels))
        norm_arg: object = ("group", {"num_groups": groups})
    else:
        norm_arg = norm
    return channels_last_layers(UNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=tuple(model_cfg.channels),
        strides=tuple(model_cfg.strides),
        kernel_size=model_cfg.kernel_size,
        up_kernel_size=model_cfg.kernel_size,
        num_res_units=model_cfg.num_res_units,
        norm=norm_arg,
        dropout=model_cfg.dropout,
    ))


def size_divisor(model_cfg) -> int:
    """Spatial sizes must be multiples of this for a U-Net with these strides (whole-volume padding)."""
    return math.prod(model_cfg.strides)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def receptive_field(model_cfg) -> int:
    """Voxels along one axis that can change one output voxel of the ``model`` config's U-Net.

    Measured, not derived: the gradient of the centre output with respect to a long thin input, on a copy
    with one channel per level and batch norm (instance and group norm mix every voxel through their
    statistics, which is not the convolutional reach this reports). Context beyond it reaches a voxel only
    through normalisation statistics, so whole-volume inputs help context-dependent labels only as far as
    this reach (``bench context``).
    """
    probe_cfg = SimpleNamespace(channels=[1] * len(model_cfg.channels), strides=list(model_cfg.strides),
                                kernel_size=model_cfg.kernel_size, num_res_units=model_cfg.num_res_units,
                                norm="batch", dropout=0.0)
    model = build_model(probe_cfg, 1, 1).eval()
    divisor = size_divisor(model_cfg)
    length = 4 * divisor
    while True:
        x = torch.randn(1, 1, length, divisor, divisor, generator=torch.Generator().manual_seed(0),
                        requires_grad=True)
        out = model(x)
        reaches = []
        for phase in range(divisor):  # strided layers reach differently from even and odd outputs
            (grad,) = torch.autograd.grad(out[0, 0, length // 2 + phase, divisor // 2, divisor // 2], x,
                                          retain_graph=True)
            reached = (grad.abs().sum((0, 1, 3, 4)) > 0).nonzero().flatten()
            if reached.min() == 0 or reached.max() == length - 1:  # touches the probe's end: longer
                break
            reaches.append(int(reached.max() - reached.min() + 1))
        else:
            return max(reaches)
        length *= 2
