"""One image segmented for ``predict``: labels on the image's own grid (preprocessing undone).

    seg, img, report = segment_image(path, model, targets, device, cfg, info, memory)

One process (or a pipeline, or data-parallel replicas) reads the whole image, preprocesses it
(``data.cache.preprocess_array``) and infers it. A model split into slabs (``parallel=spatial``) infers whole
volumes slab by slab (``engine.slab_inference``); when preprocessing does not resample, each rank also reads
only its rows of the image through nibabel's array proxy (``data.proxy``): the crop box and the z-score
statistics come from counts all-reduced over the group, so no rank holds the whole image, its logits or its
label map but the writer, which assembles the uint8 labels.
"""
from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig

from lampseg.config import enum_value
from lampseg.data.cache import crop_space, preprocess_array, resampled_shape, uncrop
from lampseg.data.msd import check_finite, read_header, read_image
from lampseg.data.prepare import preprocess_config
from lampseg.data.proxy import image_rows, spatial_shape
from lampseg.engine.evaluate import roi_size
from lampseg.engine.inference import infer
from lampseg.engine.slab_inference import SlabLogits, assemble, infer_volume, slab_applies
from lampseg.model.unet import size_divisor


def segment_image(path: Path, model, targets, device: torch.device, cfg: DictConfig, info: dict, memory
                  ) -> tuple[np.ndarray | None, nib.Nifti1Image, dict]:
    """One image's uint8 labels in its original space (None on the ranks of a slab group that do not
    write), the image it was read from, and how inference ran (``report``)."""
    if slab_applies(model, cfg.inference):
        img = read_header(Path(path), len(info["modalities"]))
        meta = _slab_meta(img, path, model.group, cfg, info)
        if meta is not None:  # no resampling: each rank reads its rows only
            seg = _segment_slabs(img, path, meta, model, targets, device, cfg, info, memory)
            return seg, img, meta["report"]
    image, img = read_image(path, len(info["modalities"]))
    image = check_finite(image, path, cfg.data.nonfinite)
    spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
    pre, _, meta = preprocess_array(image[info["channels"]], None, spacing, preprocess_config(cfg.data))
    del image
    report = {"mode": enum_value(cfg.inference.mode)}
    args = (cfg.inference, roi_size(cfg, info["patch_size"]), size_divisor(cfg.model))
    if not slab_applies(model, cfg.inference):
        logits = infer(model, torch.from_numpy(pre)[None].to(device), *args, cfg.trainer.precision, memory,
                       report)
        return restore_labels(logits[0], meta, targets), img, report
    got = infer_volume(model, lambda lo, hi: pre[:, lo:hi], pre.shape[1:], *args, cfg.trainer.precision,
                       device, memory, report, lambda: torch.from_numpy(pre)[None].to(device))
    if isinstance(got, torch.Tensor):  # sliding windows: every rank holds the whole logits
        return restore_labels(got[0], meta, targets), img, report
    # resampled: the logits are interpolated back, so one rank gathers them (the others never hold them)
    logits = assemble(got.logits[0].movedim(1, 0), got, model.group)
    return (None if logits is None else restore_labels(logits.movedim(0, 1), meta, targets)), img, report


def restore_labels(logits: torch.Tensor, meta: dict, targets) -> np.ndarray:
    """uint8 labels on the input's original grid from (K, X, Y, Z) logits in preprocessed space: the logits
    interpolated back inside the crop box (``data.cache.crop_space``), labels there, background outside."""
    inside = torch.from_numpy(crop_space(logits.cpu().numpy(), meta))
    return uncrop(targets.labels_from_logits(inside[None])[0].numpy().astype(np.uint8), meta)


def _all_reduce(values: list[float], group, op=dist.ReduceOp.SUM) -> list[float]:
    """``values`` reduced over ``group`` (float64, on the CPU: gloo; a few numbers per image)."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend(group) == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=op, group=group)
    return tensor.cpu().tolist()


def _slab_meta(img: nib.Nifti1Image, path: Path, group, cfg: DictConfig, info: dict) -> dict | None:
    """``preprocess_array``'s meta for ``img`` from each rank's share of its rows: the nonzero crop box and
    the z-score statistics (two passes: mean, then squared deviations, as numpy's ``std``), with the NaN/Inf
    check of ``data.nonfinite``; None when preprocessing would resample (that path reads the whole image)."""
    pre_cfg, shape = preprocess_config(cfg.data), spatial_shape(img)
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    first, last = (int(b) for b in np.linspace(0, shape[0], size + 1).round()[rank:rank + 2])
    rows = image_rows(img, path, list(range(len(info["modalities"]))), first, last)
    rows = check_finite(rows, path, cfg.data.nonfinite)[info["channels"]]
    mask = np.any(rows != 0, axis=0)
    box = [[0, s] for s in shape]
    if pre_cfg.crop_nonzero:
        hits = [np.flatnonzero(np.any(mask, axis=tuple(a for a in range(3) if a != axis)))
                for axis in range(3)]
        shift = [first, 0, 0]  # this rank's rows start at ``first``
        lows = [-(h[0] + d) if h.size else -math.inf for h, d in zip(hits, shift)]
        highs = [h[-1] + 1 + d if h.size else -math.inf for h, d in zip(hits, shift)]
        found = _all_reduce(lows + highs, group, dist.ReduceOp.MAX)
        if math.isfinite(found[0]):  # some voxel is nonzero (else the whole volume, as preprocess_array)
            box = [[int(-found[a]), int(found[3 + a])] for a in range(3)]
    spacing = [float(z) for z in img.header.get_zooms()[:3]]
    cropped = [e - s for s, e in box]
    target = pre_cfg.target_spacing
    if target is not None and list(resampled_shape(cropped, spacing, target)) != cropped:
        return None
    stats = _zscore_stats(rows, mask, group) if pre_cfg.normalize == "zscore_nonzero" else []
    return {"original_shape": shape, "crop_box": box, "spacing": spacing,
            "target_spacing": None if target is None else list(target), "preprocessed_shape": cropped,
            "norm_stats": stats, "report": {"mode": enum_value(cfg.inference.mode)}}


def _zscore_stats(rows: np.ndarray, mask: np.ndarray, group) -> list[list[float]]:
    """[mean, std] per channel over the voxels where any channel is nonzero, from every rank's rows."""
    counts = _all_reduce([float(mask.sum())] + [float(c[mask].sum(dtype=np.float64)) for c in rows], group)
    voxels, means = counts[0], [s / counts[0] if counts[0] else 0.0 for s in counts[1:]]
    squares = _all_reduce([float(np.square(c[mask].astype(np.float64) - m).sum())
                           for c, m in zip(rows, means)], group)
    return [[m, max(math.sqrt(q / voxels), 1e-8) if voxels else 1.0] for m, q in zip(means, squares)]


def _segment_slabs(img: nib.Nifti1Image, path: Path, meta: dict, model, targets, device: torch.device,
                   cfg: DictConfig, info: dict, memory) -> np.ndarray | None:
    """Labels of an image whose rows each rank reads itself (``_slab_meta``); the uint8 map on the writer."""
    box, stats = meta["crop_box"], meta["norm_stats"]
    policy = cfg.data.nonfinite

    def read(lo: int, hi: int) -> np.ndarray:
        """Rows ``lo:hi`` of the preprocessed image: cropped, NaN/Inf handled, z-scored (preprocess_array)."""
        rows = image_rows(img, path, list(info["channels"]), box[0][0] + lo, box[0][0] + hi)
        rows = np.ascontiguousarray(rows[:, :, box[1][0]:box[1][1], box[2][0]:box[2][1]])
        if policy == "zero":  # checked (and warned about) while planning; set quietly here
            np.nan_to_num(rows, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        if stats:
            mask = np.any(rows != 0, axis=0)
            for channel, (mean, std) in zip(rows, stats):
                channel[mask] = (channel[mask] - mean) / std
                channel[~mask] = 0.0
        return rows

    shape = meta["preprocessed_shape"]
    got = infer_volume(model, read, shape, cfg.inference, roi_size(cfg, info["patch_size"]),
                       size_divisor(cfg.model), cfg.trainer.precision, device, memory, meta["report"],
                       lambda: torch.from_numpy(read(0, shape[0]))[None].to(device))
    if not isinstance(got, SlabLogits):  # sliding windows: every rank holds the whole logits
        return restore_labels(got[0], meta, targets)
    labels = assemble(targets.labels_from_logits(got.logits)[0].to(torch.uint8), got, model.group)
    return None if labels is None else uncrop(labels.cpu().numpy(), meta)
