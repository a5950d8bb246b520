"""Whole-volume inference over slabs (``parallel=spatial``) that never gathers a volume's logits: each rank
reads its rows of the input, computes its rows of the logits, and turns them into its rows of the result.

    torchrun --nproc_per_node 2 -m lampseg evaluate ckpt=RUN/checkpoints/best.pt \
        parallel=spatial parallel.sp=2

What a rank holds: its slab of the input (read from the memory-mapped cache, or cut from an image), its slab
of the logits, and its slab of the masks. Dice comes from overlap counts all-reduced over the slabs (exactly
the one-process Dice); a whole map exists only where one is asked for, as one byte per voxel on one rank:
the label map ``predict`` writes, the masks HD95 and the training overlay need.

Decisions are collective: ``inference.mode=auto`` is decided by the group's first rank and followed by all,
and an out-of-memory error on any rank makes every rank fall back together to sliding windows (``infer``).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.distributed as dist

from lampseg.config import ConfigError, enum_value
from lampseg.engine.inference import agreed_choice, attempt, infer, input_format, next_choice
from lampseg.engine.metrics import dice_from_counts, hd95, overlap_counts
from lampseg.parallel.slabs import SpatialInference, gather_slabs
from lampseg.planner.inference import InferenceMemory
from lampseg.runtime.device import autocast
from lampseg.runtime.memory import release_memory

Reader = Callable[[int, int], np.ndarray]  # (start, stop) rows -> (C, stop - start, Y, Z) preprocessed image


@dataclass
class SlabLogits:
    """This rank's rows of one volume's logits.

    Attributes:
        logits: float32 (1, K, stop - start, Y, Z) (the volume's unpadded rows ``start:stop``).
        start: first row of the volume this rank holds.
        stop: one past its last row (``start == stop``: a rank whose slab is all padding).
        lengths: every rank's row count, in group order (they add up to the volume's rows).
    """

    logits: torch.Tensor
    start: int
    stop: int
    lengths: list[int]


def slab_applies(model, inf_cfg) -> bool:
    """Whether ``model`` infers whole volumes slab by slab: split into slabs (``SpatialInference``), with a
    whole-volume or automatic mode and no test-time mirroring (a mirrored volume's rows belong to other
    ranks: ``inference.tta`` runs on gathered logits)."""
    return isinstance(model, SpatialInference) and enum_value(inf_cfg.mode) in ("whole", "auto") \
        and not inf_cfg.tta


def infer_slab(model: SpatialInference, read: Reader, shape: Sequence[int], divisor: int, precision: str,
               device: torch.device) -> SlabLogits:
    """This rank's rows of a volume's logits from this rank's rows of its image.

    The volume is zero-padded (centred) to multiples of ``divisor`` as one process pads it
    (``inference.pad_to_multiple``); each rank's rows of the padded volume are ``model.rows``, and it reads
    only the image rows they cover.

    Args:
        model: the split model; every rank of its group calls this for the same volume.
        read: reads rows ``start:stop`` of the preprocessed image as (C, rows, Y, Z).
        shape: the volume's spatial shape (X, Y, Z).
        divisor: spatial multiple the network needs.
        precision: fp32|bf16|fp16 autocast.
        device: this rank's device.
    """
    offsets = [((-s) % divisor) // 2 for s in shape]
    padded = [s + (-s) % divisor for s in shape]

    def unpadded(start: int, stop: int) -> tuple[int, int]:
        lo = min(max(start - offsets[0], 0), shape[0])
        return lo, max(min(stop - offsets[0], shape[0]), lo)

    try:
        bounds = model.bounds(padded[0])
    except ValueError as error:
        raise ConfigError(f"config key 'parallel.sp': a volume of {list(shape)} voxels (padded to "
                          f"{padded}) is too small for {model.slabs} slabs: {error}; use fewer slabs or "
                          f"inference.mode=sliding") from error
    first, last = bounds[model.rank]
    lo, hi = unpadded(first, last)
    rows = slice(lo + offsets[0] - first, hi + offsets[0] - first)
    inner = tuple(slice(o, o + s) for o, s in zip(offsets[1:], shape[1:]))
    with autocast(device, precision):
        image = torch.from_numpy(np.ascontiguousarray(read(lo, hi), dtype=np.float32))  # may have 0 rows
        dtype, layout = input_format(model.module, torch.empty(0, device=device))
        x = torch.empty((1, image.shape[0], last - first, *padded[1:]), dtype=dtype, device=device,
                        memory_format=layout).zero_()
        x[(0, slice(None), rows, *inner)] = image.to(device)
        del image
        out = model.forward_slab(x)
    del x
    logits = out[(slice(None), slice(None), rows, *inner)].float()
    return SlabLogits(logits, lo, hi, [b - a for a, b in (unpadded(*bound) for bound in bounds)])


def pack_masks(masks: torch.Tensor) -> torch.Tensor:
    """Boolean (N, X, Y, Z) masks as one integer per voxel (bit ``n`` = mask ``n``): uint8 for up to 8."""
    dtype = torch.uint8 if masks.shape[0] <= 8 else torch.int64
    packed = torch.zeros(masks.shape[1:], dtype=dtype, device=masks.device)
    for n in range(masks.shape[0]):
        packed |= masks[n].to(dtype) << n
    return packed


def unpack_masks(packed: torch.Tensor, count: int) -> torch.Tensor:
    """``pack_masks``'s inverse: boolean (count, X, Y, Z) masks."""
    return torch.stack([(packed >> n) & 1 for n in range(count)]).bool()


def assemble(piece: torch.Tensor, slab: SlabLogits, group, dst: int | None = 0) -> torch.Tensor | None:
    """The whole volume of ``piece`` ((rows, Y, Z): this rank's rows of a per-voxel map) on group rank
    ``dst`` (every rank when None); None elsewhere."""
    return gather_slabs(piece, group, slab.lengths, dst, axis=0)


def slab_scores(model: SpatialInference, targets, slab: SlabLogits, truth: np.ndarray, spacing,
                with_hd95: bool, whole_truth: Callable[[], np.ndarray], keep_masks: bool = False
                ) -> tuple[list[float], list[float], torch.Tensor | None]:
    """Dice (and HD95) of one volume from every rank's slab, the same on every rank.

    Args:
        model: the split model (its group).
        targets: the run's ``Targets``.
        slab: this rank's logits.
        truth: this rank's rows (``slab.start:slab.stop``) of the label map.
        spacing: voxel size (mm) for HD95.
        with_hd95: compute HD95 (on the group's first rank, from the assembled masks).
        whole_truth: reads the whole label map (called on the first rank for HD95 only).
        keep_masks: also return the assembled masks on the first rank (the training overlay).

    Returns:
        (Dice per name, HD95 per name (NaN without ``with_hd95``), the whole boolean masks on the first rank
        when ``keep_masks`` or ``with_hd95``, else None).
    """
    pred = targets.masks_from_logits(slab.logits)[0]
    label = torch.from_numpy(np.ascontiguousarray(truth, dtype=np.uint8)).to(pred.device)
    counts = overlap_counts(pred, targets.masks_from_labels(label[None, None])[0])
    dist.all_reduce(counts, group=model.group)
    dice, hd, masks = dice_from_counts(counts), [float("nan")] * pred.shape[0], None
    if not (with_hd95 or keep_masks):
        return dice, hd, None
    whole = assemble(pack_masks(pred), slab, model.group)
    if whole is not None:
        masks = unpack_masks(whole, pred.shape[0])
        if with_hd95:
            label = torch.from_numpy(np.asarray(whole_truth(), dtype=np.uint8)).to(masks.device)
            hd = hd95(masks, targets.masks_from_labels(label[None, None])[0], spacing)
    if with_hd95:
        shared = [hd]
        dist.broadcast_object_list(shared, group=model.group, group_src=0)
        hd = shared[0]
    return dice, hd, masks


def infer_volume(model: SpatialInference, read: Reader, shape: Sequence[int], inf_cfg, roi_size: list[int],
                 divisor: int, precision: str, device: torch.device, memory: InferenceMemory | None,
                 report: dict, whole_image: Callable[[], torch.Tensor]) -> SlabLogits | torch.Tensor:
    """One volume under ``slab_applies``: this rank's ``SlabLogits`` when the whole volume runs (``whole``,
    or ``auto`` choosing it), else every rank's whole logits from sliding windows (``infer`` on
    ``whole_image()``: a fallback after any rank ran out of memory, or ``auto``'s choice).

    Args:
        model, read, shape, divisor, precision, device: as ``infer_slab``.
        inf_cfg, roi_size, memory: as ``engine.inference.infer``.
        report: filled with the mode chosen (``ModeChoice.to_dict()`` under ``auto``).
        whole_image: the whole (1, C, X, Y, Z) image on ``device`` (read only for sliding windows).
    """
    run = partial(infer_slab, model, read, shape, divisor, precision, device)
    if enum_value(inf_cfg.mode) == "whole":
        report["mode"] = "whole"
        slab, failed = attempt(model, run, f"whole ({model.slabs} slabs)")
        if failed is not None:  # on every rank at once (inference.mode=auto would fall back instead)
            raise torch.OutOfMemoryError(f"inference.mode=whole: out of memory ({failed}); "
                                         f"inference.mode=auto falls back to sliding windows")
        return slab
    choice = agreed_choice(model, memory, list(shape), divisor, inf_cfg.sw_batch_size)
    if choice.mode == "whole":
        slab, failed = attempt(model, run, f"whole ({model.slabs} slabs)")
        if failed is None:
            report.update(choice.to_dict())
            return slab
        release_memory(device)
        choice = next_choice(memory, list(shape), divisor, inf_cfg.sw_batch_size, choice, failed)
    return infer(model, whole_image(), inf_cfg, roi_size, divisor, precision, memory, report, start=choice)

