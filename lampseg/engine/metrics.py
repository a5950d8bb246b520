"""Dice and HD95 per region/label with explicit conventions for empty masks.

Dice is counted directly on the device (MONAI's ``compute_dice`` spent ~0.5 s per BraTS-size channel in
``masked_select`` on CPU); HD95 is MONAI's ``compute_hausdorff_distance``.
"""
from __future__ import annotations

import math
import re
import warnings

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance


def dice_hd95(pred: torch.Tensor, truth: torch.Tensor, spacing, with_hd95: bool = True
              ) -> tuple[list[float], list[float]]:
    """Dice and 95th-percentile Hausdorff distance (mm) per channel for one case.

    Conventions: Dice is 1.0 when prediction and truth are both empty and 0.0 when only one is.
    HD95 is 0.0 when both are empty and NaN (left out of means) when only one is.

    Args:
        pred: boolean (N, X, Y, Z) predicted masks.
        truth: boolean (N, X, Y, Z) reference masks.
        spacing: voxel size in mm (3 numbers), from the NIfTI header.
        with_hd95: compute HD95 (slower) or return NaNs.

    Returns:
        (dice per channel, hd95 per channel).
    """
    dice = dice_from_counts(overlap_counts(pred, truth))
    return dice, hd95(pred, truth, spacing) if with_hd95 else [math.nan] * len(dice)


def overlap_counts(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """(2, N) float64 voxel counts per channel of boolean (N, X, Y, Z) masks: the overlap, and prediction
    plus truth. They add up over pieces of a volume (slabs), so Dice from their sums is the whole volume's.
    """
    p, t = pred.bool().flatten(1), truth.bool().flatten(1)
    return torch.stack([(p & t).sum(1).double(), (p.sum(1) + t.sum(1)).double()])


def dice_from_counts(counts: torch.Tensor) -> list[float]:
    """Dice per channel from ``overlap_counts`` (1.0 when prediction and truth are both empty)."""
    overlap, total = counts[0], counts[1]
    return torch.where(total > 0, 2 * overlap / total.clamp(min=1), torch.ones_like(total)).tolist()


def hd95(pred: torch.Tensor, truth: torch.Tensor, spacing) -> list[float]:
    """95th-percentile Hausdorff distance (mm) per channel of boolean (N, X, Y, Z) masks (conventions:
    ``dice_hd95``)."""
    hd = [math.nan] * pred.shape[0]
    for c in range(pred.shape[0]):
        p_any, t_any = bool(pred[c].any()), bool(truth[c].any())
        if not p_any and not t_any:
            hd[c] = 0.0
        elif p_any and t_any:
            # Crop to both masks' bounding box plus a 1-voxel border (as MONAI's get_mask_edges does) before
            # the float copies, so whole-volume channels cost what the structures' size costs.
            points = (pred[c] | truth[c]).nonzero()
            box = tuple(slice(max(int(lo) - 1, 0), int(hi) + 2)
                        for lo, hi in zip(points.min(0).values, points.max(0).values))
            p_c, t_c = (m[c][box][None, None].float().cpu() for m in (pred, truth))
            with warnings.catch_warnings():  # MONAI 1.5+ deprecation noise from its own internals
                warnings.simplefilter("ignore", FutureWarning)
                hd[c] = float(compute_hausdorff_distance(p_c, t_c, include_background=True, percentile=95,
                                                         spacing=[float(s) for s in spacing]))
    return hd


def nanmean(values) -> float:
    """Mean ignoring NaN; NaN when nothing is left."""
    arr = np.asarray(list(values), dtype=float)
    return float(np.nanmean(arr)) if np.isfinite(arr).any() else math.nan


def metric_key(name: str) -> str:
    """A region or label name as it appears in metric keys (``val_dice_<key>``): every character other
    than letters, digits, ``-``, ``.`` and ``_`` becomes ``_`` (``non-enhancing tumor`` ->
    ``non-enhancing_tumor``).

    One spelling for every logger: TensorBoard (and Ray's TensorBoard logger) rejects spaces in scalar
    names and renames them with a message per name and epoch; ``metrics.csv`` and Tune use the same key.
    """
    return re.sub(r"[^\w.\-]", "_", name)


def summarize(per_case: list[dict], names: list[str]) -> dict:
    """Mean Dice/HD95 per name over cases (keys ``dice_<metric_key(name)>``), plus the overall mean Dice
    (``dice``)."""
    out = {f"dice_{metric_key(n)}": nanmean(c["dice"][n] for c in per_case) for n in names}
    out.update({f"hd95_{metric_key(n)}": nanmean(c["hd95"][n] for c in per_case) for n in names})
    out["dice"] = nanmean(out[f"dice_{metric_key(n)}"] for n in names)
    return out
