"""Unit tests: targets, inference, metrics, sampling, splits, LR schedules, checkpoints, config checks."""
from __future__ import annotations

import math
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import compose

import lampseg.io
from lampseg.config import ConfigError, validate
from lampseg.data.sampling import PatchDataset, build_augment, read_block, whole_volume_shape
from lampseg.data.splits import kfold_splits
from lampseg.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from lampseg.engine.inference import infer, pad_to_multiple
from lampseg.engine.metrics import dice_hd95
from lampseg.engine.optim import build_scheduler, lr_factor
from lampseg.io import atomic_write_text
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


# ----------------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("start,size", [([-2, 3, -1], [6, 6, 9]), ([0, 0, 0], [5, 6, 7]),
                                        ([3, 4, 5], [4, 4, 4]), ([-10, -10, 9], [3, 3, 3])])
@pytest.mark.parametrize("channels", [None, [1, 0]])
def test_read_block_matches_np_pad(start, size, channels):
    rng = np.random.default_rng(0)
    array = rng.normal(size=(2, 5, 6, 7)).astype(np.float32)
    block = read_block(array, start, size, channels, fill=-3.0)
    m = 12
    padded = np.pad(array, [(0, 0)] + [(m, m)] * 3, constant_values=-3.0)
    window = tuple(slice(s + m, s + m + n) for s, n in zip(start, size))
    expected = padded[(slice(None), *window)]
    if channels is not None:
        expected = expected[channels]
    assert block.shape == expected.shape and block.dtype == array.dtype
    np.testing.assert_array_equal(block, expected)
    label = array[0] > 0  # a channel-less 3D array
    np.testing.assert_array_equal(read_block(label, start, size),
                                  np.pad(label, m)[window])


class FakeCache:
    """The part of ``PreprocessedDataset`` that ``PatchDataset`` reads, over in-memory arrays."""

    def __init__(self, shapes):
        rng = np.random.default_rng(1)
        self.images, self.labels = {}, {}
        for i, shape in enumerate(shapes):
            name = f"case{i}"
            self.images[name] = rng.normal(size=(2, *shape)).astype(np.float32)
            label = np.zeros(shape, np.uint8)
            label[2:4, 3:5, 2:4] = 1  # small: a random 8^3 patch often misses it
            label[3, 4, 3] = 2
            self.labels[name] = label

    def image(self, name):
        return self.images[name]

    def label(self, name):
        return self.labels[name]

    def foreground(self, name):
        label = self.labels[name]
        coords = np.argwhere(label > 0)
        return np.concatenate([label[tuple(coords.T)][:, None], coords], axis=1).astype(np.int32)


def _patches(**kwargs) -> PatchDataset:
    cache = FakeCache([(20, 22, 18), (24, 17, 19)])
    defaults = dict(patch_size=[8, 8, 8], channels=[0, 1], samples_per_epoch=12, foreground_ratio=0.33,
                    seed=7, flip_prob=0.5,
                    augment=build_augment(SimpleNamespace(rotate_prob=0.0, rotate_degrees=15.0,
                                                          intensity_prob=0.5, flip_prob=0.5)))
    defaults.update(kwargs)
    return PatchDataset(cache, list(cache.images), **defaults)


def test_patch_dataset_is_a_function_of_seed_epoch_index():
    a, b = _patches(), _patches()
    a.set_epoch(3)
    b.set_epoch(3)
    for i in (0, 5, 11):
        x, y = a[i], b[i]
        assert x["image"].shape == (2, 8, 8, 8) and x["label"].shape == (1, 8, 8, 8)
        assert x["image"].dtype == torch.float32 and x["label"].dtype == torch.uint8
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
        assert torch.equal(a[i]["image"], x["image"])  # repeatable, not stateful
    b.set_epoch(4)
    assert not all(torch.equal(a[i]["image"], b[i]["image"]) for i in range(len(a)))


def test_foreground_ratio_one_always_hits_foreground():
    ds = _patches(foreground_ratio=1.0, samples_per_epoch=30)
    ds.set_epoch(1)
    assert all(bool(ds[i]["label"].any()) for i in range(len(ds)))


def test_whole_volume_mode_returns_padded_whole_shape():
    cache = FakeCache([(20, 22, 18), (24, 17, 19)])
    whole = whole_volume_shape([cache.image(n).shape[-3:] for n in cache.images], 4)
    assert whole == [24, 24, 20]
    ds = PatchDataset(cache, list(cache.images), whole, [1], samples_per_epoch=4, whole_volume=True)
    for i in range(len(ds)):
        sample = ds[i]
        assert sample["image"].shape == (1, *whole) and sample["label"].shape == (1, *whole)
        assert int(sample["label"].sum()) == int(cache.labels["case0"].sum())  # nothing cropped away


# ------------------------------------------------------------------------------------------- splits


@pytest.mark.parametrize("n,folds", [(10, 3), (6, 3), (7, 5), (5, 5)])
def test_kfold_splits_deterministic_disjoint_covering(n, folds):
    cases = [f"case_{i:02d}" for i in range(n)]
    splits = kfold_splits(cases, folds)
    assert splits == kfold_splits(list(reversed(cases)), folds)  # order of the input does not matter
    assert len(splits) == folds
    vals = [set(s["val"]) for s in splits]
    assert set().union(*vals) == set(cases) and sum(map(len, vals)) == n  # disjoint and covering
    for s in splits:
        assert s["val"] and not set(s["train"]) & set(s["val"])
        assert set(s["train"]) | set(s["val"]) == set(cases)
    with pytest.raises(ValueError, match="data.folds"):
        kfold_splits(cases, n + 1)


# ------------------------------------------------------------------------------------------------ lr


def test_lr_factor_schedules():
    assert [lr_factor(e, 10, "cosine", warmup=2) for e in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    cosine = [lr_factor(e, 10, "cosine") for e in range(10)]
    assert cosine[0] == 1.0 and all(a > b for a, b in zip(cosine, cosine[1:])) and cosine[-1] < 0.03
    assert lr_factor(10, 10, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(5, 10, "poly", power=0.9) == pytest.approx(0.5 ** 0.9)
    assert lr_factor(10, 10, "poly") == 0.0
    assert all(lr_factor(e, 10, "constant") == 1.0 for e in range(10))
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = build_scheduler(optimizer, SimpleNamespace(schedule="poly", warmup_epochs=1, poly_power=1.0),
                                max_epochs=5)
    lrs = []
    for _ in range(5):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.05, 0.1, 0.075, 0.05, 0.025])


# -------------------------------------------------------------------------------------- checkpoints


def test_failed_atomic_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "latest.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "epoch": 1})
    text = tmp_path / "summary.json"
    atomic_write_text(text, "old")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(lampseg.io.os, "replace", fail)
    with pytest.raises(CheckpointError, match=r"disk full\).*previous checkpoint there is intact"):
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "epoch": 2})
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(text, "new")
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))
    assert text.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt", "summary.json"]  # no temp files


class NotPlainData:
    pass


def test_load_checkpoint_is_weights_only(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"model": NotPlainData()}, tmp_path / "pickle.pt")
    with pytest.raises(ValueError, match="pickle.pt"):
        load_checkpoint(tmp_path / "pickle.pt")
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a lampseg checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


# ------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("overrides", [[], ["+exp=smoke"], ["+exp=brats"],
                                       ["+exp=smoke", "trainer.max_epochs=1"],  # adamw: 1 warm-up epoch
                                       ["data.patch_size=whole"], ["inference=sliding", "model=unet32"]])
def test_shipped_configs_validate(overrides):
    validate(compose(*overrides))


@pytest.mark.parametrize("override,key", [
    ("data.fold=3", "data.fold"),
    ("data.folds=1", "data.folds"),
    ("data.batch_size=0", "data.batch_size"),
    ("data.foreground_ratio=1.5", "data.foreground_ratio"),
    ("data.patch_size=[32,32]", "data.patch_size"),
    ("data.patch_size=[30,32,32]", "data.patch_size"),
    ("data.patch_size=big", "data.patch_size"),
    ("data.synthetic.layout=5d", "data.synthetic.layout"),
    ("data=brats data.regions.TC=[]", "data.regions.TC"),
    ("data=brats data.regions.ET=[0]", "data.regions.ET"),
    ("model.strides=[2]", "model.strides"),
    ("model.dropout=1.0", "model.dropout"),
    ("optim.lr=0", "optim.lr"),
    ("optim.warmup_epochs=3", "optim.warmup_epochs"),
    ("trainer.resume=sometimes", "trainer.resume"),
    ("trainer.device=tpu", "trainer.device"),
    ("inference.overlap=1.0", "inference.overlap"),
    ("inference.patch_size=[8,8]", "inference.patch_size"),
    ("split=test", "split"),
    ("parallel.dp=0", "parallel.dp"),
    ("slices=[-1,0,0]", "slices"),
    ("slices=[1,2]", "slices"),
    ("optim.beta2=1.0", "optim.beta2"),
    ("tune.search=bayes", "tune.search"),
    ("tune.scheduler=hyperband", "tune.scheduler"),
    ("tune.num_samples=0", "tune.num_samples"),
    ("tune.resources.cpu=-1", "tune.resources"),
])
def test_validate_names_the_key(override, key):
    cfg = compose("+exp=smoke", *override.split())
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert f"'{key}" in str(info.value), str(info.value)



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


def test_progress_bar_on_request_and_silent_otherwise(capsys):
    from lampseg.engine.steps import Progress

    bar = Progress("bar", total=3, epoch=7)
    for loss in (0.5, 0.4, 0.3):
        bar.update(loss)
    bar.close()
    err = capsys.readouterr().err
    assert "epoch 7" in err and "3/3" in err and "loss=0.3000" in err
    quiet = Progress("auto", total=3, epoch=1)  # pytest's stderr is not a terminal: no bar
    quiet.update(0.1)
    quiet.close()
    assert quiet.bar is None and capsys.readouterr().err == ""


@pytest.mark.parametrize("clip", [None, 1.0])
def test_a_step_with_non_finite_gradients_is_skipped_not_applied(clip):
    """bf16/fp32 have no GradScaler to catch overflow: the step must leave the weights untouched (clipping
    an infinite norm would otherwise turn every weight into NaN) and report NaN so the epoch counts it."""
    import math

    from lampseg.engine.setup import make_grad_scaler
    from lampseg.engine.steps import local_step

    cfg = compose("+exp=smoke", "trainer.precision=fp32",
                  f"optim.grad_clip={'null' if clip is None else clip}")
    model = torch.nn.Conv3d(2, 3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    scale = {"value": math.inf}

    def loss_fn(out, target):
        return (out * scale["value"]).mean()

    cpu = torch.device("cpu")
    step = local_step(model, optimizer, loss_fn, cfg, cpu, make_grad_scaler(cfg, cpu))
    image, target = torch.randn(1, 2, 4, 4, 4), torch.zeros(1)
    assert math.isnan(step(image, target))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    scale["value"] = 1.0
    assert math.isfinite(step(image, target))
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_every_subcommand_has_a_runner():
    """The CLI's table: every listed subcommand (but synth, handled inline) names an importable function."""
    import importlib

    from lampseg.__main__ import RUNNERS, SUBCOMMANDS

    assert set(RUNNERS) | {"synth"} == set(SUBCOMMANDS)
    for module, function, _ in RUNNERS.values():
        assert callable(getattr(importlib.import_module(module), function))


_REFAULTS = """
import resource, sys, torch
from lampseg.runtime.memory import keep_freed_cpu_memory
applied = keep_freed_cpu_memory() if sys.argv[1] == "keep" else False
faults = []
for _ in range(8):  # allocate, touch and free 128 MB again and again
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(2**25).sum()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, min(faults))  # glibc's heap settles after a few rounds; the best round shows reuse
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_cpu_memory_reuses_large_blocks_instead_of_faulting_them_in_again():
    import subprocess

    def faults(mode: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", _REFAULTS, mode], capture_output=True, text=True,
                             check=True)
        applied, count = out.stdout.split()
        return applied, int(count)

    (_, default), (applied, kept) = faults("default"), faults("keep")
    assert applied == "True"
    assert default > 1000  # glibc maps 128 MB afresh: one fault per page (or huge page) touched
    assert kept < default / 10, (kept, default)


def test_receptive_field_is_the_reach_of_one_output_voxel(strides=(2, 2)):
    """Perturbing the input just inside the reported reach changes the centre output; just outside, it
    does not (a batch-norm model in eval mode: no statistics that mix every voxel)."""
    from types import SimpleNamespace

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
