"""Whole-volume and sliding-window inference behind ``inference.*`` (validation, evaluate, predict)."""
from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable
from functools import partial
from typing import TypeVar

import torch
import torch.distributed as dist
from monai.inferers import sliding_window_inference
from torch import nn

from lampseg.config import enum_value
from lampseg.parallel.agreement import (
    ERROR,
    OUT_OF_MEMORY,
    PeerFailed,
    agreed_outcome,
    agreeing,
    report_failure,
)
from lampseg.parallel.parallelize import split_for_inference
from lampseg.parallel.slabs import SpatialInference
from lampseg.planner.inference import (
    InferenceMemory,
    ModeChoice,
    choose_mode,
    largest_fitting_window,
    windows_to_try,
)
from lampseg.runtime.device import autocast
from lampseg.runtime.memory import is_out_of_memory, release_memory

T = TypeVar("T")


def pad_to_multiple(x: torch.Tensor, divisor: int, dtype: torch.dtype | None = None,
                    memory_format: torch.memory_format = torch.contiguous_format
                    ) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Zero-pad the last three axes up to multiples of ``divisor`` (centred).

    Args:
        x: (B, C, X, Y, Z).
        divisor: the spatial multiple.
        dtype: the padded tensor's dtype (default: ``x``'s); casting here fuses the cast the network's
            first layer would make anyway into the one copy padding needs.
        memory_format: the padded tensor's layout (``torch.channels_last_3d`` for a channels-last model,
            which would otherwise reorder its input itself).

    Returns:
        The padded tensor and the slices that crop the result back to the input's spatial size.
    """
    shape = x.shape[-3:]
    extra = [(-s) % divisor for s in shape]
    crop = (Ellipsis, *(slice(e // 2, e // 2 + s) for e, s in zip(extra, shape)))
    dtype = dtype or x.dtype
    if not any(extra) and dtype == x.dtype and x.is_contiguous(memory_format=memory_format):
        return x, crop
    padded = torch.empty((*x.shape[:2], *(s + e for s, e in zip(shape, extra))), dtype=dtype, device=x.device,
                         memory_format=memory_format)
    if any(extra):
        padded.zero_()
    padded[crop] = x
    return padded, crop


def input_format(model: nn.Module, x: torch.Tensor) -> tuple[torch.dtype, torch.memory_format]:
    """The dtype and layout the model's first convolution will convert ``x`` to (autocast, channels-last)."""
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    if type(model).__module__.startswith("torchgpipe"):
        dtype = x.dtype  # its stages run in worker threads, where this thread's autocast does not apply
    weight = next((p for p in model.parameters() if p.dim() == 5), None)
    channels_last = weight is not None and not weight.is_contiguous() and \
        weight.is_contiguous(memory_format=torch.channels_last_3d)
    return dtype, torch.channels_last_3d if channels_last else torch.contiguous_format


def _forward(model: nn.Module, x: torch.Tensor, mode: str, inf_cfg, roi_size: list[int],
             divisor: int) -> torch.Tensor:
    if mode == "whole":
        padded, crop = pad_to_multiple(x, divisor, *input_format(model, x))
        return model(padded)[crop].float()
    blend = enum_value(inf_cfg.blend)
    return sliding_window_inference(x, roi_size=roi_size, sw_batch_size=inf_cfg.sw_batch_size,
                                    predictor=lambda t: model(t).float(), overlap=inf_cfg.overlap,
                                    mode=blend, padding_mode="constant", cval=0.0).float()


def _infer_mode(model: nn.Module, image: torch.Tensor, mode: str, inf_cfg, roi_size: list[int], divisor: int,
                precision: str) -> torch.Tensor:
    flips = [()]
    if inf_cfg.tta:
        flips = [axes for r in range(4) for axes in itertools.combinations((2, 3, 4), r)]
    total = None
    with autocast(image.device, precision):
        for axes in flips:
            x = torch.flip(image, axes) if axes else image
            out = _forward(model, x, mode, inf_cfg, roi_size, divisor)
            out = out.to(image.device)  # a pipelined model answers on its last stage's device
            out = torch.flip(out, axes) if axes else out
            total = out if total is None else total + out
    return total if len(flips) == 1 else total / len(flips)


@torch.no_grad()
def infer(model: nn.Module, image: torch.Tensor, inf_cfg, roi_size: list[int], divisor: int,
          precision: str = "fp32", memory: InferenceMemory | None = None, report: dict | None = None,
          start: ModeChoice | None = None) -> torch.Tensor:
    """Network outputs (logits) for whole volumes.

    Args:
        model: the segmentation network (in eval mode).
        image: (B, C, X, Y, Z) on the model's device, any spatial size.
        inf_cfg: ``inference`` config (mode whole|sliding|auto, overlap, blend, sw_batch_size, tta).
        roi_size: sliding-window size (``inference.patch_size`` or the training patch).
        divisor: spatial multiple the network needs (product of strides).
        precision: fp32|bf16|fp16 autocast.
        memory: the model's memory estimate and budget (``InferenceMemory.from_config``); needed for
            ``mode=auto``, which chooses whole volume or the largest sliding window within its budget and,
            on an out-of-memory error, releases memory, warns once and falls back to a smaller choice.
            A model split into slabs decides with its group: the first rank chooses, and an out-of-memory
            error on any rank moves every rank to the same smaller choice.
        report: filled with what ``auto`` chose (``ModeChoice.to_dict()``), when given.
        start: ``auto``'s first choice when already made (a fallback of ``slab_inference``).

    Returns:
        float32 logits (B, K, X, Y, Z) on the image's device. With ``tta`` the logits are averaged over
        all 8 mirrorings (each flipped back).
    """
    mode = enum_value(inf_cfg.mode)
    if mode != "auto":
        return _infer_mode(model, image, mode, inf_cfg, roi_size, divisor, precision)
    if memory is None:
        raise ValueError("inference.mode=auto needs the model's InferenceMemory (memory=...)")
    volume = list(image.shape[-3:])
    choice = start or agreed_choice(model, memory, volume, divisor, inf_cfg.sw_batch_size)
    while True:
        net = split_for_inference(model, choice.split, image.device) if choice.split > 1 else model
        where = choice.mode if choice.window is None else f"{choice.mode} {choice.window}"
        logits, failed = attempt(model, partial(_infer_mode, net, image, choice.mode, inf_cfg,
                                                choice.window or roi_size, divisor, precision), where)
        if failed is None:
            break
        release_memory(image.device)
        choice = next_choice(memory, volume, divisor, inf_cfg.sw_batch_size, choice, failed)
    if report is not None:
        report.update(choice.to_dict())
    return logits


def agreed_choice(model: nn.Module, memory: InferenceMemory, volume: list[int], divisor: int,
                  sw_batch_size: int) -> ModeChoice:
    """``choose_mode``'s choice; for a model split into slabs, the group's first rank's, sent to all (one
    rank decides, so no rank runs a mode the others did not choose)."""
    choice = choose_mode(memory, volume, divisor, sw_batch_size)
    if isinstance(model, SpatialInference):
        shared = [choice]
        dist.broadcast_object_list(shared, group=model.group, group_src=0)
        choice = shared[0]
    return choice


def attempt(model: nn.Module, run: Callable[[], T], where: str) -> tuple[T | None, str | None]:
    """``run()``'s result, or what ran out of memory (``where`` and the error). For a model split into
    slabs the group agrees (``parallel.agreement.agreeing``): a rank that runs out of memory tells the
    others at their next collective, so every rank returns the same failure and none is left waiting;
    another error on any rank is raised on every rank.

    Returns:
        (the result, None), or (None, the failure).
    """
    if not isinstance(model, SpatialInference):
        try:
            return run(), None
        except Exception as error:  # noqa: BLE001 - only out-of-memory errors are handled, others re-raised
            if not is_out_of_memory(error):
                raise
            return None, f"{where}: {error}"[:300]
    device = _device(model)
    with agreeing(model.group):
        try:
            result = run()
        except PeerFailed as peer:
            if peer.code != OUT_OF_MEMORY:
                raise
            return None, f"{where}: {peer}"
        except Exception as error:
            code = OUT_OF_MEMORY if is_out_of_memory(error) else ERROR
            report_failure(device, code)
            if code != OUT_OF_MEMORY:
                raise
            return None, f"{where}: {error}"[:300]
        code = agreed_outcome(device)
    if code == ERROR:
        raise PeerFailed(code)
    return (result, None) if not code else (None, f"{where}: {PeerFailed(code)}")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def next_choice(memory: InferenceMemory, volume: list[int], divisor: int, sw_batch_size: int,
                choice: ModeChoice, failed: str) -> ModeChoice:
    """The sliding window to fall back to after ``choice`` ran out of memory (``failed``), warned once.

    Raises:
        torch.OutOfMemoryError: even the smallest window ran out.
    """
    below = None if choice.window is None else max(choice.window)
    windows = windows_to_try(volume, divisor, below)
    if not windows:
        raise torch.OutOfMemoryError(f"inference.mode=auto: out of memory even with the smallest sliding "
                                     f"window ({failed})")
    step_down = (windows[0], memory.sliding_gb(volume, windows[0], sw_batch_size))  # when none fits
    window, need = largest_fitting_window(memory, volume, windows, sw_batch_size) or step_down
    _warn_fallback_once(f"inference.mode=auto: out of memory ({failed}); falling back to sliding "
                        f"windows of {window}")
    return ModeChoice("sliding", window, need, memory.budget_gb,
                      f"fell back after out of memory: {choice.reason}", [*choice.fallbacks, failed])


_warned = False


def _warn_fallback_once(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(message, RuntimeWarning, stacklevel=3)
