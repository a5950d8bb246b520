"""Patch sampling (``data/sampling.py``) and k-fold splits (``data/splits.py``)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lampseg.data.sampling import (
    EpochSampler,
    PatchDataset,
    Slab,
    build_augment,
    read_block,
    split_rows,
    training_loader,
    whole_volume_shape,
)
from lampseg.data.splits import kfold_splits

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


def test_persistent_loader_workers_draw_each_epochs_patches():
    """Workers kept from epoch to epoch hold the dataset as it was when they started; the sampler carries
    the epoch to them, so epoch 2 is epoch 2's patches (not epoch 1's again), exactly as without workers."""
    ds = _patches(samples_per_epoch=4)
    sampler = EpochSampler(len(ds))
    loader = training_loader(ds, sampler, batch_size=2, workers=1)
    assert loader.persistent_workers
    seen = []
    for epoch in (1, 2):
        sampler.set_epoch(epoch)
        batches = list(loader)
        alone = _patches(samples_per_epoch=4)
        alone.set_epoch(epoch)
        expected = torch.stack([alone[i]["image"] for i in range(4)])
        assert torch.equal(torch.cat([b["image"] for b in batches]), expected)
        seen.append(expected)
    assert not torch.equal(seen[0], seen[1])
    assert not training_loader(ds, sampler, batch_size=2, workers=0).persistent_workers


@pytest.mark.parametrize("length, replicas", [(12, 1), (12, 2), (13, 2), (12, 3)])
def test_epoch_sampler_splits_like_distributed_sampler(length, replicas):
    from torch.utils.data import DistributedSampler

    for rank in range(replicas):
        sampler = EpochSampler(length, replicas, rank)
        sampler.set_epoch(5)
        want = list(DistributedSampler(range(length), replicas, rank, shuffle=False, drop_last=True)) \
            if replicas > 1 else list(range(length))
        assert list(sampler) == [(5, i) for i in want] and len(sampler) == len(want)


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


@pytest.mark.parametrize("rotate_prob", [0.0, 1.0])  # rotations mix rows: those samples are cut after
def test_slabs_read_what_the_whole_sample_holds(rotate_prob):
    """Spatial parallelism: each process reads only its slab of every sample, with the same sampling,
    flips and intensity augmentation, so the slabs put together are the whole sample."""
    aug = build_augment(SimpleNamespace(rotate_prob=rotate_prob, rotate_degrees=15.0, intensity_prob=0.5,
                                        flip_prob=0.5))
    whole = _patches(patch_size=[12, 8, 8], augment=aug)
    parts = [_patches(patch_size=[12, 8, 8], augment=aug, slab=Slab(i, 3, 4)) for i in range(3)]
    assert parts[0].cut_after_augment == (rotate_prob > 0)
    for ds in (whole, *parts):
        ds.set_epoch(2)
    for index in range(len(whole)):
        sample = whole[index]
        pieces = [part[index] for part in parts]
        assert [p["image"].shape[1] for p in pieces] == [4, 4, 4]
        for key in ("image", "label"):
            torch.testing.assert_close(torch.cat([p[key] for p in pieces], dim=1), sample[key])


def test_split_rows_gives_multiples_as_equal_as_possible():
    assert split_rows(32, 2, 4) == [(0, 16), (16, 32)]
    assert split_rows(28, 4, 4) == [(0, 8), (8, 16), (16, 24), (24, 28)]
    with pytest.raises(ValueError, match="at least 16"):
        split_rows(12, 4, 4)
    with pytest.raises(ValueError, match="multiple of 4"):
        split_rows(30, 2, 4)
