"""The model layer: label targets and regions (``model/losses.Targets``), the U-Net's receptive field."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lampseg.model.losses import Targets

BRATS_LABELS = {0: "background", 1: "edema", 2: "non-enhancing tumour", 3: "enhancing tumour"}
BRATS_REGIONS = {"WT": [1, 2, 3], "TC": [2, 3], "ET": [3]}


def _nested_labels(values=(1, 2, 3), shape=(2, 1, 10, 9, 8), seed=0) -> torch.Tensor:
    """Random label maps holding every value (plus background)."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.choice([0, *values], size=shape).astype(np.uint8))


# ------------------------------------------------------------------------------------------ targets


def test_targets_softmax_noncontiguous_labels():
    targets = Targets.from_config({0: "bg", 1: "a", 2: "b", 4: "c"}, None)
    assert not targets.region_based
    assert targets.names == ["a", "b", "c"] and targets.out_channels == 4
    label = _nested_labels((1, 2, 4))
    target = targets.loss_target(label)
    assert target.dtype == torch.long and target.shape == label.shape
    assert set(target.unique().tolist()) == {0, 1, 2, 3}
    assert torch.equal(target == 3, label == 4)
    masks = targets.masks_from_labels(label)
    assert masks.dtype == torch.bool and masks.shape == (2, 3, *label.shape[2:])
    assert torch.equal(masks[:, 2], label[:, 0] == 4)
    logits = torch.nn.functional.one_hot(target[:, 0], 4).permute(0, 4, 1, 2, 3).float() * 20 - 10
    assert torch.equal(targets.labels_from_logits(logits), label[:, 0].long())
    assert torch.equal(targets.masks_from_logits(logits), masks)


@pytest.mark.parametrize("labels,regions", [
    (BRATS_LABELS, BRATS_REGIONS),
    ({0: "bg", 1: "edema", 2: "core", 4: "enhancing"}, {"WT": [1, 2, 4], "TC": [2, 4], "ET": [4]}),
])
def test_targets_regions_round_trip(labels, regions):
    targets = Targets.from_config(labels, regions)
    assert targets.region_based and targets.names == list(regions) and targets.out_channels == 3
    label = _nested_labels(tuple(v for v in labels if v))
    masks = targets.masks_from_labels(label)
    assert masks.dtype == torch.bool and masks.shape == (2, 3, *label.shape[2:])
    for i, values in enumerate(regions.values()):
        assert torch.equal(masks[:, i], torch.isin(label[:, 0], torch.tensor(values)))
    target = targets.loss_target(label)
    assert target.dtype == torch.float32 and target.shape == masks.shape
    logits = torch.where(masks, 10.0, -10.0)
    assert torch.equal(targets.masks_from_logits(logits), masks)
    assert torch.equal(targets.labels_from_logits(logits), label[:, 0].long())


def test_targets_reject_undeclared_region_labels():
    with pytest.raises(ValueError, match="data.regions.ET"):
        Targets.from_config(BRATS_LABELS, {"WT": [1, 2, 3], "ET": [4]})
    with pytest.raises(ValueError, match="background"):
        Targets.from_config({1: "a", 2: "b"}, None)



def test_receptive_field_is_the_reach_of_one_output_voxel(strides=(2, 2)):
    """Perturbing the input just inside the reported reach changes the centre output; just outside, it
    does not (a batch-norm model in eval mode: no statistics that mix every voxel)."""

    from lampseg.model.unet import build_model, receptive_field

    cfg = SimpleNamespace(channels=[4] * (len(strides) + 1), strides=list(strides), kernel_size=3,
                          num_res_units=1, norm="batch", dropout=0.0)
    reach = receptive_field(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, 1, 1).eval().double()
    divisor = math.prod(strides)
    length = divisor * (4 * reach // divisor + 4)
    x = torch.randn(1, 1, length, divisor, divisor, dtype=torch.float64)
    base = model(x)
    reaches = []
    for centre in range(length // 2, length // 2 + divisor):  # every phase of the strided layers
        def changed(offset: int, centre=centre) -> bool:
            y = x.clone()
            y[0, 0, centre + offset] += 10.0
            return bool(model(y)[0, 0, centre, 0, 0] != base[0, 0, centre, 0, 0])

        left = next(o for o in range(-reach - 1, reach + 1) if changed(o))  # outside in: few passes
        right = next(o for o in range(reach + 1, -reach - 1, -1) if changed(o))
        assert left > -reach - 1 and right < reach + 1  # nothing beyond the reported reach
        reaches.append(right - left + 1)
    assert max(reaches) == reach
