"""Memory-aware defaults: ``inference.mode=auto`` (choice, out-of-memory fallback, eval.json report),
resumable ``predict`` and ``data.patch_size=auto``."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import compose, lampseg

import lampseg.engine.inference as inference
from lampseg.data.sampling import whole_volume_shape
from lampseg.engine.checkpoint import load_checkpoint
from lampseg.planner.inference import InferenceMemory, windows_to_try


def _divisor(ckpt_path: Path) -> int:
    strides = load_checkpoint(ckpt_path)["config"]["model"]["strides"]
    return int(torch.tensor(strides).prod())


@pytest.mark.extended
def test_auto_picks_whole_volume_under_a_large_budget_and_a_window_under_a_small_one(tmp_path, trained_run):
    ckpt = trained_run / "checkpoints" / "best.pt"
    big, small = tmp_path / "big", tmp_path / "small"
    lampseg("evaluate", f"ckpt={ckpt}", f"run_dir={big}", "inference.mode=auto", "inference.memory_gb=64")
    cases = json.loads((big / "eval.json").read_text())["cases"]
    assert cases and all(c["inference"]["mode"] == "whole" for c in cases)
    assert all(c["inference"]["window"] is None for c in cases)
    assert all(c["inference"]["estimate_gb"] <= 64 and c["process_peak_rss_mb"] > 0 for c in cases)

    # Below every case's whole-volume estimate (but far above a small window's): auto must slide.
    divisor = _divisor(ckpt)
    budget = 0.9 * min(c["inference"]["estimate_gb"] for c in cases)
    lampseg("evaluate", f"ckpt={ckpt}", f"run_dir={small}", "inference.mode=auto",
            f"inference.memory_gb={budget}")
    result = json.loads((small / "eval.json").read_text())
    assert result["inference"]["memory_gb"] == pytest.approx(budget)
    for case in result["cases"]:
        chosen = case["inference"]
        assert chosen["mode"] == "sliding" and chosen["estimate_gb"] <= budget, chosen
        assert all(w % divisor == 0 for w in chosen["window"]) and "largest window" in chosen["reason"]
    assert 0 <= result["mean"]["dice"] <= 1


class _RefusesLargeInputs(torch.nn.Module):
    """A voxel-wise model that raises CUDA's out-of-memory error for inputs over ``limit`` voxels."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(2, 3, 1)
        self.limit, self.seen = limit, []

    def forward(self, x):
        self.seen.append(list(x.shape[-3:]))
        if x.shape[-3:].numel() > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB (injected)")
        return self.conv(x)


def test_auto_falls_back_after_an_out_of_memory_error_and_finishes(monkeypatch):
    torch.manual_seed(0)
    image = torch.randn(1, 2, 24, 20, 16)
    model = _RefusesLargeInputs(limit=12**3).eval()
    memory = InferenceMemory(param_bytes=0, act_bytes_per_voxel=1.0, in_channels=2, out_channels=3,
                             budget_gb=1e9)  # the estimate says the whole volume fits: only the error tells
    cfg = SimpleNamespace(mode="auto", overlap=0.5, blend="gaussian", sw_batch_size=1, tta=False)
    monkeypatch.setattr(inference, "_warned", False)
    report: dict = {}
    with pytest.warns(RuntimeWarning, match="out of memory") as caught:
        logits = inference.infer(model, image, cfg, [8, 8, 8], divisor=4, memory=memory, report=report)
    assert len(caught) == 1  # warned once, however many fallbacks
    assert model.seen[0] == [24, 20, 16]  # tried the whole volume first
    assert report["mode"] == "sliding" and torch.Size(report["window"]).numel() <= 12**3
    assert report["fallbacks"] and "whole" in report["fallbacks"][0]
    assert torch.allclose(logits, model.conv(image), atol=1e-5)  # voxel-wise: windows stitch exactly
    # Other errors are not swallowed.
    broken = _RefusesLargeInputs(limit=0)
    broken.forward = lambda x: (_ for _ in ()).throw(ValueError("not memory"))
    with pytest.raises(ValueError, match="not memory"):
        inference.infer(broken, image, cfg, [8, 8, 8], divisor=4, memory=memory)


def test_windows_to_try_shrink_by_the_divisor_within_the_padded_volume():
    volume = [20, 13, 9]
    assert whole_volume_shape([volume], 4) == [20, 16, 12]
    windows = windows_to_try(volume, 4)
    assert windows[0] == [20, 16, 12] and windows[-1] == [8, 8, 8]
    assert all(max(a) > max(b) for a, b in zip(windows, windows[1:]))
    assert windows_to_try(volume, 4, below=12) == [[8, 8, 8]]


def _predict_here(*overrides: str) -> list[str]:
    """``run_predict`` in this process, as ``python -m lampseg predict OVERRIDES`` calls it; its lines."""
    from lampseg.commands.predict import run_predict
    from lampseg.config import checked
    from lampseg.config.loading import qualify

    overrides = tuple(qualify("predict", overrides))  # predict's own arguments in its section, as the CLI
    cfg = compose(*overrides)
    lines: list[str] = []
    run_predict(checked(cfg), list(overrides), log=lines.append)
    return lines


def test_interrupted_predict_resumes_without_redoing_the_finished_input(tmp_path, trained_run):
    """The default suite's size of the test below: two inputs, in process. A run stopped after the first
    input (its prediction present, the second's absent) resumes: the first is skipped and kept as it is,
    the second is predicted; ``overwrite=true`` redoes both."""
    root = Path(json.loads((trained_run / "summary.json").read_text())["dataset"])
    meta = json.loads((root / "dataset.json").read_text())
    inputs, out = tmp_path / "inputs", tmp_path / "preds"
    inputs.mkdir()
    images = [root / meta["test"][0], root / meta["training"][0]["image"]]
    for p in images:
        shutil.copy(p, inputs)
    predict = [f"ckpt={trained_run / 'checkpoints' / 'best.pt'}", f"input={inputs}", f"output={out}",
               f"run_dir={tmp_path / 'r'}"]
    first = _predict_here(*predict)
    assert sorted(p.name for p in out.glob("*.nii*")) == sorted(p.name for p in images)
    assert not any("skipped" in line for line in first)
    finished, interrupted = images
    kept = (out / finished.name).stat().st_mtime_ns
    (out / interrupted.name).unlink()  # stopped before the second input's (atomic) write
    again = _predict_here(*predict)
    assert any("skipped 1 input(s)" in line for line in again), again
    assert (out / finished.name).stat().st_mtime_ns == kept  # not redone
    assert (out / interrupted.name).exists() and any(line.startswith(interrupted.name) for line in again)
    assert not any(line.startswith(finished.name) for line in again)
    redo = _predict_here(*predict, "overwrite=true")
    assert not any("skipped" in line for line in redo) and (out / finished.name).stat().st_mtime_ns != kept


@pytest.mark.extended
def test_interrupted_predict_over_a_folder_resumes_without_redoing_finished_cases(tmp_path, trained_run):
    root = Path(json.loads((trained_run / "summary.json").read_text())["dataset"])
    meta = json.loads((root / "dataset.json").read_text())
    inputs, out = tmp_path / "inputs", tmp_path / "preds"
    inputs.mkdir()
    images = ([root / p for p in meta["test"]] + [root / c["image"] for c in meta["training"]])[:3]
    assert len(images) == 3
    for p in images:
        shutil.copy(p, inputs)
    ckpt = trained_run / "checkpoints" / "best.pt"
    predict = ["predict", f"ckpt={ckpt}", f"input={inputs}", f"output={out}", f"run_dir={tmp_path / 'r'}"]
    first = lampseg(*predict)
    assert "(whole) ->" in first.stdout  # auto, with the free memory of this machine: whole volumes
    # An interruption leaves finished cases (written atomically) and no partial file for the rest.
    done = {p.name: (out / p.name).stat().st_mtime_ns for p in images[:-1]}
    (out / images[-1].name).unlink()
    again = lampseg(*predict)
    assert f"skipped {len(done)} input(s)" in again.stdout
    assert {n: (out / n).stat().st_mtime_ns for n in done} == done  # not redone
    assert (out / images[-1].name).exists() and images[-1].name in again.stdout
    redo = lampseg(*predict, "overwrite=true")
    assert "skipped" not in redo.stdout
    assert all((out / n).stat().st_mtime_ns != t for n, t in done.items())


def _plan_here(run_dir: Path, *overrides: str) -> tuple[dict, list[str]]:
    """``run_plan`` in this process, as ``python -m lampseg plan +exp=smoke data.patch_size=auto OVERRIDES``
    calls it: plan.json's ``patch_size_auto`` decision and the printed lines."""
    from omegaconf import OmegaConf

    from lampseg.commands.plan import run_plan
    from lampseg.config import validate

    cfg = compose("+exp=smoke", "data.patch_size=auto", *overrides)
    OmegaConf.update(cfg, "run_dir", str(run_dir), merge=False)
    validate(cfg)
    lines: list[str] = []
    run_plan(cfg, log=lines.append)
    decision = json.loads((run_dir / "plan.json").read_text())["patch_size_auto"]
    assert any(line.startswith(f"data.patch_size=auto: {decision['patch_size']}") for line in lines), lines
    return decision, lines


def test_patch_size_auto_fits_the_budget_per_stage_and_train_takes_the_planned_patch(tmp_path):
    """The default suite's size of the test below, on the smoke data (32^3 cases), in process: under an
    ample budget the whole (padded median) volume; under 90% of its estimate a smaller patch that fits;
    two stages (``plan``'s what-if) fit a larger one than a single device; ``train`` (one short epoch)
    chooses and records the patch ``plan`` showed, and its checkpoint keeps it."""
    from conftest import train_here

    ample, _ = _plan_here(tmp_path / "ample", "parallel.memory_gb=64")
    assert ample["patch_size"] == ample["largest_candidate"] and not ample["candidates_too_large"]
    assert all(p % 4 == 0 and p >= m for p, m in zip(ample["patch_size"], ample["median_shape"]))
    assert (ample["pp"], ample["budget_gb"]) == (1, 64) and 0 < ample["estimate_gb"] <= 64
    budget = 0.9 * ample["estimate_gb"]  # the whole volume no longer fits on one device
    one, _ = _plan_here(tmp_path / "pp1", f"parallel.memory_gb={budget}")
    two, _ = _plan_here(tmp_path / "pp2", f"parallel.memory_gb={budget}", "parallel.pp=2")
    assert one["candidates_too_large"][0] == ample["patch_size"] and one["estimate_gb"] <= budget
    assert all(p % 4 == 0 for p in one["patch_size"])
    assert math.prod(one["patch_size"]) < math.prod(ample["patch_size"])
    assert two["pp"] == 2 and two["estimate_gb"] <= budget
    assert math.prod(two["patch_size"]) > math.prod(one["patch_size"])
    run_dir = tmp_path / "train"
    summary = train_here(run_dir, "+exp=smoke", "data.patch_size=auto", f"parallel.memory_gb={budget}",
                         "trainer.max_epochs=1", "data.samples_per_epoch=2", "trainer.hd95=false",
                         "trainer.num_threads=1")
    assert summary["status"] == "completed"
    assert summary["patch_size_auto"]["patch_size"] == one["patch_size"]  # plan showed train's decision
    ckpt = load_checkpoint(run_dir / "checkpoints" / "final.pt")
    assert list(ckpt["data"]["patch_size"]) == one["patch_size"]


def _auto_plan(tmp_path: Path, name: str, pp: int, budget: float) -> dict:
    run_dir = tmp_path / name
    proc = lampseg("plan", "+exp=smoke", "data.synthetic.shape=[64,64,64]", "data.patch_size=auto",
                   "parallel=pipeline", "parallel.engine=gpipe", f"parallel.pp={pp}",
                   f"parallel.memory_gb={budget}", f"run_dir={run_dir}")
    decision = json.loads((run_dir / "plan.json").read_text())["patch_size_auto"]
    assert f"data.patch_size=auto: {decision['patch_size']}" in proc.stdout  # printed with its reason
    return decision


@pytest.mark.extended
def test_patch_size_auto_takes_a_larger_patch_with_two_stages_and_train_records_the_same_choice(tmp_path):
    ample = _auto_plan(tmp_path, "ample", 1, 64.0)
    assert ample["patch_size"] == ample["largest_candidate"]  # the whole (padded median) volume fits
    assert all(p % 4 == 0 and p >= m for p, m in zip(ample["patch_size"], ample["median_shape"]))
    budget = 0.9 * ample["estimate_gb"]  # the whole volume no longer fits on one stage
    one, two = _auto_plan(tmp_path, "pp1", 1, budget), _auto_plan(tmp_path, "pp2", 2, budget)
    assert one["candidates_too_large"] and one["estimate_gb"] <= budget
    assert math.prod(two["patch_size"]) > math.prod(one["patch_size"])
    run_dir = tmp_path / "train"
    lampseg("train", "+exp=smoke", "data.synthetic.shape=[64,64,64]", "data.patch_size=auto",
            "parallel=pipeline", "parallel.engine=gpipe", "parallel.pp=1", f"parallel.memory_gb={budget}",
            "trainer.max_epochs=1", f"run_dir={run_dir}")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["patch_size_auto"]["patch_size"] == one["patch_size"]  # plan showed train's decision
    ckpt = load_checkpoint(run_dir / "checkpoints" / "final.pt")
    assert list(ckpt["data"]["patch_size"]) == one["patch_size"]


def test_auto_pipelines_an_unsplit_model_over_devices_when_the_whole_volume_fits_only_split():
    from monai.networks.nets import UNet

    from lampseg.planner.inference import choose_mode

    torch.manual_seed(0)
    model = UNet(3, 2, 3, channels=(4, 8, 16), strides=(2, 2), num_res_units=1).eval()
    image = torch.randn(1, 2, 20, 24, 16)
    memory = InferenceMemory(param_bytes=0, act_bytes_per_voxel=1e4, in_channels=2, out_channels=3, devices=2)
    one, two = memory.whole_gb([20, 24, 16]), memory.whole_gb([20, 24, 16], 2)
    memory = InferenceMemory(0, 1e4, 2, 3, budget_gb=(one + two) / 2, devices=2)
    choice = choose_mode(memory, [20, 24, 16], 4, 1)
    assert (choice.mode, choice.split) == ("whole", 2) and "pipelined over 2 devices" in choice.reason
    cfg = SimpleNamespace(mode="auto", overlap=0.5, blend="gaussian", sw_batch_size=1, tta=False)
    report: dict = {}
    logits = inference.infer(model, image, cfg, [8, 8, 8], divisor=4, memory=memory, report=report)
    assert report["split_over_devices"] == 2 and report["mode"] == "whole"
    expected = inference.infer(model, image, SimpleNamespace(**{**vars(cfg), "mode": "whole"}), [8, 8, 8], 4)
    assert torch.allclose(logits, expected, atol=1e-5)  # same weights, same logits, split in two
    assert next(model.parameters()).device.type == "cpu" and not hasattr(model, "partitions")  # untouched
    # With one device only, the same budget means sliding windows.
    single = InferenceMemory(0, 1e4, 2, 3, budget_gb=memory.budget_gb, devices=1)
    assert choose_mode(single, [20, 24, 16], 4, 1).mode == "sliding"


def test_auto_takes_the_whole_volume_split_into_the_run_s_slabs_when_one_device_cannot_hold_it():
    """``parallel=spatial``: each rank holds its slab's activations (and the replicated weights), so a
    whole volume too large for one device may fit as slabs; ``inference_memory`` reads the slabs from the
    config."""
    from lampseg.planner.inference import choose_mode, inference_memory

    one = InferenceMemory(1e6, 1e4, 2, 3)
    two = InferenceMemory(1e6, 1e4, 2, 3, slabs=2)
    volume = [64, 48, 32]
    assert two.whole_gb(volume) < one.whole_gb(volume)
    budget = (one.whole_gb(volume) + two.whole_gb(volume)) / 2
    choice = choose_mode(InferenceMemory(1e6, 1e4, 2, 3, budget_gb=budget, slabs=2), volume, 4, 1)
    assert choice.mode == "whole" and "each of 2 slabs" in choice.reason
    assert choose_mode(InferenceMemory(1e6, 1e4, 2, 3, budget_gb=budget), volume, 4, 1).mode == "sliding"
    cfg = compose("+exp=smoke", "parallel=spatial", "parallel.sp=2", "inference.mode=auto",
                  "inference.memory_gb=1")
    assert inference_memory(cfg, 4, 4, torch.device("cpu")).slabs == 2
