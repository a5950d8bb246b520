"""End to end through ``python -m lampseg ...`` (train, evaluate, predict, synth, multirun, config errors)."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from conftest import compose, lampseg
from run_dir_contract import check_run_dir

SMOKE_FAST = ["+exp=smoke", "trainer.max_epochs=1", "data.samples_per_epoch=2", "trainer.hd95=false",
              "trainer.num_threads=1"]


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _dataset_json(run_dir: Path) -> tuple[Path, dict]:
    root = Path(_summary(run_dir)["dataset"])
    return root, json.loads((root / "dataset.json").read_text())


def _metrics(run_dir: Path) -> tuple[list[str], list[dict]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


# --------------------------------------------------------------------------------------------- help


def test_help_lists_subcommands():
    out = lampseg("--help").stdout
    for name in ("train", "evaluate", "predict", "synth"):
        assert name in out


def test_unknown_subcommand_fails():
    proc = lampseg("frobnicate", check=False)
    assert proc.returncode != 0
    assert "frobnicate" in proc.stderr


# -------------------------------------------------------------------------------------------- train


def test_train_smoke_run_dir(trained_run):
    problems = check_run_dir(trained_run)
    assert problems == [], problems
    summary = _summary(trained_run)
    assert summary["status"] == "completed"
    assert summary["epochs"] == 2
    assert summary["plan"] is None
    columns, rows = _metrics(trained_run)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    _, meta = _dataset_json(trained_run)
    names = [meta["labels"][v] for v in sorted(meta["labels"], key=int) if v != "0"]
    # one spelling for every logger: label names with spaces ("non-enhancing tumor") get underscores
    keys = [n.replace(" ", "_") for n in names]
    assert [c for c in columns if c.startswith("val_dice_")] == [f"val_dice_{k}" for k in keys]
    assert any(" " in n for n in names) and not any(" " in c for c in columns)
    assert sorted(summary["val_dice"]) == sorted(names)
    config = (trained_run / ".hydra" / "config.yaml").read_text()
    assert "${" not in config
    assert str(trained_run) in config  # run_dir resolved to the real directory


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _replace_text(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def _rename_metrics_column(run: Path, old: str, new: str) -> None:
    lines = (run / "metrics.csv").read_text().splitlines(keepends=True)
    (run / "metrics.csv").write_text(lines[0].replace(old, new, 1) + "".join(lines[1:]))


def _drop_last_metrics_row(run: Path) -> None:
    lines = (run / "metrics.csv").read_text().splitlines(keepends=True)
    (run / "metrics.csv").write_text("".join(lines[:-1]))


def _ddp_names(run: Path) -> None:
    """final.pt saved as a DistributedDataParallel wrapper would name it (``module.`` prefixes)."""
    path = run / "checkpoints" / "final.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt.pop("checksum", None)
    ckpt["model"] = {f"module.{k}": v for k, v in ckpt["model"].items()}
    torch.save(ckpt, path)


def _edit_checkpoint_epoch(path: Path) -> None:
    ckpt = torch.load(path, weights_only=True)
    ckpt["epoch"] += 1  # the checksum saved with it no longer matches
    torch.save(ckpt, path)


BREAKAGES = {  # what is broken -> the problem check_run_dir must report
    "summary-key": (lambda r: _edit_json(r / "summary.json", lambda s: s.pop("best_val_dice")),
                    "summary.json lacks 'best_val_dice'"),
    "summary-type": (lambda r: _edit_json(r / "summary.json", lambda s: s.update(params="37k")),
                     "summary.json 'params' is '37k'"),
    "status": (lambda r: _edit_json(r / "summary.json", lambda s: s.update(status="done")),
               "summary.json 'status' is 'done'"),
    "precision": (lambda r: _edit_json(r / "summary.json", lambda s: s.update(precision="auto")),
                  "summary.json 'precision' is 'auto'"),
    "metrics-column": (lambda r: _rename_metrics_column(r, "train_loss", "loss"),
                       "metrics.csv lacks column 'train_loss'"),
    "metrics-name": (lambda r: _rename_metrics_column(r, "val_dice_edema", "val_dice_oedema"),
                     "val_dice_<name> columns"),
    "metrics-rows": (_drop_last_metrics_row, "metrics.csv has 1 rows, summary.json says 2 epochs"),
    "config": (lambda r: _replace_text(r / ".hydra/config.yaml", "seed: 0", "seed: ${oops}"), "unresolved"),
    "progress": (lambda r: (r / "progress.png").unlink(), "missing progress.png"),
    "tb": (lambda r: shutil.rmtree(r / "tb"), "missing TensorBoard events under tb/"),
    "checkpoint-pickle": (lambda r: torch.save({"model": {}, "epoch": Path("x")}, r / "checkpoints/best.pt"),
                          "best.pt does not load with weights_only=True"),  # a Path is not a weight
    "checkpoint-names": (_ddp_names, "final.pt parameter names/shapes are not the unpartitioned model's"),
    "checkpoint-corrupt": (lambda r: _edit_checkpoint_epoch(r / "checkpoints" / "latest.pt"),
                           "latest.pt does not match its checksum"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_run_dir_contract_finds_what_is_broken(tmp_path, trained_run, breakage):
    """The checker of the run-directory contract is not vacuous: on a copy of a good run directory with one
    thing broken it reports that thing."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    config = run / ".hydra" / "config.yaml"
    config.write_text(config.read_text().replace(str(trained_run), str(run)))  # the config names its run dir
    assert check_run_dir(run) == []
    breaker, problem = BREAKAGES[breakage]
    breaker(run)
    problems = check_run_dir(run)
    assert any(problem in p for p in problems), problems


def _assert_config_error(tmp_path, override: str, key: str, *also: str) -> str:
    """``lampseg train OVERRIDE`` is a config error: exit 2, one ``lampseg train: config error: ...`` line
    naming ``'key'`` (and ``also``), no traceback, nothing written."""
    run_dir = tmp_path / "run"
    proc = lampseg("train", "+exp=smoke", override, f"run_dir={run_dir}", check=False)
    message = proc.stdout + proc.stderr
    assert proc.returncode == 2, message
    assert "Traceback" not in message, message
    lines = [line for line in proc.stderr.splitlines() if line.startswith("lampseg train: config error: ")]
    assert len(lines) == 1, message
    assert f"'{key}'" in lines[0], message
    for text in also:
        assert text in message, message
    # The error came before any training: no checkpoints, no summary.
    assert not (run_dir / "summary.json").exists()
    assert not list(run_dir.glob("checkpoints/*.pt"))
    return message


@pytest.mark.parametrize("override,key", [
    ("trainer.max_epoch=3", "trainer.max_epoch"),           # unknown key
    pytest.param("trainer.max_epochs=abc", "trainer.max_epochs", marks=pytest.mark.extended),  # wrong type
    pytest.param("trainer.precision=fp64", "trainer.precision", marks=pytest.mark.extended),  # bad enum value
    ("data.fold=7", "data.fold"),                           # range (lampseg.config.validate)
    pytest.param("data.patch_size=[30,30,30]", "data.patch_size",  # not a multiple of prod(model.strides)
                 marks=pytest.mark.extended),
])
def test_config_errors_name_the_key(tmp_path, override, key):
    _assert_config_error(tmp_path, override, key)


@pytest.mark.extended  # in-process: tests/test_msd.py
def test_unknown_modality_lists_available(tmp_path, trained_run):
    # trained_run: the default synthetic dataset already exists, so this only reads dataset.json.
    message = _assert_config_error(tmp_path, "data.modalities=[NOPE]", "data.modalities", "NOPE")
    for modality in ("FLAIR", "T1w", "t1gd", "T2w"):
        assert modality in message


def test_brats_recipe_composes():
    cfg = compose("+exp=brats")
    assert dict(cfg.data.regions) == {"WT": [1, 2, 3], "TC": [2, 3], "ET": [3]}
    assert list(cfg.data.patch_size) == [128, 128, 128]
    assert cfg.data.batch_size == 2
    assert cfg.data.folds == 5
    assert str(cfg.optim.name.value) == "sgd"
    assert cfg.optim.lr == pytest.approx(0.01)
    assert cfg.model.name == "unet32"
    assert str(cfg.inference.mode.value) == "sliding"


# ----------------------------------------------------------------------------------------- evaluate


@pytest.mark.parametrize("mode", ["whole", pytest.param("sliding", marks=pytest.mark.extended)])
def test_evaluate(tmp_path, trained_run, mode):
    run_dir = tmp_path / "eval"
    args = ["evaluate", f"ckpt={trained_run / 'checkpoints' / 'best.pt'}", f"run_dir={run_dir}"]
    args.append(f"inference={mode}")  # the checkpoint's own default is auto (tests/test_inference_memory.py)
    lampseg(*args)
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["inference"]["mode"] == mode
    assert result["split"] == "val"
    names = list(_summary(trained_run)["val_dice"])
    assert result["cases"], "no cases evaluated"
    for case in result["cases"]:
        assert set(case["dice"]) == set(names) and set(case["hd95"]) == set(names)
        assert all(0.0 <= v <= 1.0 for v in case["dice"].values())
    for n in names:
        assert 0.0 <= result["mean"][f"dice_{n.replace(' ', '_')}"] <= 1.0
        assert f"hd95_{n.replace(' ', '_')}" in result["mean"]
    assert 0.0 <= result["mean"]["dice"] <= 1.0
    assert result["seconds_per_case"] > 0
    if mode == "whole":  # validation during training chose whole volumes (auto, ample memory), same fold
        best = _summary(trained_run)["best_val_dice"]
        assert result["mean"]["dice"] == pytest.approx(best, abs=2e-3)


# ------------------------------------------------------------------------------------------ predict


def test_predict_original_space(tmp_path, trained_run):
    root, meta = _dataset_json(trained_run)
    splits = json.loads((trained_run / "splits.json").read_text())
    train_case = splits[0]["train"][0]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    train_image = root / "imagesTr" / f"{train_case}.nii.gz"
    shutil.copy(train_image, inputs)
    test_images = [root / p for p in meta["test"]]
    for p in test_images:
        shutil.copy(p, inputs)
    (inputs / f"._{train_image.name}").write_bytes(b"\0" * 4096)  # macOS resource fork, as in MSD tars
    out = tmp_path / "preds"
    lampseg("predict", f"ckpt={trained_run / 'checkpoints' / 'best.pt'}", f"input={inputs}", f"output={out}",
            f"run_dir={tmp_path / 'run'}")
    allowed = {int(v) for v in meta["labels"]}
    for src in [train_image, *test_images]:
        image, pred = nib.load(src), nib.load(out / src.name)
        assert pred.shape == image.shape[:3]
        assert np.allclose(pred.affine, image.affine)
        seg = np.asarray(pred.dataobj)
        assert seg.dtype == np.uint8
        assert set(np.unique(seg).tolist()) <= allowed
    expected = sorted(p.name for p in [train_image, *test_images])
    assert sorted(p.name for p in out.iterdir()) == sorted([*expected, "predictions.csv"])
    # Two epochs only: require that the prediction finds the tumour, not that it delineates it well.
    label = np.asarray(nib.load(root / "labelsTr" / f"{train_case}.nii.gz").dataobj)
    seg = np.asarray(nib.load(out / train_image.name).dataobj)
    assert label.any()
    assert np.logical_and(seg > 0, label > 0).any()


# ---------------------------------------------------------------------------- synth, other datasets


@pytest.fixture(scope="module")
def synth_3d(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "ds3d"
    lampseg("synth", f"out={out}", "data.synthetic.cases=3", "data.synthetic.shape=[32,32,32]",
            "data.synthetic.layout=3d")
    return out


def test_synth_writes_dataset(synth_3d):
    meta = json.loads((synth_3d / "dataset.json").read_text())
    assert len(meta["training"]) == 3
    assert len(meta["modality"]) == 1
    for item in meta["training"]:
        image = nib.load(synth_3d / item["image"])
        assert image.shape == (32, 32, 32)
        assert nib.load(synth_3d / item["label"]).shape == (32, 32, 32)


@pytest.mark.extended  # 3D (one-modality) datasets load and sample in tests/test_msd.py
def test_train_one_modality_3d_dataset(tmp_path, synth_3d):
    run_dir = tmp_path / "run"
    lampseg("train", *SMOKE_FAST, f"data.root={synth_3d}", f"run_dir={run_dir}")
    summary = _summary(run_dir)
    assert summary["status"] == "completed"
    assert len(summary["modalities"]) == 1


@pytest.mark.extended
def test_train_modality_subset(tmp_path, trained_run):
    run_dir = tmp_path / "run"
    lampseg("train", *SMOKE_FAST, "data.modalities=[t1gd,FLAIR]", f"run_dir={run_dir}")
    summary = _summary(run_dir)
    assert summary["status"] == "completed"
    assert summary["modalities"] == ["t1gd", "FLAIR"]
    ckpt = torch.load(run_dir / "checkpoints" / "final.pt", map_location="cpu", weights_only=True)
    first_conv = next(v for k, v in ckpt["model"].items() if v.ndim == 5)
    assert first_conv.shape[1] == 2  # two input channels


def test_train_whole_volume(tmp_path, trained_run):
    """data.patch_size=whole: every case centred and padded to one shape divisible by the strides."""
    run_dir = tmp_path / "run"
    lampseg("train", *SMOKE_FAST, "data.patch_size=whole", "inference=sliding", f"run_dir={run_dir}")
    assert _summary(run_dir)["status"] == "completed"
    ckpt = torch.load(run_dir / "checkpoints" / "final.pt", map_location="cpu", weights_only=True)
    whole = ckpt["data"]["patch_size"]
    assert all(s % 4 == 0 for s in whole)  # smoke model: strides [2, 2]
    assert max(whole) <= 32 + 3  # cropped 32^3 volumes, rounded up to a multiple of 4


@pytest.mark.extended
def test_multirun_sweep(tmp_path, trained_run):
    sweep = tmp_path / "sweep"
    lampseg("train", "-m", *SMOKE_FAST, "optim.lr=1e-3,3e-3", f"run_dir={sweep}")
    lrs = []
    for job in ("0", "1"):
        run_dir = sweep / job
        assert _summary(run_dir)["status"] == "completed"
        assert (run_dir / "checkpoints" / "final.pt").is_file()
        lrs.append(yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())["optim"]["lr"])
    assert lrs == [1e-3, 3e-3]


@pytest.mark.extended
def test_brats_regions_train_and_predict(tmp_path, trained_run):
    """The BraTS recipe, shrunk: sigmoid WT/TC/ET regions, DataLoader workers, regions painted back."""
    run_dir = tmp_path / "brats"
    lampseg("train", "+exp=brats", "model=unet_small", "model.channels=[8,16,32]", "model.strides=[2,2]",
            "data.synthetic.cases=6", "data.synthetic.shape=[32,32,32]", "data.patch_size=[32,32,32]",
            "data.samples_per_epoch=4", "data.num_workers=1", "data.folds=3", "trainer.max_epochs=2",
            "trainer.val_every=1", "trainer.num_threads=1", f"run_dir={run_dir}")
    assert check_run_dir(run_dir) == []
    summary = _summary(run_dir)
    assert list(summary["val_dice"]) == ["WT", "TC", "ET"]
    columns, rows = _metrics(run_dir)
    assert {"val_dice_WT", "val_dice_TC", "val_dice_ET"} <= set(columns) and len(rows) == 2
    root = Path(summary["dataset"])
    image = sorted((root / "imagesTr").glob("*.nii.gz"))[0]
    lampseg("predict", f"ckpt={run_dir / 'checkpoints' / 'final.pt'}", f"input={image}",
            f"output={tmp_path / 'pred'}", f"run_dir={tmp_path / 'pred_run'}")
    seg = nib.load(tmp_path / "pred" / image.name)
    assert seg.shape == nib.load(image).shape[:3]
    assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1, 2, 3}


def test_bad_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    proc = lampseg("evaluate", f"ckpt={bad}", f"run_dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 1
    assert str(bad) in proc.stderr and "weights_only=True" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.extended  # in-process: tests/test_reliability.py's dataset-json-missing case
def test_missing_dataset_is_a_clear_cli_error(tmp_path):
    proc = lampseg("train", f"data.root={tmp_path / 'nowhere'}", f"run_dir={tmp_path / 'run2'}", check=False)
    assert proc.returncode == 1 and "dataset.json" in proc.stderr and "Traceback" not in proc.stderr


def test_every_subcommand_has_a_runner():
    """The CLI's table: every listed subcommand names a function, and the function it imports exists."""
    import ast
    import importlib
    import inspect

    from lampseg.__main__ import RUNNERS, SUBCOMMANDS

    assert set(RUNNERS) == set(SUBCOMMANDS)
    for runner in RUNNERS.values():
        assert callable(runner)
        for node in ast.walk(ast.parse(inspect.getsource(runner))):
            if isinstance(node, ast.ImportFrom):
                module = importlib.import_module(node.module)
                assert all(callable(getattr(module, alias.name)) for alias in node.names)


