"""Spatial parallelism (``parallel=spatial``): slabs of one volume over processes give the unsplit model's
logits, loss and gradients (with and without data parallelism); training under torchrun follows the
one-process trajectory; its checkpoint evaluates unsplit to the same Dice; bad layouts fail early."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import compose, lampseg, torchrun, train_here, train_losses, worker_rows
from run_dir_contract import check_run_dir

from lampseg.commands.plan import run_plan
from lampseg.config import ConfigError, derive, validate
from lampseg.engine.setup import layout_changes
from lampseg.model.unet import build_model
from lampseg.parallel.dims import ParallelDims, resolve_dims
from lampseg.parallel.kernels import conv3d, conv3d_backward
from lampseg.parallel.spatial import check_splittable
from lampseg.planner.capacity import capacity_table, largest_slab, largest_spatial_cube, spatial_plan
from lampseg.planner.plan import PlanError, profile_for

WORKER = Path(__file__).parent / "workers" / "spatial_equivalence.py"
EXACT = ["+exp=smoke", "optim=sgd", "trainer.precision=fp32", "trainer.channels_last=false",
         "trainer.deterministic=true"]


# 4 processes in the default suite: sp=4 (inner slabs exchange halos on both sides), dp=2 x sp=2, bf16 over
# 4 slabs and sp=2 x pp=2 stages of slabs; 2 processes (sp=2 alone: two edge slabs) add nothing new.
@pytest.mark.parametrize("world", [4, pytest.param(2, marks=pytest.mark.extended)])
def test_spatial_slabs_match_unsplit_model(world):
    rows = worker_rows(world, WORKER, timeout=300)
    (bf16,) = [r for r in rows if "dtype" in r]
    rows.remove(bf16)
    assert bf16["dtype"] == "torch.bfloat16", bf16
    assert bf16["loss"] == pytest.approx(bf16["ref_loss"], rel=2e-2), bf16
    assert bf16["grad_cosine"] > 0.99, bf16
    staged = [r for r in rows if "pp" in r]
    for row in staged:
        rows.remove(row)
    _assert_staged_exact(staged, 1 if world == 4 else 0)
    layouts = {(1, world)} | ({(2, world // 2)} if world >= 4 else set())
    assert {(r["dp"], r["sp"]) for r in rows} == layouts and len(rows) == 2 * len(layouts)
    assert {r["checkpoint"] for r in rows} == {"none", "block"}  # recomputed blocks repeat their collectives
    for row in rows:
        assert row["logits_error"] < 1e-12, row  # float64: exact up to rounding
        assert row["inference_error"] < 1e-12, row  # slabs of different lengths, whole output gathered
        # MONAI's focal term rounds to fp32
        assert row["loss"] == pytest.approx(row["ref_loss"], rel=1e-7), row
        assert row["max_rel_grad_error"] < 1e-6, row


def _assert_staged_exact(rows: list[dict], count: int) -> None:
    """Stages of slabs through the pipelining schedule: the unsplit loss, gradients and inference."""
    assert len(rows) == count, rows
    for row in rows:
        assert row["plan_sp"] == 2 and len(row["stages"]) == 2, row
        assert row["loss"] == pytest.approx(row["ref_loss"], rel=1e-7), row
        assert row["max_rel_grad_error"] < 1e-6 and row["normwise_grad_error"] < 1e-9, row
        assert row["inference_error"] < 1e-12, row


@pytest.mark.extended
def test_data_parallel_stages_of_slabs_match_unsplit_model():
    """dp=2 x sp=2 x pp=2: all three dimensions of the mesh at once (eight processes)."""
    rows = worker_rows(8, WORKER, timeout=600)
    _assert_staged_exact(rows, 1)
    assert (rows[0]["dp"], rows[0]["sp"], rows[0]["pp"]) == (2, 2, 2)


def test_spatial_training_follows_one_process_and_evaluates_unsplit(tmp_path):
    one = train_here(tmp_path / "one", *EXACT)
    split = torchrun(2, "train", *EXACT, "parallel=spatial", "parallel.sp=2", f"run_dir={tmp_path / 'sp'}")
    assert "2 processes: dp=1 x pp=1 x sp=2" in split.stdout
    assert train_losses(tmp_path / "sp") == pytest.approx(train_losses(tmp_path / "one"), rel=1e-5)
    summary = json.loads((tmp_path / "sp" / "summary.json").read_text())
    assert summary["sp"] == 2 and summary["world_size"] == 2
    assert summary["best_val_dice"] == pytest.approx(one["best_val_dice"], rel=1e-5)
    # the checkpoint keeps the unsplit names: one process evaluates it to the same Dice
    lampseg("evaluate", f"ckpt={tmp_path / 'sp' / 'checkpoints' / 'best.pt'}", "parallel=single",
            f"run_dir={tmp_path / 'eval'}")
    evaluated = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert evaluated["mean"]["dice"] == pytest.approx(one["best_val_dice"], rel=1e-5)
    assert check_run_dir(tmp_path / "sp") == []


@pytest.mark.extended
def test_stages_of_slabs_train_like_one_process_and_resume_as_a_pipeline(tmp_path):
    """sp=2 x pp=2 (four processes) follows the one-process trajectory; its checkpoint (unsplit names)
    resumes as a four-stage pipeline (pp=4) to the same losses, and evaluates unsplit to the same Dice."""
    one = train_here(tmp_path / "one", *EXACT)
    run_dir = tmp_path / "sp2pp2"
    first = torchrun(4, "train", *EXACT, "parallel=spatial", "parallel.sp=2", "parallel.pp=2",
                     "trainer.stop_after_epochs=1", f"run_dir={run_dir}")
    assert "4 processes: dp=1 x pp=2 x sp=2" in first.stdout and "sp=2 slabs" in first.stdout
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == 1
    second = torchrun(4, "train", *EXACT, "parallel=pipeline", "parallel.pp=4", f"run_dir={run_dir}")
    assert "resumed from" in second.stdout and "4 processes: dp=4" not in second.stdout
    assert train_losses(run_dir) == pytest.approx(train_losses(tmp_path / "one"), rel=1e-5)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_val_dice"] == pytest.approx(one["best_val_dice"], rel=1e-5)
    lampseg("evaluate", f"ckpt={run_dir / 'checkpoints' / 'best.pt'}", "parallel=single",
            f"run_dir={tmp_path / 'eval'}")
    evaluated = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert evaluated["mean"]["dice"] == pytest.approx(one["best_val_dice"], rel=1e-5)


@pytest.mark.parametrize("overrides, key", [
    (["parallel=ddp", "parallel.sp=2"], "parallel.sp"),  # slabs need parallel=spatial
    (["parallel=spatial", "parallel.pp=2", "parallel.engine=gpipe"], "parallel.engine"),  # a stage a process
])
def test_spatial_layout_errors_name_the_key(overrides, key):
    cfg = compose("+exp=smoke", *overrides)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        ParallelDims.from_config(cfg.parallel, world=4)


def test_spatial_degrees_must_multiply_to_world_size():
    cfg = compose("+exp=smoke", "parallel=spatial", "parallel.sp=2", "parallel.dp=2")
    expected = r"'parallel.dp' x 'parallel.sp': 2 x 2 = 4 processes needed, but WORLD_SIZE is 2"
    with pytest.raises(ConfigError, match=expected):
        ParallelDims.from_config(cfg.parallel, world=2)
    assert ParallelDims.from_config(cfg.parallel, world=4).sp == 2


def test_patch_too_small_to_split_fails_validation():
    cfg = compose("+exp=smoke", "parallel=spatial", "parallel.sp=4", "data.patch_size=[8,32,32]")
    with pytest.raises(ConfigError, match=r"data\.patch_size.*at least 16"):
        validate(cfg)


def test_batch_norm_has_no_spatial_split():
    cfg = compose("+exp=smoke", "model.norm=batch")
    with pytest.raises(ConfigError, match=r"parallel\.sp.*BatchNorm3d"):
        check_splittable(build_model(cfg.model, 4, 4))


def test_spatial_outside_torchrun_says_how_to_launch(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="torchrun --nproc_per_node 2"):
        resolve_dims(compose("+exp=smoke", "parallel=spatial"))


def _unet64_costs(side: int):
    cfg = compose("model=unet64", f"data.patch_size=[{side},{side},{side}]", "data.batch_size=1",
                  "trainer.precision=bf16", "parallel.memory_gb=16")
    return cfg, profile_for(cfg, 4, 4, [4, side, side, side])


def test_capacity_grows_with_the_devices():
    """The planner's promise (issue target): N devices hold at least 0.7 N times one device's voxels."""
    cfg, costs = _unet64_costs(128)
    rows = capacity_table(costs, 1, 16.0, [4, 128, 128, 128], "gpipe", 2, 16)
    one = max(rows[0].pipeline_side, rows[0].spatial_side) ** 3
    assert [r.devices for r in rows] == [1, 2, 4, 8]
    for row in rows[1:]:
        assert row.spatial_side ** 3 >= 0.7 * row.devices * one, row
        assert row.best == "spatial" and row.spatial_step_s > 0


def test_largest_spatial_cube_fits_when_profiled_at_that_size():
    cfg, costs = _unet64_costs(128)
    side = largest_spatial_cube(costs, 4, 1, 16.0, [4, 128, 128, 128], 2, 16)
    _, at_side = _unet64_costs(side)
    plan = spatial_plan(at_side, 4, 1, 16.0, [4, side, side, side], 2, 16)
    assert plan.stage.memory_gb <= 16.0 and plan.checkpoint in ("none", "block", "all")
    assert largest_slab(side, 4, 16) * 4 >= side


def test_plan_prints_the_slabs_and_what_fits_when_nothing_does(tmp_path, capsys):
    big = ["model=unet64", "data.batch_size=1", "trainer.precision=bf16", "parallel.memory_gb=16"]
    cfg = compose(*big, "data.patch_size=[480,480,480]", "parallel=spatial", "parallel.sp=2",
                  f"run_dir={tmp_path / 'sp'}")
    spatial = run_plan(cfg)
    out = capsys.readouterr().out
    assert spatial.sp == 2 and spatial.stage.memory_gb <= 16
    assert "sp=2 slabs of input [4, 480, 480, 480]" in out and "spatial (sp=N)" in out
    assert json.loads((tmp_path / "sp" / "plan.json").read_text())["spatial"]["sp"] == 2
    # the misleading case: say which block cannot fit, and print the layouts that would (448^3: the
    # pipeline memory model, measured more accurate since, fits 432^3 in 16 GB at pp=4; up1, with the skips
    # it receives and passes on, is then the largest block)
    cfg = compose(*big, "data.patch_size=[448,448,448]", "parallel.pp=4", f"run_dir={tmp_path / 'pp'}")
    expected = r"block up1 needs [0-9.]+ GB on its stage even checkpointing everything.*parallel=spatial"
    with pytest.raises(PlanError, match=expected):
        run_plan(cfg)
    assert "spatial (sp=N)" in capsys.readouterr().out


@pytest.mark.parametrize("budget, layout", [
    ("null", ("ddp", 4, 1, 1)),       # a sample fits one device: every device a data-parallel replica
    ("0.2", ("spatial", 2, 2, 1)),    # it does not: the smallest split that fits, replicated
    ("0.12", ("spatial", 1, 4, 1)),
])
def test_parallel_auto_chooses_the_smallest_split_that_fits(budget, layout, capsys):
    cfg = compose("+exp=smoke", "data.patch_size=[128,128,128]", "data.batch_size=1", "parallel=auto",
                  "parallel.devices=4", f"parallel.memory_gb={budget}")
    cfg = derive(cfg, layout_changes(cfg), check=False)
    p = cfg.parallel
    assert (str(p.name), p.dp, p.sp, p.pp) == layout
    assert f"parallel={layout[0]} dp={layout[1]} x pp=1 x sp={layout[2]}" in capsys.readouterr().out
    assert ParallelDims.from_config(p, world=4).spatial == (layout[0] == "spatial")


def test_parallel_auto_says_when_nothing_fits():
    cfg = compose("+exp=smoke", "data.patch_size=[128,128,128]", "data.batch_size=1", "parallel=auto",
                  "parallel.devices=2", "parallel.memory_gb=0.001")
    with pytest.raises(PlanError, match=r"parallel\.devices.*no layout of 2 device\(s\) fits"):
        layout_changes(cfg)


@pytest.mark.extended
def test_parallel_auto_trains_the_layout_it_chose(tmp_path):
    proc = torchrun(2, "train", *EXACT, "data.patch_size=[32,32,32]", "parallel=auto",
                    "parallel.memory_gb=0.012", f"run_dir={tmp_path}")
    # a sample does not fit one device: two stages or two slabs, whichever the planner estimates faster
    pattern = r"parallel=auto over 2 device\(s\): parallel=(\w+) dp=1 x pp=(\d) x sp=(\d)"
    chosen = re.search(pattern, proc.stdout)
    assert chosen and chosen.group(1) in ("spatial", "pipeline"), proc.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["pp"], summary["sp"]) == (int(chosen.group(2)), int(chosen.group(3))) != (1, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("stride,padding", [((1, 1, 1), (0, 1, 1)), ((2, 2, 2), (0, 1, 1)),
                                            ((1, 1, 1), (1, 1, 1))])
def test_slab_kernels_equal_pytorch_convolution_and_its_gradients(dtype, stride, padding):
    """``kernels.conv3d`` / ``conv3d_backward`` (oneDNN for fp32 CPU slabs, the split axis moved last for
    the backward) compute what ``F.conv3d`` and autograd compute, for a thin slab that PyTorch itself
    would send to its im2col kernel."""
    torch.manual_seed(0)
    x = torch.randn(1, 16, 10, 32, 48, dtype=dtype, requires_grad=True)  # im2col, unless permuted
    weight = torch.randn(8, 16, 3, 3, 3, dtype=dtype, requires_grad=True)
    bias = torch.randn(8, dtype=dtype, requires_grad=True)
    want = torch.nn.functional.conv3d(x, weight, bias, stride, padding)
    grad = torch.randn_like(want)
    want.backward(grad)
    want = want.detach()
    got = conv3d(x.detach(), weight.detach(), bias.detach(), stride, padding, (1, 1, 1), 1)
    grads = conv3d_backward(grad, x.detach(), weight.detach(), True, stride, padding, (1, 1, 1), 1)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for a, b in zip((got, *grads), (want, x.grad, weight.grad, bias.grad)):
        assert a.shape == b.shape
        assert float((a - b).abs().max() / b.abs().max()) < tol
