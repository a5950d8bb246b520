"""Dice and HD95 (``engine/metrics.py``): conventions, spacing, agreement with MONAI."""
from __future__ import annotations

import math

import pytest
import torch

from lampseg.engine.metrics import dice_hd95

# ------------------------------------------------------------------------------------------ metrics


def test_dice_hd95_empty_and_identical_conventions():
    shape = (12, 12, 12)
    blob = torch.zeros(shape, dtype=torch.bool)
    blob[3:7, 4:9, 2:6] = True
    empty = torch.zeros(shape, dtype=torch.bool)
    #            both empty, pred empty, truth empty, identical
    pred = torch.stack([empty, empty, blob, blob])
    truth = torch.stack([empty, blob, empty, blob])
    dice, hd = dice_hd95(pred, truth, (1.0, 2.0, 0.5))
    assert dice == [1.0, 0.0, 0.0, 1.0]
    assert hd[0] == 0.0 and math.isnan(hd[1]) and math.isnan(hd[2]) and hd[3] == 0.0
    dice, hd = dice_hd95(pred, truth, (1.0, 1.0, 1.0), with_hd95=False)
    assert dice == [1.0, 0.0, 0.0, 1.0] and all(math.isnan(h) for h in hd)


@pytest.mark.parametrize("axis,shift", [(0, 3), (1, 2), (2, 4)])
def test_hd95_of_shifted_plate_uses_spacing(axis, shift):
    """A one-voxel-thick plate moved ``shift`` voxels along its normal: every surface voxel is exactly
    ``shift * spacing[axis]`` mm from the other plate, so HD95 is that distance."""
    spacing = (2.0, 1.0, 0.5)
    pred = torch.zeros(16, 16, 16, dtype=torch.bool)
    index = [slice(4, 11)] * 3
    index[axis] = 5
    pred[tuple(index)] = True
    truth = torch.roll(pred, shift, dims=axis)
    dice, hd = dice_hd95(pred[None], truth[None], spacing)
    assert dice == [0.0]
    assert hd[0] == pytest.approx(shift * spacing[axis])


def test_hd95_of_shifted_cube_is_bounded_by_the_shift():
    spacing = (2.0, 1.0, 0.5)
    pred = torch.zeros(20, 20, 20, dtype=torch.bool)
    pred[5:11, 5:11, 5:11] = True
    truth = torch.roll(pred, 2, dims=0)
    dice, hd = dice_hd95(pred[None], truth[None], spacing)
    assert dice[0] == pytest.approx(2 * 4 / (6 + 6))  # 4 of 6 slices overlap
    assert 0.0 < hd[0] <= 2 * spacing[0] + 1e-6
    _, hd_iso = dice_hd95(pred[None], truth[None], (1.0, 1.0, 1.0))
    assert hd[0] == pytest.approx(2 * hd_iso[0])  # distances along axis 0 scale with its spacing


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own deprecation noise inside compute_hd
def test_dice_hd95_match_monai_on_random_masks():
    """The direct Dice and the cropped HD95 equal MONAI's full-volume metrics."""
    from monai.metrics import compute_dice, compute_hausdorff_distance

    gen = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.avg_pool3d(torch.rand(1, 2, 28, 24, 20, generator=gen), 5, 1, 2)[0]
    pred, truth = smooth > 0.52, torch.roll(smooth, 2, 1) > 0.5
    spacing = (1.0, 0.8, 2.5)
    dice, hd = dice_hd95(pred, truth, spacing)
    ref_dice = compute_dice(pred[None].float(), truth[None].float(), include_background=True)[0]
    ref_hd = compute_hausdorff_distance(pred[None].float(), truth[None].float(), include_background=True,
                                        percentile=95, spacing=list(spacing))[0]
    assert dice == pytest.approx(ref_dice.tolist(), abs=1e-6)
    assert hd == pytest.approx(ref_hd.tolist(), abs=1e-5)
