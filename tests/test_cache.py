"""Tests for lampseg.data.cache: preprocessing transform, restore, and the on-disk cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lampseg.data.cache import (
    PreprocessConfig,
    PreprocessedDataset,
    build_cache,
    cache_dir,
    cache_key,
    foreground_coords,
    preprocess_array,
    restore_array,
)
from lampseg.data.msd import DataError, load_dataset, read_case

SHAPE = (12, 14, 10)
SPACING = (1.5, 1.0, 2.0)
BOX = [[2, 10], [3, 12], [1, 9]]


def make_arrays(seed: int = 0, channels: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Image (C, X, Y, Z) nonzero only inside BOX; label (X, Y, Z) with values 1 and 2 inside it."""
    rng = np.random.default_rng(seed)
    image = np.zeros((channels, *SHAPE), np.float32)
    image[:, 2:10, 3:12, 1:9] = rng.normal(50.0, 7.0, size=(channels, 8, 9, 8)).astype(np.float32)
    label = np.zeros(SHAPE, np.uint8)
    label[3:8, 4:10, 2:7] = 1
    label[4:6, 5:7, 3:5] = 2
    return image, label


def make_dataset(root: Path, n_cases: int = 3) -> Path:
    """Tiny 2-modality 4D MSD dataset (independent of lampseg.data.synth)."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    affine = np.diag([*SPACING, 1.0])
    training = []
    for i in range(n_cases):
        image, label = make_arrays(seed=i)
        nib.save(nib.Nifti1Image(np.moveaxis(image, 0, -1), affine), root / "imagesTr" / f"pt{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"pt{i}.nii.gz")
        training.append({"image": f"./imagesTr/pt{i}.nii.gz", "label": f"./labelsTr/pt{i}.nii.gz"})
    meta = {"name": "Tiny Task", "modality": {"0": "CT", "1": "PET"},
            "labels": {"0": "bg", "1": "liver", "2": "lesion"}, "training": training}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_crop_and_restore_exact() -> None:
    image, label = make_arrays()
    out, lab, meta = preprocess_array(image, label, SPACING, PreprocessConfig())
    assert meta["crop_box"] == BOX
    assert out.shape == (2, 8, 9, 8) and lab is not None and lab.shape == (8, 9, 8)
    assert out.dtype == np.float32 and lab.dtype == np.uint8
    assert meta["original_shape"] == list(SHAPE) and meta["preprocessed_shape"] == [8, 9, 8]
    np.testing.assert_array_equal(restore_array(lab, meta), label)
    json.dumps(meta)  # serialisable
    # probabilities: one-hot round trip, background-certain outside the crop
    probs = np.stack([lab == k for k in range(3)]).astype(np.float32)
    restored = restore_array(probs, meta)
    assert restored.shape == (3, *SHAPE)
    np.testing.assert_array_equal(restored.argmax(0), label)
    assert restored[0, 0, 0, 0] == 1.0 and restored[1:, 0, 0, 0].sum() == 0.0


def test_resampled_round_trip() -> None:
    image, label = make_arrays()
    cfg = PreprocessConfig(target_spacing=(1.0, 1.0, 1.0))
    out, lab, meta = preprocess_array(image, label, SPACING, cfg)
    assert meta["preprocessed_shape"] == [12, 9, 16]
    assert out.shape == (2, 12, 9, 16) and lab is not None and lab.shape == (12, 9, 16)
    assert set(np.unique(lab).tolist()) == {0, 1, 2}
    restored = restore_array(lab, meta)
    assert restored.shape == SHAPE
    assert (restored == label).mean() > 0.97
    assert (restored[label == 0] == 0).mean() > 0.95
    probs = np.stack([lab == k for k in range(3)]).astype(np.float32)
    restored_p = restore_array(probs, meta)
    assert restored_p.shape == (3, *SHAPE)
    assert (restored_p.argmax(0) == label).mean() > 0.95
    # resampling to a coarser grid, no label
    coarse = PreprocessConfig(target_spacing=(3.0, 2.0, 2.0))
    out2, lab2, meta2 = preprocess_array(image, None, SPACING, coarse)
    assert lab2 is None and out2.shape == (2, 4, 4, 8) and meta2["preprocessed_shape"] == [4, 4, 8]


def test_zscore_nonzero_stats() -> None:
    image, label = make_arrays(channels=3)
    image[2] *= 100.0
    out, _, meta = preprocess_array(image, label, SPACING, PreprocessConfig(crop_nonzero=False))
    mask = np.any(image != 0, axis=0)
    for channel in out:
        assert abs(channel[mask].mean()) < 1e-4
        assert abs(channel[mask].std() - 1.0) < 1e-3
        assert np.all(channel[~mask] == 0)
    assert len(meta["norm_stats"]) == 3 and abs(meta["norm_stats"][0][0] - 50.0) < 2.0
    assert meta["crop_box"] == [[0, s] for s in SHAPE]
    raw, _, _ = preprocess_array(image, label, SPACING, PreprocessConfig(normalize="none"))
    np.testing.assert_array_equal(raw, image[:, 2:10, 3:12, 1:9])
    with pytest.raises(ValueError, match="normalize"):
        PreprocessConfig(normalize="minmax")


def test_all_zero_image_keeps_full_size() -> None:
    image = np.zeros((1, *SHAPE), np.float32)
    out, lab, meta = preprocess_array(image, np.zeros(SHAPE, np.uint8), SPACING, PreprocessConfig())
    assert out.shape == (1, *SHAPE) and np.all(out == 0)
    assert meta["crop_box"] == [[0, s] for s in SHAPE]
    assert restore_array(lab, meta).shape == SHAPE


def test_preprocess_does_not_modify_input() -> None:
    image, label = make_arrays()
    before = image.copy()
    preprocess_array(image, label, SPACING, PreprocessConfig(crop_nonzero=False))
    np.testing.assert_array_equal(image, before)


def test_foreground_coords() -> None:
    _, label = make_arrays()
    fg = foreground_coords(label, "pt0")
    assert fg.dtype == np.int32 and fg.shape == (int((label > 0).sum()), 4)
    np.testing.assert_array_equal(label[fg[:, 1], fg[:, 2], fg[:, 3]], fg[:, 0])
    small = foreground_coords(label, "pt0", max_per_label=5)
    assert small.shape == (10, 4) and set(small[:, 0].tolist()) == {1, 2}
    np.testing.assert_array_equal(small, foreground_coords(label, "pt0", max_per_label=5))
    assert foreground_coords(np.zeros(SHAPE, np.uint8), "x").shape == (0, 4)


def test_build_and_reuse(tmp_path: Path) -> None:
    ds = load_dataset(make_dataset(tmp_path / "data"))
    logs: list[str] = []
    cache = build_cache(ds, tmp_path / "cache", PreprocessConfig(), log=logs.append)
    assert isinstance(cache, PreprocessedDataset)
    assert cache.directory.parent == tmp_path / "cache" and cache.directory.name.startswith("Tiny_Task-")
    assert len(logs) == 1 and logs[0].startswith("preprocessing 3 cases ->")
    assert cache.cases == ["pt0", "pt1", "pt2"] and cache.modalities == ["CT", "PET"]
    assert (cache.directory / "done.json").is_file()
    assert not list(cache.directory.glob("*.tmp"))
    image, label = cache.image("pt1"), cache.label("pt1")
    assert isinstance(image, np.memmap) and isinstance(label, np.memmap)
    assert image.dtype == np.float32 and image.shape == (2, 8, 9, 8) and label.dtype == np.uint8
    assert not isinstance(cache.image("pt1", mmap=False), np.memmap)
    fg = cache.foreground("pt1")
    assert fg.dtype == np.int32 and set(fg[:, 0].tolist()) == {1, 2}
    np.testing.assert_array_equal(np.asarray(label)[fg[:, 1], fg[:, 2], fg[:, 3]], fg[:, 0])
    meta = cache.meta("pt1")
    assert meta["crop_box"] == BOX and meta["spacing"] == list(SPACING)
    assert meta["modalities"] == ["CT", "PET"] and meta["preprocessed_shape"] == [8, 9, 8]
    np.testing.assert_allclose(meta["affine"], np.diag([*SPACING, 1.0]))
    _, ref_label, _, _ = read_case(ds.cases[1], ds)
    np.testing.assert_array_equal(restore_array(np.asarray(label), meta), ref_label)
    with pytest.raises(KeyError):
        cache.image("nope")
    again = build_cache(ds, tmp_path / "cache", PreprocessConfig(), log=logs.append)
    assert again.directory == cache.directory and len(logs) == 2 and logs[1].startswith("reusing")


def test_cache_key_changes(tmp_path: Path) -> None:
    ds = load_dataset(make_dataset(tmp_path / "data"))
    base = cache_key(ds, PreprocessConfig())
    assert base == cache_key(ds, PreprocessConfig())
    assert base != cache_key(ds, PreprocessConfig(target_spacing=(1.0, 1.0, 1.0)))
    assert base != cache_key(ds, PreprocessConfig(crop_nonzero=False))
    assert base != cache_key(ds, PreprocessConfig(normalize="none"))
    path = ds.cases[2].label
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert base != cache_key(ds, PreprocessConfig())
    changed = cache_key(ds, PreprocessConfig())
    (ds.root / "dataset.json").write_text((ds.root / "dataset.json").read_text() + "\n")
    assert changed != cache_key(ds, PreprocessConfig())
    assert cache_dir(ds, tmp_path, PreprocessConfig()).name.endswith(cache_key(ds, PreprocessConfig())[:12])


def test_incomplete_cache_is_rebuilt(tmp_path: Path) -> None:
    ds = load_dataset(make_dataset(tmp_path / "data"))
    cache = build_cache(ds, tmp_path / "cache", PreprocessConfig(), log=lambda _: None)
    good = np.array(cache.image("pt0"))
    (cache.directory / "done.json").unlink()
    with pytest.raises(DataError, match="done.json"):
        PreprocessedDataset(cache.directory)
    img_path = cache.directory / "pt0_image.npy"
    img_path.write_bytes(img_path.read_bytes()[:200])  # torn file from a crash
    (cache.directory / "pt2_meta.json").unlink()
    logs: list[str] = []
    rebuilt = build_cache(ds, tmp_path / "cache", PreprocessConfig(), log=logs.append)
    assert logs[0].startswith("preprocessing") and rebuilt.directory == cache.directory
    np.testing.assert_array_equal(rebuilt.image("pt0"), good)
    assert rebuilt.meta("pt2")["name"] == "pt2"


def test_bad_case_leaves_cache_incomplete(tmp_path: Path) -> None:
    ds = load_dataset(make_dataset(tmp_path / "data"))
    lbl = np.zeros(SHAPE, np.uint8)
    lbl[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(lbl, np.diag([*SPACING, 1.0])), ds.cases[1].label)
    with pytest.raises(DataError, match="pt1.nii.gz"):
        build_cache(ds, tmp_path / "cache", PreprocessConfig(), log=lambda _: None)
    assert not list((tmp_path / "cache").glob("*/done.json"))
