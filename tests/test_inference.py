"""Whole-volume and sliding-window inference (``engine/inference.py``): padding, blending, mirroring TTA."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lampseg.engine.inference import infer, pad_to_multiple

# ---------------------------------------------------------------------------------------- inference


def _inference_cfg(mode="whole", overlap=0.5, blend="gaussian", tta=False):
    return SimpleNamespace(mode=mode, overlap=overlap, blend=blend, sw_batch_size=2, tta=tta)


@pytest.mark.parametrize("shape", [(5, 7, 9), (8, 8, 8), (1, 3, 17)])
def test_pad_to_multiple_round_trip(shape):
    x = torch.randn(1, 2, *shape)
    padded, crop = pad_to_multiple(x, 4)
    assert all(s % 4 == 0 and s >= o for s, o in zip(padded.shape[-3:], shape))
    assert padded.shape[:2] == x.shape[:2]
    assert torch.equal(padded[crop], x)
    assert padded.abs().sum() == pytest.approx(x.abs().sum().item(), rel=1e-6)  # padding is zeros


@pytest.mark.parametrize("shape", [(5, 7, 9), (8, 8, 8)])
def test_pad_to_multiple_casts_and_reorders_in_one_copy(shape):
    x = torch.randn(1, 3, *shape)
    padded, crop = pad_to_multiple(x, 4, torch.bfloat16, torch.channels_last_3d)
    assert padded.dtype == torch.bfloat16 and padded.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(padded[crop], x.bfloat16())
    assert padded.float().abs().sum() == pytest.approx(x.bfloat16().float().abs().sum().item(), rel=1e-3)


def test_whole_volume_feeds_a_channels_last_model_its_own_layout():
    torch.manual_seed(0)
    model = torch.nn.Conv3d(2, 3, 3, padding=1).eval()
    image = torch.randn(1, 2, 9, 10, 11)
    expected = infer(model, image, _inference_cfg("whole"), [8, 8, 8], divisor=4)
    seen = []
    model = model.to(memory_format=torch.channels_last_3d)
    model.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    got = infer(model, image, _inference_cfg("whole"), [8, 8, 8], divisor=4, precision="bf16")
    assert seen[0].dtype == torch.bfloat16 and seen[0].is_contiguous(memory_format=torch.channels_last_3d)
    assert got.dtype == torch.float32 and torch.allclose(got, expected, atol=0.1)


@pytest.mark.parametrize("blend", ["constant", "gaussian"])
@pytest.mark.parametrize("overlap", [0.25, 0.5])
def test_whole_equals_sliding_for_voxelwise_model(blend, overlap):
    torch.manual_seed(0)
    model = torch.nn.Conv3d(2, 3, 1).eval()
    image = torch.randn(1, 2, 13, 17, 11)
    whole = infer(model, image, _inference_cfg("whole"), [8, 8, 8], divisor=4)
    sliding = infer(model, image, _inference_cfg("sliding", overlap, blend), [8, 8, 8], divisor=4)
    assert whole.shape == sliding.shape == (1, 3, 13, 17, 11)
    assert whole.dtype == torch.float32
    assert torch.allclose(whole, sliding, atol=1e-5)
    assert torch.allclose(whole, model(image), atol=1e-6)


@pytest.mark.parametrize("mode", ["whole", "sliding"])
def test_tta_with_voxelwise_model_is_identity(mode):
    torch.manual_seed(0)
    model = torch.nn.Conv3d(2, 3, 1).eval()
    image = torch.randn(1, 2, 9, 10, 11)
    plain = infer(model, image, _inference_cfg(mode), [8, 8, 8], divisor=4)
    tta = infer(model, image, _inference_cfg(mode, tta=True), [8, 8, 8], divisor=4)
    assert torch.allclose(plain, tta, atol=1e-5)


def test_tta_undoes_each_mirroring_on_its_own_axes():
    """A model that is not mirror-symmetric (it adds a position ramp): TTA averages x + flip(ramp) over the
    8 mirrorings, which is only what comes out if every prediction is flipped back on the right axes."""
    import itertools

    class Ramp(torch.nn.Module):
        def forward(self, x):
            x_, y_, z_ = (torch.arange(n, dtype=x.dtype) for n in x.shape[-3:])
            ramp = x_[:, None, None] + 10 * y_[None, :, None] + 100 * z_[None, None, :]
            return x.sum(1, keepdim=True) + ramp

    image = torch.randn(1, 2, 4, 8, 12)
    ramp = Ramp()(torch.zeros(1, 1, 4, 8, 12))
    flips = [axes for r in range(4) for axes in itertools.combinations((2, 3, 4), r)]
    expected = image.sum(1, keepdim=True) + sum(torch.flip(ramp, a) if a else ramp for a in flips) / 8
    got = infer(Ramp(), image, _inference_cfg("whole", tta=True), [4, 8, 12], divisor=4)
    assert torch.allclose(got, expected, atol=1e-4)


def test_evaluate_checks_overrides_against_the_checkpoints_model():
    """``evaluate``/``predict`` rebuild the checkpoint's model: an ``inference.patch_size`` that its strides
    cannot divide is a config error naming the key, even when the command line's own model could."""
    from conftest import compose

    from lampseg.config import ConfigError, changes_from, to_container
    from lampseg.engine.evaluate import config_from_checkpoint

    trained = to_container(compose("model.strides=[2,2,2]", "model.channels=[8,16,32,64]"))  # divisor 8
    cfg = compose("+exp=smoke", "inference.patch_size=[36,36,36]")  # fine for smoke's divisor 4
    with pytest.raises(ConfigError, match="config key 'inference.patch_size'"):
        config_from_checkpoint({"config": trained}, changes_from(cfg, ["inference.patch_size=[36,36,36]"]))
    fits = ["inference.patch_size=[40,40,40]"]
    merged = config_from_checkpoint({"config": trained}, changes_from(compose(*fits), fits))
    assert list(merged.inference.patch_size) == [40, 40, 40]
