"""Tests for lampseg.data.msd: parsing and validating MSD datasets (tiny NIfTI fixtures, no synth)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from omegaconf import OmegaConf

from lampseg.config import ConfigError
from lampseg.data.msd import Case, DataError, load_dataset, read_case, read_image
from lampseg.data.prepare import report_small_cases, resolve_channels

SHAPE = (12, 14, 10)
AFFINE = np.diag([1.5, 1.0, 2.0, 1.0])


def make_dataset(
    root: Path,
    n_cases: int = 3,
    modalities: tuple[str, ...] = ("CT", "PET"),
    layout: str = "4d",
    labels: dict[str, str] | None = None,
    n_test: int = 1,
    seed: int = 0,
) -> Path:
    """Write a tiny MSD dataset: nonzero image block in the middle, labels 1/2 inside it."""
    rng = np.random.default_rng(seed)
    labels = labels or {"0": "bg", "1": "liver", "2": "lesion"}
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "imagesTs").mkdir()
    training, test = [], []
    for i in range(n_cases + n_test):
        name = f"case_{i:03d}"
        img = np.zeros((*SHAPE, len(modalities)), dtype=np.float32)
        img[2:10, 3:12, 1:9] = rng.uniform(1.0, 5.0, size=(8, 9, 8, len(modalities)))
        if layout == "3d":
            assert len(modalities) == 1
            img = img[..., 0]
        if i >= n_cases:
            nib.save(nib.Nifti1Image(img, AFFINE), root / "imagesTs" / f"{name}.nii.gz")
            test.append(f"./imagesTs/{name}.nii.gz")
            continue
        lbl = np.zeros(SHAPE, dtype=np.uint8)
        lbl[3:8, 4:10, 2:7] = 1
        lbl[4:6, 5:7, 3:5] = 2
        nib.save(nib.Nifti1Image(img, AFFINE), root / "imagesTr" / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(lbl, AFFINE), root / "labelsTr" / f"{name}.nii.gz")
        training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    meta = {
        "name": "TinyTask",
        "modality": {str(i): m for i, m in enumerate(modalities)},
        "labels": labels,
        "training": training,
        "test": test,
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def edit_json(root: Path, **changes: object) -> None:
    meta = json.loads((root / "dataset.json").read_text())
    meta.update(changes)
    (root / "dataset.json").write_text(json.dumps(meta))


def test_load_dataset_names_from_json(tmp_path: Path) -> None:
    ds = load_dataset(make_dataset(tmp_path / "d"))
    assert ds.name == "TinyTask"
    assert ds.modalities == ["CT", "PET"]
    assert ds.labels == {0: "bg", 1: "liver", 2: "lesion"}
    assert [c.name for c in ds.cases] == ["case_000", "case_001", "case_002"]
    assert ds.cases[0].image == tmp_path / "d" / "imagesTr" / "case_000.nii.gz"
    assert ds.cases[0].label == tmp_path / "d" / "labelsTr" / "case_000.nii.gz"
    assert [(c.name, c.label) for c in ds.test] == [("case_003", None)]


def test_modality_order_labels_order_and_test_dicts(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "d")
    edit_json(root, modality={"1": "PET", "0": "CT"}, labels={"2": "lesion", "0": "bg", "1": "liver"},
              test=[{"image": "./imagesTs/case_003.nii.gz"}])
    ds = load_dataset(root)
    assert ds.modalities == ["CT", "PET"]
    assert list(ds.labels) == [0, 1, 2]
    assert ds.test[0].name == "case_003"


def test_modality_indices(tmp_path: Path) -> None:
    ds = load_dataset(make_dataset(tmp_path / "d"))
    assert ds.modality_indices(None) == [0, 1]
    assert ds.modality_indices(["pet"]) == [1]
    assert ds.modality_indices(["PET", 0]) == [1, 0]
    assert ds.modality_indices([1]) == [1]
    for bad in (["MRI"], [2], [-1], [], ["CT", "ct"]):
        with pytest.raises(DataError, match="CT") as err:
            ds.modality_indices(bad)
        assert "PET" in str(err.value)


def test_single_modality_3d(tmp_path: Path) -> None:
    ds = load_dataset(make_dataset(tmp_path / "d", modalities=("T2",), layout="3d"))
    image, label, affine, spacing = read_case(ds.cases[0], ds)
    assert image.shape == (1, *SHAPE) and image.dtype == np.float32
    assert label is not None and label.shape == SHAPE and label.dtype == np.uint8
    assert spacing == (1.5, 1.0, 2.0)
    np.testing.assert_allclose(affine, AFFINE)
    image, _ = read_image(ds.test[0].image, 1)
    assert image.shape == (1, *SHAPE)


def test_read_case_4d(tmp_path: Path) -> None:
    ds = load_dataset(make_dataset(tmp_path / "d"))
    image, label, _, _ = read_case(ds.cases[1], ds)
    assert image.shape == (2, *SHAPE) and image.flags.c_contiguous
    assert set(np.unique(label).tolist()) == {0, 1, 2}
    image, label, _, _ = read_case(ds.test[0], ds)
    assert label is None and image.shape == (2, *SHAPE)
    # 4D with a single channel is accepted for a one-modality dataset
    path = tmp_path / "c1.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((*SHAPE, 1), np.float32), AFFINE), path)
    assert read_image(path, 1)[0].shape == (1, *SHAPE)


@pytest.mark.parametrize(
    "breakage, match",
    [
        ("missing", "dataset.json not found"),
        ("malformed", "not valid JSON"),
        ("no_training_key", "training"),
        ("empty_training", "training"),
        ("bad_label_key", "not an integer"),
        ("no_background", "background"),
        ("duplicate_case", "duplicate"),
        ("duplicate_json_key", "duplicate key"),
        ("modality_gap", "modality"),
    ],
)
def test_dataset_json_errors(tmp_path: Path, breakage: str, match: str) -> None:
    root = make_dataset(tmp_path / "d")
    meta = json.loads((root / "dataset.json").read_text())
    if breakage == "missing":
        (root / "dataset.json").unlink()
    elif breakage == "malformed":
        (root / "dataset.json").write_text('{"name": "x", "modality": ')
    elif breakage == "no_training_key":
        del meta["training"]
    elif breakage == "empty_training":
        meta["training"] = []
    elif breakage == "bad_label_key":
        meta["labels"] = {"0": "bg", "one": "liver"}
    elif breakage == "no_background":
        meta["labels"] = {"1": "liver"}
    elif breakage == "duplicate_case":
        meta["training"].append(meta["training"][0])
    elif breakage == "modality_gap":
        meta["modality"] = {"0": "CT", "2": "PET"}
    if breakage == "duplicate_json_key":
        (root / "dataset.json").write_text('{"labels": {"0": "a", "0": "b"}, "modality": {"0": "CT"}}')
    elif breakage not in ("missing", "malformed"):
        (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=match) as err:
        load_dataset(root)
    assert "dataset.json" in str(err.value)


def test_missing_listed_file(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "d")
    (root / "labelsTr" / "case_001.nii.gz").unlink()
    with pytest.raises(DataError, match="case_001.nii.gz") as err:
        load_dataset(root)
    assert "does not exist" in str(err.value)


def _replace_label(root: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path = root / "labelsTr" / "case_000.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def test_shape_mismatch(tmp_path: Path) -> None:
    ds = load_dataset(make_dataset(tmp_path / "d"))
    _replace_label(ds.root, np.zeros((12, 14, 9), np.uint8))
    with pytest.raises(DataError, match=r"labelsTr/case_000\.nii\.gz.*imagesTr/case_000\.nii\.gz") as err:
        read_case(ds.cases[0], ds)
    assert "(12, 14, 9)" in str(err.value) and "(12, 14, 10)" in str(err.value)


def test_affine_mismatch(tmp_path: Path) -> None:
    ds = load_dataset(make_dataset(tmp_path / "d"))
    shifted = AFFINE.copy()
    shifted[0, 3] = 0.01
    _replace_label(ds.root, np.zeros(SHAPE, np.uint8), shifted)
    with pytest.raises(DataError, match=r"labelsTr/case_000\.nii\.gz.*affine.*imagesTr/case_000"):
        read_case(ds.cases[0], ds)
    shifted[0, 3] = 1e-4  # within tolerance
    _replace_label(ds.root, np.zeros(SHAPE, np.uint8), shifted)
    read_case(ds.cases[0], ds)


def test_undeclared_label_value(tmp_path: Path) -> None:
    ds = load_dataset(make_dataset(tmp_path / "d"))
    lbl = np.zeros(SHAPE, np.uint8)
    lbl[0, 0, 0] = 3
    _replace_label(ds.root, lbl)
    with pytest.raises(DataError, match=r"labelsTr/case_000\.nii\.gz.*\[3\].*\[0, 1, 2\]"):
        read_case(ds.cases[0], ds)


def test_non_integer_label(tmp_path: Path) -> None:
    ds = load_dataset(make_dataset(tmp_path / "d"))
    lbl = np.zeros(SHAPE, np.float32)
    lbl[1, 1, 1] = 0.5
    _replace_label(ds.root, lbl)
    with pytest.raises(DataError, match=r"labelsTr/case_000\.nii\.gz.*integers.*0\.5"):
        read_case(ds.cases[0], ds)
    lbl[1, 1, 1] = 2.0  # integral floats are fine
    _replace_label(ds.root, lbl)
    assert read_case(ds.cases[0], ds)[1].dtype == np.uint8


def test_channel_count_mismatch(tmp_path: Path) -> None:
    ds = load_dataset(make_dataset(tmp_path / "d"))
    with pytest.raises(DataError, match=r"case_000\.nii\.gz.*\(12, 14, 10, 2\).*expected 3"):
        read_image(ds.cases[0].image, 3)
    ds1 = load_dataset(make_dataset(tmp_path / "e", modalities=("T2",), layout="3d"))
    with pytest.raises(DataError, match=r"case_000\.nii\.gz.*1 channel.*expected 2"):
        read_image(ds1.cases[0].image, 2)


def test_nan_voxel(tmp_path: Path) -> None:
    ds = load_dataset(make_dataset(tmp_path / "d"))
    img = np.ones((*SHAPE, 2), np.float32)
    img[3, 3, 3, 1] = np.nan
    img[4, 3, 3, 0] = np.inf
    nib.save(nib.Nifti1Image(img, AFFINE), ds.cases[2].image)
    with pytest.raises(DataError, match=r"imagesTr/case_002\.nii\.gz.*2 NaN/Inf"):
        read_case(ds.cases[2], ds)


@pytest.mark.parametrize("kind", ["truncated", "garbage", "truncated_data"])
def test_corrupt_file(tmp_path: Path, kind: str) -> None:
    ds = load_dataset(make_dataset(tmp_path / "d"))
    path = ds.cases[0].image
    raw = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "garbage":
        path.write_bytes(b"this is not a nifti file at all" * 20)
    else:  # valid gzip stream, but the voxel data is cut short
        data = gzip.decompress(raw)
        path.write_bytes(gzip.compress(data[: 352 + 100]))
    with pytest.raises(DataError, match=r"imagesTr/case_000\.nii\.gz"):
        read_case(ds.cases[0], ds)


def test_corrupt_label(tmp_path: Path) -> None:
    ds = load_dataset(make_dataset(tmp_path / "d"))
    path = ds.cases[1].label
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DataError, match=r"labelsTr/case_001\.nii\.gz"):
        read_case(ds.cases[1], ds)


def test_case_is_frozen() -> None:
    case = Case("a", Path("a.nii.gz"), None)
    with pytest.raises(AttributeError):
        case.name = "b"  # type: ignore[misc]


def test_unknown_modality_is_a_config_error_listing_the_dataset_s(tmp_path: Path) -> None:
    """``data.modalities`` naming a modality the dataset lacks: the key, the name, and what there is."""
    ds = load_dataset(make_dataset(tmp_path / "d", modalities=("CT", "PET")))
    assert resolve_channels(ds, OmegaConf.create({"modalities": ["PET"]})) == [1]
    with pytest.raises(ConfigError, match=r"data\.modalities.*NOPE") as err:
        resolve_channels(ds, OmegaConf.create({"modalities": ["NOPE"]}))
    assert "CT" in str(err.value) and "PET" in str(err.value)


def test_cases_smaller_than_the_patch_are_said_once_as_information_when_all_are() -> None:
    """All cases smaller than the patch (the default synthetic dataset, cropped to its foreground): one
    ``info:`` line; some of them: a ``warning:`` with examples; none: nothing."""
    def cache(*shapes):
        images = {f"case_{i}": np.zeros((4, *s), np.float32) for i, s in enumerate(shapes)}
        return SimpleNamespace(cases=list(images), image=images.__getitem__)

    for shapes, start in [([(46, 46, 34)] * 3, "info: all 3 case(s) are smaller"),
                          ([(46, 46, 34), (64, 64, 64)], "warning: 1 of 2 case(s) are smaller"),
                          ([(64, 64, 48)], None)]:
        lines: list[str] = []
        report_small_cases(cache(*shapes), [48, 48, 48], lines.append)
        assert lines == [] if start is None else len(lines) == 1 and lines[0].startswith(start), lines
