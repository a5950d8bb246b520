"""``python -m lampseg export ckpt=PATH out=DIR``: the MONAI bundle it writes passes MONAI's own checks,
segments as ``lampseg predict`` does, and its TorchScript and state dict are the checkpoint's model.

MONAI's bundle CLI (``python -m monai.bundle``) needs ``fire`` (``pip install lampseg[bundle]``); where it is
not installed, ``monai_bundle`` calls the same ``monai.bundle.scripts`` function that the CLI would.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO, lampseg, train_here, with_ignite

from lampseg.commands.export import export_bundle
from lampseg.commands.predict import predict_images
from lampseg.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from lampseg.model.losses import Targets
from lampseg.model.unet import build_model

STANDARD_KEYS = ("bundle_root", "output_dir", "dataset_dir", "datalist", "device", "network_def", "network",
                 "preprocessing", "postprocessing", "inferer", "dataset", "dataloader", "evaluator",
                 "initialize", "run", "ckpt_path")
METADATA_KEYS = ("version", "changelog", "monai_version", "pytorch_version", "numpy_version",
                 "required_packages_version", "task", "description", "authors", "copyright",
                 "network_data_format")


def monai_bundle(command: str, *positional: str, **options: str) -> subprocess.CompletedProcess:
    """``python -m monai.bundle COMMAND POSITIONAL --KEY VALUE ...`` with lampseg importable (the bundle may
    name ``lampseg.data.transforms``); fails the test on a non-zero exit."""
    env = with_ignite(dict(os.environ))  # run_evaluator's SupervisedEvaluator needs it
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env["PYTHONPATH"]]))
    if importlib.util.find_spec("fire") is not None:
        args = [sys.executable, "-m", "monai.bundle", command, *positional]
        args += [item for key, value in options.items() for item in (f"--{key}", str(value))]
    else:  # the function `python -m monai.bundle COMMAND` calls, with the same arguments
        code = ("import json, sys; from monai.bundle import scripts; "
                "getattr(scripts, sys.argv[1])(*json.loads(sys.argv[2]), **json.loads(sys.argv[3]))")
        args = [sys.executable, "-c", code, command, json.dumps(positional),
                json.dumps({k: str(v) for k, v in options.items()})]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    if proc.returncode != 0:
        pytest.fail(f"monai.bundle {command} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def export(ckpt: Path, out: Path, tmp: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return lampseg("export", f"ckpt={ckpt}", f"out={out}", f"run_dir={tmp / 'export_run'}", *extra,
                   check=check)


def label_dice(a: np.ndarray, b: np.ndarray) -> dict[int, float]:
    """Dice of each label value present in either map (1.0 where both lack it)."""
    values = sorted(set(np.unique(a).tolist()) | set(np.unique(b).tolist()) - {0})
    return {v: 2 * float(((a == v) & (b == v)).sum()) / max(1, int((a == v).sum() + (b == v).sum()))
            for v in values}


def held_out_images(run_dir: Path, folder: Path) -> Path:
    """The dataset's test image(s) and one validation case of ``run_dir``'s fold, copied into ``folder``."""
    summary = json.loads((run_dir / "summary.json").read_text())
    root = Path(summary["dataset"]).expanduser()
    meta = json.loads((root / "dataset.json").read_text())
    val_case = json.loads((run_dir / "splits.json").read_text())[0]["val"][0]
    folder.mkdir()
    for path in [root / p for p in meta["test"]] + [root / "imagesTr" / f"{val_case}.nii.gz"]:
        shutil.copy(path, folder)
    return folder


def agreement(ckpt: Path, images: Path, bundle: Path, tmp: Path, cli: bool = True) -> dict[str, dict]:
    """Per case: Dice per label between ``monai.bundle run`` and ``lampseg predict`` (through the CLI, or
    ``predict_images`` in this process)."""
    out = tmp / "bundle_out"
    monai_bundle("run", config_file=bundle / "configs" / "inference.json", bundle_root=bundle,
                 dataset_dir=images, output_dir=out)
    if cli:
        lampseg("predict", f"ckpt={ckpt}", f"input={images}", f"output={tmp / 'predict_out'}",
                f"run_dir={tmp / 'predict_run'}")
    else:
        predict_images(ckpt, images, tmp / "predict_out", log=lambda *_: None)
    result = {}
    for image in sorted(images.glob("*.nii.gz")):
        ours = nib.load(tmp / "predict_out" / image.name)
        theirs = nib.load(out / image.name.replace(".nii.gz", "_seg.nii.gz"))
        assert theirs.shape == ours.shape == nib.load(image).shape[:3]
        np.testing.assert_allclose(theirs.affine, ours.affine, atol=1e-5)
        result[image.name] = label_dice(np.asarray(ours.dataobj), np.asarray(theirs.dataobj))
    return result


@pytest.fixture(scope="module")
def bundle(trained_run, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("export")
    export(trained_run / "checkpoints" / "best.pt", tmp / "bundle", tmp)
    return tmp / "bundle"


def test_export_writes_a_monai_bundle(bundle, trained_run):
    files = sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file())
    assert files == ["configs/inference.json", "configs/logging.conf", "configs/metadata.json",
                     "docs/README.md", "models/model.pt", "models/model.ts"]
    assert [p.name for p in bundle.parent.iterdir() if p.name.startswith(".")] == []  # no temp folder left
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert all(key in meta for key in METADATA_KEYS)
    formats = meta["network_data_format"]
    image, pred = formats["inputs"]["image"], formats["outputs"]["pred"]
    assert image["channel_def"] == {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
    assert image["num_channels"] == 4 and pred["num_channels"] == 4
    assert image["spatial_shape"] == ["4*(n+1)"] * 3  # strides [2, 2]; instance norm needs 8 voxels or more
    assert pred["channel_def"]["3"] == "enhancing tumour"
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    assert all(key in config for key in STANDARD_KEYS)
    assert config["ckpt_path"] == "$@bundle_root + '/models/model.pt'"
    assert config["inferer"]["_target_"] == "SimpleInferer"  # the checkpoint's inference.mode=auto
    assert "lampseg" not in json.dumps(config)  # softmax labels, native spacing: MONAI transforms only
    readme = (bundle / "docs" / "README.md").read_text()
    ckpt = load_checkpoint(trained_run / "checkpoints" / "best.pt")
    assert f"{ckpt['train_state']['best_val_dice']:.4f}" in readme
    assert "python -m monai.bundle run" in readme and "FLAIR" in readme


def test_verify_net_in_out_passes(bundle):
    proc = monai_bundle("verify_net_in_out", "network_def", meta_file=bundle / "configs" / "metadata.json",
                        config_file=bundle / "configs" / "inference.json")
    assert "verified with no error" in proc.stdout + proc.stderr


def test_bundle_run_agrees_with_predict(bundle, trained_run, tmp_path):
    images = held_out_images(trained_run, tmp_path / "images")
    dice = agreement(trained_run / "checkpoints" / "best.pt", images, bundle, tmp_path)
    assert len(dice) == 2
    for case, per_label in dice.items():
        assert per_label and min(per_label.values()) >= 0.99, (case, per_label)


@pytest.mark.extended
@pytest.mark.skipif(importlib.util.find_spec("ignite") is None,
                    reason="MONAI's SupervisedEvaluator needs pytorch-ignite (pip install lampseg[bundle])")
def test_run_evaluator_writes_what_run_writes(bundle, trained_run, tmp_path):
    images = held_out_images(trained_run, tmp_path / "images")
    for run_id in ("run", "run_evaluator"):
        monai_bundle("run", run_id, config_file=bundle / "configs" / "inference.json", bundle_root=bundle,
                     dataset_dir=images, output_dir=tmp_path / run_id)
    for path in sorted((tmp_path / "run").iterdir()):
        other = tmp_path / "run_evaluator" / path.name
        assert np.array_equal(np.asarray(nib.load(path).dataobj), np.asarray(nib.load(other).dataobj))


def _checkpoint_model(ckpt: dict) -> torch.nn.Module:
    from lampseg.config import restore

    cfg = restore(ckpt["config"])
    targets = Targets.from_config({int(k): v for k, v in ckpt["data"]["labels"].items()}, cfg.data.regions)
    model = build_model(cfg.model, len(ckpt["data"]["channels"]), targets.out_channels)
    model.load_state_dict(ckpt["model"])
    return model.eval()


@torch.no_grad()
def test_torchscript_gives_the_checkpoints_logits(bundle, trained_run):
    model = _checkpoint_model(load_checkpoint(trained_run / "checkpoints" / "best.pt"))
    scripted = torch.jit.load(str(bundle / "models" / "model.ts"))
    for shape in ((8, 8, 8), (12, 16, 8), (32, 32, 32)):
        x = torch.randn(1, 4, *shape, generator=torch.Generator().manual_seed(1))
        want, got = model(x), scripted(x)
        assert got.shape == want.shape == (1, 4, *shape)
        assert float((got - want).abs().max()) <= 1e-5 * max(1.0, float(want.abs().max()))


def test_model_pt_loads_into_network_def(bundle, trained_run):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(bundle / "configs" / "inference.json")
    net = parser.get_parsed_content("network_def")
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    net.load_state_dict(state)  # strict: every key, every shape
    ckpt = load_checkpoint(trained_run / "checkpoints" / "best.pt")
    assert all(torch.equal(state[k], v) for k, v in ckpt["model"].items())


def test_existing_out_is_refused_then_replaced_with_overwrite(trained_run, tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    ckpt = trained_run / "checkpoints" / "best.pt"
    proc = export(ckpt, out, tmp_path, check=False)
    assert proc.returncode == 2
    assert "export.out" in proc.stderr and str(out) in proc.stderr and "export.overwrite=true" in proc.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    export(ckpt, out, tmp_path, "overwrite=true")
    assert not (out / "keep.txt").exists() and (out / "models" / "model.ts").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_failure_half_way_leaves_the_old_bundle_whole(trained_run, tmp_path, monkeypatch):
    from lampseg.commands import export as export_module

    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    def fail(*_):
        raise RuntimeError("disk gone")

    monkeypatch.setattr(export_module, "_torchscript", fail)  # after configs/ and model.pt are written
    with pytest.raises(RuntimeError, match="disk gone"):
        export_bundle(trained_run / "checkpoints" / "best.pt", out, overwrite=True, log=lambda *_: None)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no temp folder left


def test_not_a_checkpoint_is_named(tmp_path):
    garbage = tmp_path / "notes.pt"
    garbage.write_bytes(b"not a checkpoint")
    proc = export(garbage, tmp_path / "bundle", tmp_path, check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("lampseg export: error: checkpoint") and "notes.pt could not be loaded" \
        in proc.stderr, proc.stderr
    assert not (tmp_path / "bundle").exists()


def test_missing_foreign_and_other_model_checkpoints_are_named(trained_run, tmp_path):
    ckpt = load_checkpoint(trained_run / "checkpoints" / "best.pt")
    model = {**ckpt["config"]["model"], "channels": [8, 16, 64]}
    other = dict(ckpt, config={**ckpt["config"], "model": model})
    save_checkpoint(tmp_path / "other.pt", other)  # [8, 16, 32]'s weights under another model's config
    save_checkpoint(tmp_path / "weights.pt", {"model": ckpt["model"]})  # a state dict, no config
    cases = [("missing.pt", FileNotFoundError, "missing.pt does not exist"),
             ("weights.pt", CheckpointError, "weights.pt has no 'config' entry"),
             ("other.pt", CheckpointError, "other.pt: its 'model' weights do not fit")]
    for name, error, message in cases:
        with pytest.raises(error, match=message):
            export_bundle(tmp_path / name, tmp_path / "bundle")
        assert not (tmp_path / "bundle").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.extended
def test_regions_spacing_and_channel_subset_agree_with_predict(trained_run, tmp_path):
    """Sigmoid regions (BraTS WT/TC/ET), resampling and two of four modalities: the bundle names
    ``lampseg.data.transforms`` and still segments as predict does, also outside the nonzero box."""
    summary = json.loads((trained_run / "summary.json").read_text())
    run = tmp_path / "run"
    root = Path(summary["dataset"]).expanduser()
    train_here(run, "+exp=smoke", "data=brats", f"data.root={root}", "data.patch_size=[32,32,32]",
               "data.num_workers=0", "data.samples_per_epoch=4", "data.modalities=[FLAIR,t1gd]",
               "data.target_spacing=[1.5,1.25,1.0]", "trainer.max_epochs=1", "trainer.hd95=false",
               "trainer.num_threads=1")
    ckpt = run / "checkpoints" / "best.pt"
    export_bundle(ckpt, tmp_path / "bundle", log=lambda *_: None)
    meta = json.loads((tmp_path / "bundle" / "configs" / "metadata.json").read_text())
    assert "lampseg" in meta["required_packages_version"]
    assert meta["network_data_format"]["inputs"]["image"]["channel_def"] == {"0": "FLAIR", "1": "t1gd"}
    images = held_out_images(trained_run, tmp_path / "images")
    dice = agreement(ckpt, images, tmp_path / "bundle", tmp_path, cli=False)
    for case, per_label in dice.items():
        assert per_label and min(per_label.values()) >= 0.99, (case, per_label)
    for case in dice:  # predict, too, labels nothing outside the box where a modality is nonzero
        seg = np.asarray(nib.load(tmp_path / "predict_out" / case).dataobj)
        nonzero = np.any(np.asarray(nib.load(images / case).dataobj) != 0, axis=-1)
        box = tuple(slice(idx.min(), idx.max() + 1) for idx in np.nonzero(nonzero))
        inside = np.zeros_like(nonzero)
        inside[box] = True
        assert not seg[~inside].any()
