"""Whole-volume and sliding-window inference behind ``inference.*`` (validation, evaluate, predict)."""
from __future__ import annotations

import contextlib
import itertools

import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from torch import nn

from lampseg.config import enum_value

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # trainer.precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast context for ``trainer.precision`` (fp32: no autocast; fp16 only on CUDA)."""
    precision = enum_value(precision)
    if precision == "fp32" or (precision == "fp16" and device.type != "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def pad_to_multiple(x: torch.Tensor, divisor: int) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Zero-pad the last three axes up to multiples of ``divisor``.

    Returns:
        The padded tensor and the slices that crop the result back to the input's spatial size.
    """
    shape = x.shape[-3:]
    extra = [(-s) % divisor for s in shape]
    pad: list[int] = []
    for e in reversed(extra):  # F.pad lists the last axis first
        pad += [e // 2, e - e // 2]
    crop = tuple(slice(e // 2, e // 2 + s) for e, s in zip(extra, shape))
    return (F.pad(x, pad) if any(extra) else x), (Ellipsis, *crop)


def _forward(model: nn.Module, x: torch.Tensor, inf_cfg, roi_size: list[int], divisor: int) -> torch.Tensor:
    if enum_value(inf_cfg.mode) == "whole":
        padded, crop = pad_to_multiple(x, divisor)
        return model(padded)[crop].float()
    blend = enum_value(inf_cfg.blend)
    return sliding_window_inference(x, roi_size=roi_size, sw_batch_size=inf_cfg.sw_batch_size,
                                    predictor=lambda t: model(t).float(), overlap=inf_cfg.overlap,
                                    mode=blend, padding_mode="constant", cval=0.0).float()


@torch.no_grad()
def infer(model: nn.Module, image: torch.Tensor, inf_cfg, roi_size: list[int], divisor: int,
          precision: str = "fp32") -> torch.Tensor:
    """Network outputs (logits) for whole volumes.

    Args:
        model: the segmentation network (in eval mode).
        image: (B, C, X, Y, Z) on the model's device, any spatial size.
        inf_cfg: ``inference`` config (mode whole|sliding, overlap, blend, sw_batch_size, tta).
        roi_size: sliding-window size (``inference.patch_size`` or the training patch).
        divisor: spatial multiple the network needs (product of strides).
        precision: fp32|bf16|fp16 autocast.

    Returns:
        float32 logits (B, K, X, Y, Z) on the image's device. With ``tta`` the logits are averaged over
        all 8 mirrorings (each flipped back).
    """
    flips = [()]
    if inf_cfg.tta:
        flips = [axes for r in range(4) for axes in itertools.combinations((2, 3, 4), r)]
    total = None
    with autocast(image.device, precision):
        for axes in flips:
            x = torch.flip(image, axes) if axes else image
            out = _forward(model, x, inf_cfg, roi_size, divisor)
            out = out.to(image.device)  # a pipelined model answers on its last stage's device
            out = torch.flip(out, axes) if axes else out
            total = out if total is None else total + out
    return total / len(flips)
