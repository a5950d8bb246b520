"""Pure model builders: a MONAI 3D ``UNet`` from a model config (no training logic here)."""
from __future__ import annotations

import math

from monai.networks.nets import UNet
from torch import nn

from lampseg.config import enum_value


def build_model(model_cfg, in_channels: int, out_channels: int) -> nn.Module:
    """Build a MONAI 3D U-Net.

    Args:
        model_cfg: the ``model`` config node (channels, strides, num_res_units, kernel_size, norm, dropout).
        in_channels: number of input modalities.
        out_channels: number of output channels (classes incl. background, or regions).

    Returns:
        The ``monai.networks.nets.UNet``.
    """
    norm = enum_value(model_cfg.norm)
    if norm == "group":
        # Group norm with at most 8 groups that divide the narrowest level.
        groups = math.gcd(8, min(model_cfg.channels))
        norm_arg: object = ("group", {"num_groups": groups})
    else:
        norm_arg = norm
    return UNet(
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
    )


def size_divisor(model_cfg) -> int:
    """Spatial sizes must be multiples of this for a U-Net with these strides (whole-volume padding)."""
    return math.prod(model_cfg.strides)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
