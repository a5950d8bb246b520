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


# ------------------------------------------------------------------------------------- channels-last norm


@pytest.mark.parametrize("channels,shape", [(1, (9, 8, 8)), (4, (12, 10, 8)), (3, (7, 5, 3)),
                                            (16, (6, 6, 4))])
@pytest.mark.parametrize("affine", [False, True])
def test_channels_last_instance_norm_equals_pytorch(channels, shape, affine, monkeypatch):
    """Folded rows (few channels), odd voxel counts (no fold), several chunks, a large mean, affine."""
    from lampseg.model import channels_last as norm

    monkeypatch.setattr(norm, "CHUNK_BYTES", 4 * 16 * 37)  # several chunks, the last one short
    g = torch.Generator().manual_seed(channels)
    x = torch.randn(2, channels, *shape, generator=g) * 3 + 40
    x = x.contiguous(memory_format=torch.channels_last_3d)
    weight, bias = (None, None)
    if affine:
        weight, bias = torch.randn(channels, generator=g), torch.randn(channels, generator=g)

    def reference(t):
        w, b = (None, None) if weight is None else (weight.double(), bias.double())
        return torch.nn.functional.instance_norm(t.double(), weight=w, bias=b, eps=1e-5)

    got = norm.channels_last_instance_norm(x, weight, bias, 1e-5)
    assert got.dtype == torch.float32 and got.is_contiguous(memory_format=torch.channels_last_3d)
    assert float((got.double() - reference(x)).abs().max()) < 2e-5
    low = x.bfloat16()  # statistics in float32, then one rounding into bf16 (8 significant bits)
    got = norm.channels_last_instance_norm(low, weight, bias, 1e-5)
    want = reference(low)
    assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=torch.channels_last_3d)
    assert float(((got.double() - want).abs() - want.abs() * 2**-8).max()) <= 1e-6


def test_unet_norms_take_the_channels_last_path_only_for_inference():
    """build_model's U-Net: same state-dict keys as MONAI's; under no_grad a channels-last input stays
    channels-last through every norm with the same logits; with autograd PyTorch's kernel runs."""
    from monai.networks.nets import UNet

    from lampseg.model.channels_last import Conv3d, InstanceNorm3d
    from lampseg.model.unet import build_model

    cfg = SimpleNamespace(channels=[8, 16, 32], strides=[2, 2], num_res_units=1, kernel_size=3,
                          norm="instance", dropout=0.0)
    torch.manual_seed(0)
    model = build_model(cfg, 4, 3).eval()
    plain = UNet(3, 4, 3, (8, 16, 32), (2, 2), num_res_units=1).eval()
    assert list(model.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(model.state_dict())
    norms = [m for m in model.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    assert norms and all(type(m) is InstanceNorm3d for m in norms)
    assert all(type(m) is Conv3d for m in model.modules() if isinstance(m, torch.nn.Conv3d))
    layouts = []  # (input channels-last, output channels-last) per norm call

    def channels_last(t):
        return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last_3d)

    for m in norms:
        m.register_forward_hook(lambda _m, args, out: layouts.append((channels_last(args[0]),
                                                                      channels_last(out))))
    model, plain = (net.to(memory_format=torch.channels_last_3d) for net in (model, plain))
    # (PyTorch's CPU convolution answers small inputs channels-first: these are big enough for the first
    # levels)
    x = torch.randn(2, 4, 40, 32, 40).contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        got, want = model(x), plain(x)
    assert len(layouts) == len(norms) and any(i for i, _ in layouts)
    assert all(i == o for i, o in layouts)
    assert float((got - want).abs().max()) < 1e-4 * max(1.0, float(want.abs().max()))
    layouts.clear()
    model(x).sum().backward()  # training: PyTorch's instance_norm (its output is channels-first)
    assert any(i for i, _ in layouts) and not any(o for _, o in layouts)


@pytest.mark.parametrize("kernel,padding,fold", [(3, (1, 1, 1), 4), (3, (0, 2, 1), 2), (5, (2, 2, 2), 4),
                                                 (5, (1, 0, 2), 2), (1, (0, 0, 0), 4), (7, (3, 3, 3), 2)])
def test_folded_convolution_equals_the_convolution(kernel, padding, fold):
    """Voxels folded into channels (``fold_weight``): the same products, any odd kernel and x/y padding."""
    from lampseg.model.channels_last import folded_conv3d

    g = torch.Generator().manual_seed(kernel * 10 + fold)
    x = torch.randn(2, 3, 7, 6, 4 * fold, generator=g).contiguous(memory_format=torch.channels_last_3d)
    weight, bias = torch.randn(5, 3, kernel, kernel, kernel, generator=g), torch.randn(5, generator=g)
    for b in (bias, None):
        want = torch.nn.functional.conv3d(x, weight, b, padding=padding)
        got = folded_conv3d(x, weight, b, padding, fold)
        assert got.shape == want.shape and float((got - want).abs().max()) < 1e-4


def test_narrow_convolutions_fold_under_bf16_inference_only(monkeypatch):
    """channels_last.Conv3d folds a narrow stride-1 convolution under bf16 autocast at inference (and gives
    its bf16 result), and leaves wide, strided, fp32 and training convolutions to PyTorch."""
    from lampseg.model import channels_last

    calls = []
    real = channels_last.folded_conv3d
    monkeypatch.setattr(channels_last, "folded_conv3d", lambda *a: calls.append(a[-1]) or real(*a))
    torch.manual_seed(0)

    def layer(ci, co, stride=1):
        conv = torch.nn.Conv3d(ci, co, 3, stride, 1).to(memory_format=torch.channels_last_3d)
        plain = torch.nn.Conv3d(ci, co, 3, stride, 1)
        plain.load_state_dict(conv.state_dict())
        conv.__class__ = channels_last.Conv3d
        return conv, plain.to(memory_format=torch.channels_last_3d)

    x = torch.randn(1, 4, 40, 36, 24).contiguous(memory_format=torch.channels_last_3d)
    narrow, plain = layer(4, 4)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        got, want = narrow(x), plain(x)
    assert calls == [4] and got.dtype == want.dtype == torch.bfloat16
    assert got.is_contiguous(memory_format=torch.channels_last_3d)
    exact = torch.nn.functional.conv3d(x.double(), plain.weight.double(), plain.bias.double(), padding=1)
    assert float((got.double() - exact).abs().max()) <= 2 * float((want.double() - exact).abs().max()) + 1e-3
    calls.clear()
    with torch.no_grad():
        narrow(x)  # fp32
        with torch.autocast("cpu", torch.bfloat16):
            layer(4, 16)[0](x)  # wide
            layer(4, 4, 2)[0](x)  # strided
            narrow(x[..., :23].contiguous(memory_format=torch.channels_last_3d))  # 23 voxels: no fold
    with torch.autocast("cpu", torch.bfloat16):
        narrow(x)  # training
    assert calls == []
