"""Dice and HD95 per region/label (MONAI metrics) with explicit conventions for empty masks."""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance


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
    p, t = pred[None].float().cpu(), truth[None].float().cpu()
    dice = compute_dice(p, t, include_background=True, ignore_empty=False)[0].tolist()
    hd = [math.nan] * len(dice)
    if with_hd95:
        for c in range(len(dice)):
            p_any, t_any = bool(p[0, c].any()), bool(t[0, c].any())
            if not p_any and not t_any:
                hd[c] = 0.0
            elif p_any and t_any:
                with warnings.catch_warnings():  # MONAI 1.5+ deprecation noise from its own internals
                    warnings.simplefilter("ignore", FutureWarning)
                    hd[c] = float(compute_hausdorff_distance(
                        p[:, c:c + 1], t[:, c:c + 1], include_background=True, percentile=95,
                        spacing=[float(s) for s in spacing]))
    return [float(d) for d in dice], hd


def nanmean(values) -> float:
    """Mean ignoring NaN; NaN when nothing is left."""
    arr = np.asarray(list(values), dtype=float)
    return float(np.nanmean(arr)) if np.isfinite(arr).any() else math.nan


def summarize(per_case: list[dict], names: list[str]) -> dict:
    """Mean Dice/HD95 per name over cases, plus the overall mean Dice (``dice``)."""
    out = {f"dice_{n}": nanmean(c["dice"][n] for c in per_case) for n in names}
    out.update({f"hd95_{n}": nanmean(c["hd95"][n] for c in per_case) for n in names})
    out["dice"] = nanmean(out[f"dice_{n}"] for n in names)
    return out
