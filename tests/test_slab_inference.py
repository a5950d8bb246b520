"""Whole-volume inference over slabs (``engine/slab_inference.py``): ``predict`` and ``evaluate`` under
``parallel=spatial`` give one process's labels and Dice, and no rank holds a whole volume's logits."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import compose, lampseg, torchrun, worker_rows

from lampseg.engine.checkpoint import load_checkpoint, save_checkpoint
from lampseg.engine.slab_inference import pack_masks, unpack_masks
from lampseg.model.losses import Targets

FP32 = ["trainer.precision=fp32", "inference.mode=whole"]
SPLIT = ["parallel=spatial", "parallel.sp=2"]
WORKERS = Path(__file__).parent / "workers"


@pytest.fixture(scope="module")
def images(trained_run, tmp_path_factory):
    """Two of the smoke dataset's images in a folder of their own."""
    from lampseg.data.prepare import dataset_root

    folder = tmp_path_factory.mktemp("images")
    for path in sorted((dataset_root(compose("+exp=smoke").data) / "imagesTr").glob("*.nii.gz"))[:2]:
        shutil.copy(path, folder / path.name)
    return folder


def _labels(folder) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(nib.load(p).dataobj) for p in sorted(folder.glob("*.nii.gz"))}


@pytest.mark.parametrize("extra", [[], pytest.param(["data.target_spacing=[1.3,1.3,1.3]"],
                                                    marks=pytest.mark.extended)], ids=["native", "resampled"])
def test_slab_predict_writes_one_process_labels(trained_run, images, tmp_path, extra):
    """Labels identical to one process's (fp32), on the input's grid and with its affine; resampled inputs
    take the path where the logits go to the writing rank only (they are interpolated back)."""
    ckpt = trained_run / "checkpoints" / "best.pt"
    split = torchrun(2, "predict", f"ckpt={ckpt}", f"input={images}", f"output={tmp_path / 'split'}", *FP32,
                     *SPLIT, *extra, f"run_dir={tmp_path / 'r1'}")
    assert "(whole)" in split.stdout, split.stdout
    lampseg("predict", f"ckpt={ckpt}", f"input={images}", f"output={tmp_path / 'one'}", *FP32,
            "parallel=single", *extra, f"run_dir={tmp_path / 'r2'}")
    got, ref = _labels(tmp_path / "split"), _labels(tmp_path / "one")
    assert got.keys() == ref.keys() and len(got) == 2
    for name in got:
        assert got[name].shape == ref[name].shape and np.array_equal(got[name], ref[name]), name
        assert (got[name] > 0).any(), name  # a trained model: not trivially all background
        affine = [nib.load(tmp_path / d / name).affine for d in ("split", "one")]
        assert np.allclose(affine[0], nib.load(images / name).affine) and np.allclose(*affine)


def test_slab_evaluate_gives_one_process_dice_and_hd95(trained_run, tmp_path):
    """Dice from all-reduced overlap counts and HD95 from masks assembled on one rank: the one-process
    numbers per case; ``auto`` decides once for the group and takes the whole volume."""
    ckpt = trained_run / "checkpoints" / "best.pt"
    torchrun(2, "evaluate", f"ckpt={ckpt}", "trainer.precision=fp32", "inference.mode=auto", *SPLIT,
             f"run_dir={tmp_path / 'split'}")
    lampseg("evaluate", f"ckpt={ckpt}", "trainer.precision=fp32", "inference.mode=whole", "parallel=single",
            f"run_dir={tmp_path / 'one'}")
    split, one = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("split", "one"))
    assert [c["case"] for c in split["cases"]] == [c["case"] for c in one["cases"]]
    for a, b in zip(split["cases"], one["cases"]):
        assert a["inference"]["mode"] == "whole" and "slabs" in a["inference"]["reason"], a["inference"]
        assert a["dice"] == pytest.approx(b["dice"], abs=1e-12), a["case"]
        assert a["hd95"] == pytest.approx(b["hd95"], abs=1e-9, nan_ok=True), a["case"]


@pytest.mark.parametrize("regions", [None, {"WT": [1, 2, 3], "TC": [2, 3], "ET": [3]}])
def test_label_maps_from_assembled_masks_equal_those_from_logits(regions):
    """What a slab group assembles (packed masks) maps to the labels the logits give, for per-label softmax
    and for nested (and, where a prediction is not nested, overlapping) sigmoid regions."""
    targets = Targets.from_config({0: "bg", 1: "a", 2: "b", 3: "c"}, regions)
    logits = torch.randn(1, targets.out_channels, 6, 5, 4, generator=torch.Generator().manual_seed(0))
    masks = targets.masks_from_logits(logits)
    assert torch.equal(unpack_masks(pack_masks(masks[0]), masks.shape[1]), masks[0])
    assert torch.equal(targets.labels_from_masks(masks), targets.labels_from_logits(logits))
    many = torch.rand(11, 3, 3, 3) > 0.5  # more masks than a byte holds
    assert torch.equal(unpack_masks(pack_masks(many), 11), many)


def test_predicted_labels_outside_the_crop_box_are_background():
    """Sigmoid regions: outside the nonzero crop box a prediction is background (label 0), not the first
    region's label (restoring logits with channel 0 = 1 there painted the first region everywhere)."""
    from lampseg.commands.segment import restore_labels

    targets = Targets.from_config({0: "bg", 1: "a", 2: "b"}, {"AB": [1, 2], "B": [2]})
    meta = {"original_shape": [6, 6, 6], "crop_box": [[1, 5], [2, 6], [0, 4]],
            "preprocessed_shape": [4, 4, 4]}
    logits = torch.full((2, 4, 4, 4), -1.0)
    logits[:, 1:3] = 1.0  # rows 1-2 of the box: both regions -> label 2
    labels = restore_labels(logits, meta, targets)
    assert labels.shape == (6, 6, 6) and labels.dtype == np.uint8
    assert (labels[2:4, 2:6, 0:4] == 2).all() and labels.sum() == 2 * 2 * 4 * 4


def test_an_out_of_memory_rank_moves_every_rank_to_the_same_fallback():
    """inference.mode=auto over 2 slabs: one rank runs out of memory before any exchange, after the first
    block's exchanges, or in the last block; every time all ranks fall back together to the same sliding
    windows (no rank waits for the collective timeout), whose logits are one process's."""
    (row,) = worker_rows(2, WORKERS / "slab_fallback.py", timeout=240)
    assert row["first_mode"] == "whole" and row["first_is_slab"] and row["rows"] == [[0, 16], [16, 32]]
    assert row["slab_error"] < 1e-4
    assert [(f["block"], f["failing_rank"]) for f in row["fallbacks"]] == [(0, 1), (1, 0), (2, 1)]
    for fallback in row["fallbacks"]:
        assert fallback["mode"] == "sliding" and fallback["fallback_error"] < 1e-4, fallback
        (reason,) = fallback["fallbacks"]
        assert "out of memory" in reason, fallback


def test_bad_input_is_named_and_nothing_is_written(trained_run, images, tmp_path):
    """A volume too short for its slabs is a config error naming parallel.sp (on every rank at once, no
    collective timeout), and another model's weights a checkpoint error naming the file; no output either
    time."""
    small = tmp_path / "small" / "tiny.nii.gz"
    small.parent.mkdir()
    data = np.random.default_rng(0).random((4, 16, 16, 4)).astype(np.float32) + 1  # 4 rows: < 2 slabs of 4
    nib.save(nib.Nifti1Image(data, np.eye(4)), small)
    ckpt = trained_run / "checkpoints" / "best.pt"
    proc = torchrun(2, "predict", f"ckpt={ckpt}", f"input={small.parent}", f"output={tmp_path / 'out1'}",
                    *FP32, *SPLIT, f"run_dir={tmp_path / 'r1'}", check=False, timeout=120)
    assert proc.returncode != 0 and "config key 'parallel.sp'" in proc.stderr, proc.stderr[-2000:]
    assert "too small for 2 slabs" in proc.stderr
    assert not (tmp_path / "out1" / small.name).exists()
    state = load_checkpoint(ckpt)
    state["model"].pop(next(iter(state["model"])))
    other = tmp_path / "other.pt"
    save_checkpoint(other, state)  # a valid checkpoint whose weights are not its model's
    proc = lampseg("predict", f"ckpt={other}", f"input={images}", f"output={tmp_path / 'out2'}",
                   f"run_dir={tmp_path / 'r2'}", check=False)
    assert proc.returncode != 0 and f"checkpoint {other}" in proc.stderr, proc.stderr[-2000:]
    assert "weights do not fit" in proc.stderr and "Traceback" not in proc.stderr
    assert not list((tmp_path / "out2").glob("*.nii.gz"))
