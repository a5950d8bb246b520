"""Tests for the synthetic MSD Task01-style dataset generator (lampseg.data.synth)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from lampseg.data import synth
from lampseg.data.synth import MODALITIES, MODALITY_INFORMATIVENESS, generate_dataset

SHAPE = (32, 32, 32)


def _load(root: Path, rel: str) -> np.ndarray:
    return np.asarray(nib.load(str(root / rel)).dataobj)


def _cases(root: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    meta = json.loads((root / "dataset.json").read_text())
    return [(_load(root, e["image"]), _load(root, e["label"])) for e in meta["training"]]


@pytest.fixture(scope="module")
def ds4d(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("synth") / "ds", cases=6, shape=SHAPE, seed=3)


def test_files_and_dataset_json(ds4d: Path) -> None:
    meta = json.loads((ds4d / "dataset.json").read_text())
    for key in ("name", "description", "tensorImageSize", "modality", "labels", "numTraining", "numTest",
                "training", "test"):
        assert key in meta
    assert meta["name"] == "SyntheticBraTS"
    assert meta["tensorImageSize"] == "4D"
    assert meta["modality"] == {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
    assert meta["labels"] == {"0": "background", "1": "edema", "2": "non-enhancing tumor",
                              "3": "enhancing tumour"}
    assert meta["numTraining"] == len(meta["training"]) == 6
    assert meta["numTest"] == len(meta["test"]) == 1
    first = {"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}
    assert meta["training"][0] == first
    for entry in meta["training"]:
        assert (ds4d / entry["image"]).is_file() and (ds4d / entry["label"]).is_file()
    for rel in meta["test"]:
        assert rel.startswith("./imagesTs/") and (ds4d / rel).is_file()
        assert not (ds4d / "labelsTr" / Path(rel).name).exists()
    assert [p.name for p in ds4d.parent.iterdir()] == ["ds"]  # no temp folders left behind


def test_4d_shapes_dtypes_and_affine(tmp_path: Path) -> None:
    shape, spacing = (32, 24, 20), (1.5, 1.0, 2.0)
    root = generate_dataset(tmp_path / "ds", cases=2, shape=shape, spacing=spacing)
    img = nib.load(str(root / "imagesTr" / "BRATS_001.nii.gz"))
    lab = nib.load(str(root / "labelsTr" / "BRATS_001.nii.gz"))
    assert img.shape == (*shape, 4) and img.get_data_dtype() == np.float32
    assert lab.shape == shape and lab.get_data_dtype() == np.uint8
    expected = np.diag([*spacing, 1.0])
    expected[:3, 3] = -np.array(shape) * np.array(spacing) / 2
    for im in (img, lab):
        np.testing.assert_allclose(im.affine, expected)
        np.testing.assert_allclose(im.header.get_zooms()[:3], spacing)
        assert int(im.header["qform_code"]) == 1 and int(im.header["sform_code"]) == 1
    assert np.asarray(img.dataobj).dtype == np.float32


def test_3d_layout_and_modality_subsets(tmp_path: Path) -> None:
    full = generate_dataset(tmp_path / "full", cases=2, shape=SHAPE)
    img4 = _load(full, "imagesTr/BRATS_002.nii.gz")

    flair = generate_dataset(tmp_path / "flair", cases=2, shape=SHAPE, layout="3d")
    meta = json.loads((flair / "dataset.json").read_text())
    assert meta["tensorImageSize"] == "3D" and meta["modality"] == {"0": "FLAIR"}
    img3 = _load(flair, "imagesTr/BRATS_002.nii.gz")
    assert img3.shape == SHAPE and img3.dtype == np.float32
    np.testing.assert_array_equal(img3, img4[..., 0])

    t2 = generate_dataset(tmp_path / "t2", cases=2, shape=SHAPE, layout="3d", modalities=("T2w",))
    assert json.loads((t2 / "dataset.json").read_text())["modality"] == {"0": "T2w"}
    np.testing.assert_array_equal(_load(t2, "imagesTr/BRATS_002.nii.gz"), img4[..., 3])

    sub = generate_dataset(tmp_path / "sub", cases=2, shape=SHAPE, modalities=("t1gd", "FLAIR"))
    assert json.loads((sub / "dataset.json").read_text())["modality"] == {"0": "t1gd", "1": "FLAIR"}
    np.testing.assert_array_equal(_load(sub, "imagesTr/BRATS_002.nii.gz"), img4[..., [2, 0]])
    lab = "labelsTr/BRATS_002.nii.gz"
    np.testing.assert_array_equal(_load(sub, lab), _load(full, lab))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"cases": 1}, "cases"), ({"shape": (32, 32, 8)}, "shape"), ({"layout": "2d"}, "layout"),
     ({"modalities": ("FLAIR", "DWI")}, "DWI"), ({"modalities": ("T1w", "T1w")}, "duplicate"),
     ({"seed": -1}, "seed"), ({"spacing": (1.0, 0.0, 1.0)}, "spacing")],
)
def test_argument_validation(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        generate_dataset(tmp_path / "ds", **{"shape": SHAPE, **kwargs})
    assert not (tmp_path / "ds").exists()


def test_labels_values_and_nesting(ds4d: Path) -> None:
    for image, label in _cases(ds4d):
        assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1, 2, 3}
        wt, tc = label > 0, label >= 2
        assert wt.sum() > 0 and (label == 3).sum() > 0
        # The core (2, 3) is enveloped by edema: its 6-neighbourhood never touches background.
        assert not (ndimage.binary_dilation(tc) & ~wt).any()
        # Every core voxel belongs to a whole-tumour component, and tumours lie inside the head.
        comps, _ = ndimage.label(wt)
        assert (comps[tc] > 0).all()
        assert (image[wt] > 0).all()


def test_determinism(tmp_path: Path) -> None:
    a = generate_dataset(tmp_path / "a", cases=2, shape=SHAPE, seed=7)
    b = generate_dataset(tmp_path / "b", cases=2, shape=SHAPE, seed=7)
    c = generate_dataset(tmp_path / "c", cases=2, shape=SHAPE, seed=8)
    for rel in ("imagesTr/BRATS_001.nii.gz", "labelsTr/BRATS_002.nii.gz", "imagesTs/BRATS_003.nii.gz"):
        np.testing.assert_array_equal(_load(a, rel), _load(b, rel))
        assert not np.array_equal(_load(a, rel), _load(c, rel))
    # Cases are distinct from each other too.
    assert not np.array_equal(_load(a, "imagesTr/BRATS_001.nii.gz"), _load(a, "imagesTr/BRATS_002.nii.gz"))


def test_zero_background_outside_head(ds4d: Path) -> None:
    for image, _ in _cases(ds4d):
        nonzero = image != 0
        head = nonzero[..., 0]
        assert (nonzero == head[..., None]).all()  # same support in every modality, positive inside
        assert (image >= 0).all()
        _, n = ndimage.label(head)
        assert n == 1 and 0.1 < head.mean() < 0.8
        for corner in np.ndindex(2, 2, 2):
            assert not head[tuple(i * (s - 1) for i, s in zip(corner, SHAPE, strict=True))]


def test_modality_informativeness(ds4d: Path) -> None:
    assert set(MODALITY_INFORMATIVENESS) == set(MODALITIES)
    for name in MODALITIES:
        assert name in synth.__doc__
    contrast = {m: [] for m in MODALITIES}
    for image, label in _cases(ds4d):
        brain = ndimage.binary_erosion(image[..., 0] > 0, iterations=3) & (label == 0)
        flair, t1, t1gd, t2 = (image[..., i] for i in range(4))
        edema, net, et, wt, tc = label == 1, label == 2, label == 3, label > 0, label >= 2
        # t1gd: enhancing rim very bright, only modality separating ET.
        assert t1gd[et].mean() > 1.4 * t1gd[edema].mean()
        assert t1gd[et].mean() > 1.4 * t1gd[brain].mean()
        if net.sum() >= 5:
            assert t1gd[net].mean() < t1gd[et].mean() - 150
        # FLAIR: whole tumour bright, sub-regions not separable.
        assert flair[wt].mean() > 1.6 * flair[brain].mean()
        assert abs(flair[tc].mean() - flair[edema].mean()) < 0.2 * flair[edema].mean()
        # T2w: core bright, edema moderately bright.
        assert t2[tc].mean() > 1.2 * t2[edema].mean()
        assert t2[edema].mean() > 1.2 * t2[brain].mean()
        for m, ch in zip(MODALITIES, (flair, t1, t1gd, t2), strict=True):
            contrast[m].append(abs(ch[wt].mean() - ch[brain].mean()) / ch[brain].mean())
    mean_contrast = {m: float(np.mean(v)) for m, v in contrast.items()}
    # T1w is nearly uninformative: tumour/brain contrast small relative to the others.
    assert mean_contrast["T1w"] < 0.1
    assert mean_contrast["T1w"] < 0.25 * min(mean_contrast[m] for m in ("FLAIR", "T2w"))


def test_idempotence_and_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    assert generate_dataset(out, cases=2, shape=SHAPE) == out
    stamp = (out / "dataset.json").stat().st_mtime_ns
    assert generate_dataset(out, cases=3, shape=SHAPE) == out  # existing dataset: not regenerated
    assert (out / "dataset.json").stat().st_mtime_ns == stamp
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 2

    generate_dataset(out, cases=3, shape=SHAPE, overwrite=True)
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 3
    assert len(list((out / "imagesTr").iterdir())) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_existing_folder_without_dataset_json(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    out.mkdir()
    (out / "stray.txt").write_text("half a dataset")
    with pytest.raises(FileExistsError, match="dataset.json"):
        generate_dataset(out, cases=2, shape=SHAPE)
    assert (out / "stray.txt").exists()
    generate_dataset(out, cases=2, shape=SHAPE, overwrite=True)
    assert (out / "dataset.json").is_file() and not (out / "stray.txt").exists()


def test_crash_leaves_no_partial_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_save = synth._save

    def flaky_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        real_save(*args, **kwargs)

    monkeypatch.setattr(synth, "_save", flaky_save)
    with pytest.raises(RuntimeError, match="disk full"):
        generate_dataset(tmp_path / "ds", cases=2, shape=SHAPE)
    assert list(tmp_path.iterdir()) == []


def test_laterality_context_labels_by_side_not_by_look(tmp_path):
    """context=laterality: cores look the same (t1gd) whether labelled 2 or 3; 3 sits left of 2."""
    import nibabel as nib
    import numpy as np

    from lampseg.data.synth import generate_dataset

    plain = generate_dataset(tmp_path / "plain", cases=4, shape=(48, 48, 32), seed=3)
    side = generate_dataset(tmp_path / "side", cases=4, shape=(48, 48, 32), seed=3, context="laterality")
    assert "context=laterality" in (side / "dataset.json").read_text()

    def stats(root):
        t1gd, xs = {2: [], 3: []}, {2: [], 3: []}
        for i in range(1, 5):
            image = np.asarray(nib.load(root / "imagesTr" / f"BRATS_{i:03d}.nii.gz").dataobj)
            label = np.asarray(nib.load(root / "labelsTr" / f"BRATS_{i:03d}.nii.gz").dataobj)
            for lab in (2, 3):
                t1gd[lab].append(image[..., 2][label == lab])
                xs[lab].append(np.nonzero(label == lab)[0])
        return ({k: float(np.concatenate(v).mean()) for k, v in t1gd.items()},
                {k: float(np.concatenate(v).mean()) for k, v in xs.items()})

    look, _ = stats(plain)
    assert look[3] > 1.5 * look[2]  # normally the enhancing rim is what t1gd shows
    look, where = stats(side)
    assert abs(look[3] / look[2] - 1) < 0.1  # with laterality it looks like the rest of the core
    assert where[3] < 24 < where[2]  # and its label says which side of the head it is on
    with pytest.raises(ValueError, match="context"):
        generate_dataset(tmp_path / "bad", cases=2, shape=(16, 16, 16), context="up")
