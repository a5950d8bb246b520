"""Tests for ``python -m lampseg bench`` (lampseg.bench): output files and their consistency, no timings.

Every benchmark keeps a tiny test in the default suite (``-m 'not extended'``: a few steps of ``+exp=smoke``,
one round); the ``extended`` variants run more rounds, sizes or modes. ``bench experiment_parallel`` is the
exception: its smallest run (a Ray study, a DDP job and two plain trainings, each a process of its own) takes
about two minutes on 2 cores, so it runs in the extended suite only."""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lampseg.bench.spatial import ceiling_speedup, summarise
from lampseg.model.unet import build_model
from lampseg.parallel.kernels import PLAIN_CONV3D, SteeredConv3d, kernel_choice, steer_convolutions


def _lampseg(args: list[str], home: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, LAMPSEG_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "lampseg", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("precision,steps,repeats", [
    pytest.param("fp32", 2, 1, id="tiny"),
    pytest.param("bf16", 3, 2, id="bf16-2-rounds", marks=pytest.mark.extended)])  # bf16 is emulated on AVX2
def test_bench_overhead_writes_consistent_json_and_png(tmp_path: Path, precision: str, steps: int,
                                                       repeats: int) -> None:
    run_dir = tmp_path / "run"
    proc = _lampseg(["bench", "overhead", "+exp=smoke", f"trainer.precision={precision}",
                     f"bench.steps={steps}", "bench.warmup=1", f"bench.repeats={repeats}",
                     f"run_dir={run_dir}"],
                    Path(os.environ["LAMPSEG_HOME"]), tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    json_path, png_path = run_dir / "bench_overhead.json", run_dir / "bench_overhead.png"
    assert str(json_path) in proc.stdout and str(png_path) in proc.stdout
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads(json_path.read_text())

    assert result["benchmark"] == "overhead"
    cfg = result["config"]
    assert (cfg["steps"], cfg["warmup"], cfg["repeats"]) == (steps, 1, repeats)
    assert cfg["patch_size"] == [32, 32, 32] and cfg["batch_size"] == 2 and cfg["model"] == "unet_small"
    assert cfg["precision"] == precision and cfg["device"] in ("cpu", "cuda", "cuda:0")
    assert cfg["torch"] and cfg["monai"]
    for name in ("lampseg", "plain"):
        loop = result[name]
        assert len(loop["step_s"]) == len(loop["data_wait_frac"]) == len(loop["loss"]) == repeats
        assert all(t > 0 for t in loop["step_s"])
        assert loop["step_s_min"] <= loop["step_s_median"] <= loop["step_s_max"]
        assert all(0 <= w < 1 for w in loop["data_wait_frac"])
        assert loop["samples_per_s"] == pytest.approx(cfg["batch_size"] / loop["step_s_median"])
    ratio = result["lampseg"]["step_s_median"] / result["plain"]["step_s_median"]
    assert result["ratio"] == pytest.approx(ratio)
    assert result["overhead"] == pytest.approx(ratio - 1)
    assert result["data_wait_frac"] == result["lampseg"]["data_wait_frac_median"]
    targets = result["targets"]
    assert result["pass"] == {"overhead": result["overhead"] <= targets["overhead_max"],
                              "data_wait": result["data_wait_frac"] <= targets["data_wait_frac_max"]}
    # Same initial weights, same patches, same loss: the two loops do the same work.
    assert result["lampseg"]["loss"] == pytest.approx(result["plain"]["loss"], rel=1e-2)


def test_bench_unknown_name_lists_available(tmp_path: Path) -> None:
    proc = _lampseg(["bench", "nosuch", f"run_dir={tmp_path / 'run'}"], tmp_path / "home", tmp_path)
    assert proc.returncode == 2
    assert "overhead" in proc.stderr and "pipeline" in proc.stderr and "nosuch" in proc.stderr


@pytest.mark.parametrize("microbatches", [pytest.param([2], id="tiny"),
                                          pytest.param([1, 2], id="two-m", marks=pytest.mark.extended)])
def test_bench_pipeline_measures_memory_against_the_plan(tmp_path: Path, microbatches: list[int]) -> None:
    """bench pipeline: one torchrun job per pp; every (pp, M) reports each stage's measured and planned
    peak memory, the step time and the bubble; the planner is within 50 % of the measurement everywhere."""
    run_dir = tmp_path / "run"
    proc = _lampseg(["bench", "pipeline", "+exp=smoke", "bench.pp=[1,2]",
                     f"bench.microbatches=[{','.join(map(str, microbatches))}]", "bench.steps=1",
                     "bench.warmup=0", f"run_dir={run_dir}"], Path(os.environ["LAMPSEG_HOME"]), tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((run_dir / "bench_pipeline.json").read_text())
    assert (run_dir / "bench_pipeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["config"]["batch_size"] == 2
    configs = {(c["pp"], c["microbatches"]): c for c in result["configs"]}
    assert set(configs) == {(pp, m) for pp in (1, 2) for m in microbatches}
    for (pp, micro), c in configs.items():
        assert [r["stage"] for r in c["stages"]] == list(range(pp))
        assert sum(len(r["blocks"]) for r in c["stages"]) == 5
        assert c["bubble_ideal"] == pytest.approx((pp - 1) / (micro + pp - 1))
        assert c["efficiency"] == pytest.approx(configs[(1, micro)]["step_s"] / (pp * c["step_s"]))
        for r in c["stages"]:
            assert 0 < r["static_gb"] < r["measured_gb"] and r["planned_gb"] > 0
        assert c["memory_error_max"] == pytest.approx(
            max(abs(r["planned_gb"] / r["measured_gb"] - 1) for r in c["stages"]))
    # The 10 % target (and at most 5 % under) is the benchmark's verdict (docs/BENCHMARKS.md), not this
    # test's: how far a CPU's oneDNN kernels allocate beyond the estimate depends on the CPU (AMX or not;
    # tests/test_plan_memory.py holds the plan to the target on the CPU that runs it). Here: the verdict
    # matches the numbers, and the plan is not grossly off (a broken estimate is off by > 2.5x).
    assert result["pass"]["memory_within_10pct"] is (result["memory_error_max"] <= 0.10)
    assert result["pass"]["memory_under_at_most_5pct"] is (result["memory_under_max"] <= 0.05)
    assert result["memory_error_max"] < 0.6
    cubes = result["largest_cube"]
    assert 0 < cubes["1"] <= cubes["2"]


@pytest.mark.parametrize("all_threads", [pytest.param(False, id="tiny"),
                                         pytest.param(True, id="all-threads", marks=pytest.mark.extended)])
def test_bench_data_parallel_reports_scaling(tmp_path: Path, all_threads: bool) -> None:
    """bench data_parallel: interleaved torchrun jobs of 1 and 2 DDP processes; samples/s, speed-up and
    efficiency follow from the measured step times."""
    run_dir = tmp_path / "run"
    proc = _lampseg(["bench", "data_parallel", "+exp=smoke", "data.patch_size=[16,16,16]", "bench.steps=2",
                     "bench.warmup=1", "bench.repeats=1", f"bench.all_threads={str(all_threads).lower()}",
                     f"run_dir={run_dir}"], Path(os.environ["LAMPSEG_HOME"]), tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((run_dir / "bench_data_parallel.json").read_text())
    assert (run_dir / "bench_data_parallel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    one, two, *reference = result["processes"]
    assert (one["processes"], two["processes"], one["threads"], two["threads"]) == (1, 2, 1, 1)
    if all_threads and os.cpu_count() > 1:  # plus one process with every core as a thread, as `train` runs
        assert [(r["processes"], r["threads"]) for r in reference] == [(1, os.cpu_count())]
        assert "speedup" not in reference[0] and reference[0]["samples_per_s"] > 0
    assert len(result["rounds"]) == 2 + len(reference)
    for row in (one, two):
        assert len(row["step_s_rounds"]) == 1 and row["step_s"] > 0 and row["startup_s"] > 0
        assert row["samples_per_s"] == pytest.approx(row["processes"] * 2 / row["step_s"])
    assert two["speedup"] == pytest.approx(two["samples_per_s"] / one["samples_per_s"])
    assert two["efficiency"] == pytest.approx(two["speedup"] / 2)
    assert "efficiency" in proc.stdout


@pytest.mark.parametrize("windows", [pytest.param([16], id="tiny"),
                                     pytest.param([16, 32], id="two-windows", marks=pytest.mark.extended)])
def test_bench_inference_compares_whole_volume_with_sliding_windows(tmp_path: Path, trained_run: Path,
                                                                   windows: list[int]) -> None:
    run_dir, ckpt = tmp_path / "run", trained_run / "checkpoints" / "best.pt"
    proc = _lampseg(["bench", "inference", f"ckpt={ckpt}",
                     f"bench.windows=[{','.join(map(str, windows))}]", "bench.overlaps=[0.5]",
                     "bench.repeats=2", f"run_dir={run_dir}"],
                    Path(os.environ["LAMPSEG_HOME"]), tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((run_dir / "bench_inference.json").read_text())
    assert (run_dir / "bench_inference.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    modes = result["modes"]
    assert [(m["mode"], m["window"], m["overlap"]) for m in modes] == [
        ("whole", None, None), *(("sliding", w, 0.5) for w in windows), ("auto", None, None),
        ("auto", None, None)]
    # auto under two budgets: 2x the whole volume's estimate (whole fits), 0.75x (it does not)
    ample, tight = result["auto"]
    assert ample["budget_gb"] == pytest.approx(2 * modes[0]["estimate_gb"])
    assert ample["chose"] == "whole" and ample["fastest_fitting"] is not None
    assert tight["chose"].startswith("sliding") and "whole" not in tight["chose"]
    for row in (ample, tight):
        if row["fastest_fitting"] is None:  # no forced mode is estimated to fit: nothing to compare with
            assert row["pass"] is None and row is tight
            continue
        fitting = next(m for m in modes if m["name"] == row["fastest_fitting"])
        assert fitting["estimate_gb"] <= row["budget_gb"] and fitting["overlap"] in (None, row["overlap"])
        assert row["pass"] == (row["time_vs_fastest_fitting"] <= 1.05
                               and row["dice_minus_fastest_fitting"] >= -0.01)
    assert all(c["estimate_gb"] <= tight["budget_gb"] for c in modes[-1]["choices"])
    cases = result["config"]["cases"]
    assert cases and result["config"]["train_patch_size"] == [32, 32, 32]
    voxels = sum(x * y * z for x, y, z in result["config"]["volume_shapes"])
    for m in modes:
        assert len(m["seconds"]) == len(cases) and all(s > 0 for s in m["seconds"])
        assert [len(r) for r in m["seconds_rounds"]] == [2] * len(cases)  # interleaved rounds
        assert m["seconds"] == [statistics.median(r) for r in m["seconds_rounds"]]
        assert m["voxels_per_s"] == pytest.approx(voxels / sum(m["seconds"]))
        assert m["whole_speedup"] == pytest.approx(m["seconds_per_volume"] / modes[0]["seconds_per_volume"])
        assert set(m["dice_per_region"]) == {"edema", "non-enhancing tumor", "enhancing tumour"}
        assert 0 <= m["dice"] <= 1 and m["peak_memory_mb"] > 0
    whole, *sliding = [m for m in modes if m["mode"] != "auto"]
    assert whole["computed_voxels"] >= voxels  # padded to the network's multiple
    assert all(m["computed_voxels"] > whole["computed_voxels"] for m in sliding)  # overlaps computed again
    assert result["target"] is None  # no 96^3 / 0.5 row in this run
    bad = _lampseg(["bench", "inference", f"ckpt={ckpt}", "bench.windows=[18]",
                    f"run_dir={tmp_path / 'bad'}"], Path(os.environ["LAMPSEG_HOME"]), tmp_path)
    assert bad.returncode == 2 and "bench.windows" in bad.stderr


def test_bench_context_trains_each_width_and_input_size_and_resumes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["bench", "context", "+exp=smoke", "data.synthetic.context=laterality", "data.augment.flip_prob=0",
            "bench.patch_sizes=[16,whole]", "bench.widths=[4]", "trainer.max_epochs=1", "trainer.hd95=false",
            f"run_dir={run_dir}"]
    proc = _lampseg(args, Path(os.environ["LAMPSEG_HOME"]), tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((run_dir / "bench_context.json").read_text())
    assert (run_dir / "bench_context.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = result["rows"]
    assert [(r["width"], r["input"]) for r in rows] == [(4, 16), (4, "whole")]
    assert result["config"]["receptive_field"] > 16 and "receptive field" in proc.stdout
    assert rows[0]["channels"] == [4, 8, 16] and rows[0]["input_voxels"] == 16**3
    assert rows[1]["input_voxels"] > 16**3 and rows[0]["params"] == rows[1]["params"]
    for r in rows:
        assert 0 <= r["val_dice"] <= 1 and r["epochs"] == 1
        summary = json.loads((Path(r["run_dir"]) / "summary.json").read_text())
        assert summary["best_val_dice"] == r["val_dice"]
    again = _lampseg(args, Path(os.environ["LAMPSEG_HOME"]), tmp_path)  # finished trainings are not redone
    assert again.returncode == 0 and "epoch 1/1" not in again.stdout
    rerun = json.loads((run_dir / "bench_context.json").read_text())["rows"]
    assert [{k: v for k, v in r.items() if k != "wall_s"} for r in rerun] == [
        {k: v for k, v in r.items() if k != "wall_s"} for r in rows]


@pytest.mark.extended
def test_bench_experiment_parallel_runs_the_three_ways(tmp_path: Path) -> None:
    """bench experiment_parallel (one trial, to keep the suite short): sequential on all cores, DDP x2 and
    as a Tune study, plus the trial alone on one core; every way trains the same trial, and the reported
    speed-ups and efficiency follow from the measured wall times."""
    run_dir = tmp_path / "run"
    env = dict(os.environ, LAMPSEG_HOME=str(tmp_path / "home"))
    proc = subprocess.run([sys.executable, "-m", "lampseg", "bench", "experiment_parallel", "+exp=smoke",
                           "trainer.max_epochs=1", "trainer.hd95=false", "bench.trials=1", "bench.repeats=1",
                           f"run_dir={run_dir}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((run_dir / "bench_experiment_parallel.json").read_text())
    assert (run_dir / "bench_experiment_parallel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (result["trials"], result["workers"]) == (1, 2)
    assert result["learning_rates"] == pytest.approx([3e-3])
    (row,) = result["rounds"]
    assert len(row["a_dice"]) == len(row["b_dice"]) == len(row["c_dice"]) == 1  # every way trained it
    assert row["a_dice"] == pytest.approx(row["c_dice"], abs=0.05)  # the same trial, the same result
    m = result["medians"]
    assert result["efficiency"] == pytest.approx(1 * m["t1_s"] / (2 * m["c_s"]))
    assert result["speedup_c_over_a"] == pytest.approx(m["a_s"] / m["c_s"])
    assert result["speedup_c_over_b"] == pytest.approx(m["b_s"] / m["c_s"])
    assert result["overhead"]["ray_start_s"] > 0 and m["t1_s"] > m["t1_run_s"] > 0
    assert result["pass"]["efficiency_ge_0.9"] is (result["efficiency"] >= 0.9)
    assert "efficiency" in proc.stdout


@pytest.mark.parametrize("variant", [
    pytest.param([], id="tiny"),  # the default run's: 32^3, one timed step, one round (40-60 s on 2 cores)
    pytest.param(["trainer.channels_last=false", "bench.repeats=2"], id="contiguous-2-rounds",
                 marks=pytest.mark.extended)])
def test_bench_spatial_measures_slabs_against_one_process(tmp_path: Path, variant: list[str]) -> None:
    """bench spatial: the split's first loss equals one process's, the ceiling is 2 x the one-process time
    over the contended time of the same round, and every arm (one process, the split, the contended run)
    computes on the same kernels and in train's memory layout, as the JSON records."""
    run_dir = tmp_path / "run"
    proc = _lampseg(["bench", "spatial", "+exp=smoke", "data.batch_size=1", "bench.steps=1", "bench.warmup=1",
                     "bench.repeats=1", *variant, f"run_dir={run_dir}"], Path(os.environ["LAMPSEG_HOME"]),
                    tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((run_dir / "bench_spatial.json").read_text())
    assert (run_dir / "bench_spatial.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rounds = 2 if "bench.repeats=2" in variant else 1
    channels_last = "trainer.channels_last=false" not in variant
    assert result["config"]["channels_last"] is channels_last and result["config"]["precision"] == "fp32"
    one, two = result["summary"]["1"], result["summary"]["2"]
    assert two["first_loss"] == pytest.approx(one["first_loss"], rel=1e-5)  # the split is exact
    assert one["train_speedup"] == 1.0 and two["train_speedup"] > 0 and two["infer_speedup"] > 0
    assert two["halo_s"] > 0 and two["allreduce_s"] > 0 and one["halo_s"] == 0
    assert 0 < two["planned_gb"] < one["planned_gb"] and 0 < two["measured_gb_max"] < one["measured_gb_max"]
    assert [len(job["ranks"]) for job in result["jobs"]] == [1, 2] * rounds
    # the ceiling: 2 x the one-process time over the contended time, paired by round, median over rounds
    alone = {job["round"]: job["ranks"][0] for job in result["jobs"] if job["sp"] == 1}
    split = {job["round"]: job["ranks"][0] for job in result["jobs"] if job["sp"] == 2}
    for key, contended in (("train", "contended_train_s"), ("infer", "contended_infer_s")):
        expected = statistics.median(2 * alone[r][f"{key}_s"] / split[r][contended] for r in range(rounds))
        assert two[f"ceiling_{key}_speedup"] == pytest.approx(expected)
    assert one["ceiling_train_speedup"] is None
    # like against like: every arm on the split model's kernels (oneDNN for fp32 on a CPU) and train's layout
    layout = "channels_last_3d" if channels_last else "contiguous"
    for job in result["jobs"]:
        for rank in job["ranks"]:
            assert (rank["kernels"], rank["memory_format"]) == ("onednn", layout)
            if job["sp"] == 2:
                assert (rank["contended_kernels"], rank["contended_memory_format"]) == ("onednn", layout)
    assert (two["kernels"], two["contended_kernels"], one["kernels"]) == ("onednn",) * 3
    assert f"kernels onednn, {layout}" in proc.stdout


def _spatial_row(train_s: float, infer_s: float, **extra: float) -> dict:
    return {"train_s": train_s, "infer_s": infer_s, "first_loss": 1.0, "measured_gb": 0.1, "planned_gb": 0.1,
            "halo_s": 0.0, "allreduce_s": 0.0, "kernels": "onednn", "memory_format": "contiguous", **extra}


def test_bench_spatial_ceiling_is_sp_times_the_time_alone_over_the_contended_time() -> None:
    """On stand-in timings: per round, ceiling = sp x t(one process alone) / t(each of sp at once), paired
    with the same round's one-process job (not another round's), then the median over rounds."""
    assert ceiling_speedup(2, 3.0, 2.0) == 3.0 and ceiling_speedup(4, 1.0, 1.0) == 4.0
    alone = {0: (2.0, 0.5), 1: (4.0, 1.0), 2: (3.0, 0.6)}  # t_alone (train, infer) per round
    contended = {0: (1.6, 0.5), 1: (2.0, 0.8), 2: (3.0, 0.4)}  # t_contended per round
    jobs = []
    for r in (2, 0, 1):  # rounds out of order: pairing is by round, not by position
        jobs.append({"round": r, "sp": 1, "ranks": [_spatial_row(*alone[r])]})
        ceiling = {"contended_train_s": contended[r][0], "contended_infer_s": contended[r][1]}
        jobs.append({"round": r, "sp": 2, "ranks": [_spatial_row(1.0, 1.0, **ceiling),
                                                    _spatial_row(1.0, 1.0, **ceiling)]})
    summary = summarise(jobs)
    train = statistics.median(2 * alone[r][0] / contended[r][0] for r in alone)  # 2.5, 4.0, 2.0
    infer = statistics.median(2 * alone[r][1] / contended[r][1] for r in alone)  # 2.0, 2.5, 3.0
    assert summary["2"]["ceiling_train_speedup"] == pytest.approx(train) == 2.5
    assert summary["2"]["ceiling_infer_speedup"] == pytest.approx(infer) == 2.5
    assert summary["1"]["ceiling_train_speedup"] is None
    assert summary["2"]["train_speedup"] == pytest.approx(statistics.median([2.0, 4.0, 3.0]))


def test_steered_convolutions_compute_what_pytorch_computes() -> None:
    """bench spatial's unsplit arms: ``steer_convolutions`` puts every ``nn.Conv3d`` on the split model's
    kernels (oneDNN for fp32 on a CPU) with the same outputs and gradients, in either memory layout."""
    cfg = OmegaConf.create({"name": "unet_small", "channels": [8, 16, 32], "strides": [2, 2],
                            "num_res_units": 1, "kernel_size": 3, "norm": "instance", "dropout": 0.0})
    torch.manual_seed(0)
    plain = build_model(cfg, 2, 3)
    steered = build_model(cfg, 2, 3)
    steered.load_state_dict(plain.state_dict())
    convs = sum(type(m) in PLAIN_CONV3D for m in plain.modules())  # the model's own Conv3d counts as plain
    assert steer_convolutions(steered) == convs > 0 and steer_convolutions(steered) == 0
    assert all(type(m) not in PLAIN_CONV3D for m in steered.modules())
    assert any(isinstance(m, SteeredConv3d) for m in steered.modules())
    cpu = torch.device("cpu")
    assert kernel_choice(plain, cpu, torch.float32) == "pytorch"
    assert kernel_choice(steered, cpu, torch.float32) == "onednn"
    assert kernel_choice(steered, cpu, torch.bfloat16) == "pytorch"  # oneDNN is steered to for fp32 only
    assert steered.state_dict().keys() == plain.state_dict().keys()
    for layout in (torch.contiguous_format, torch.channels_last_3d):
        a, b = plain.to(memory_format=layout), steered.to(memory_format=layout)
        x = torch.randn(1, 2, 16, 16, 16).contiguous(memory_format=layout)
        ya, yb = a(x), b(x)
        assert torch.allclose(ya, yb, rtol=1e-4, atol=1e-5)
        a.zero_grad(), b.zero_grad()
        ya.square().mean().backward()
        yb.square().mean().backward()
        for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
            assert torch.allclose(pa.grad, pb.grad, rtol=1e-3, atol=1e-6), name
            assert pb.grad.is_contiguous(memory_format=layout) == pb.is_contiguous(memory_format=layout)


@pytest.mark.parametrize("volume,window", [([50, 40, 30], 32), ([70, 33, 64], 32), ([20, 20, 20], 32)])
def test_computed_voxels_counts_what_monai_computes(volume, window):
    """bench inference's voxel accounting: the windows MONAI's sliding_window_inference hands its predictor,
    and the padded whole volume; LAMP's speed-up splits into fewer voxels x a cheaper voxel."""
    from monai.inferers import sliding_window_inference

    from lampseg.bench.inference import _compare_with_whole, computed_voxels

    seen = []
    sliding_window_inference(torch.zeros(1, 1, *volume), [window] * 3, 2,
                             lambda t: seen.append(t[:, 0].numel()) or t, overlap=0.5)
    assert computed_voxels(volume, 8, window, 0.5) == sum(seen)
    assert computed_voxels(volume, 8) == math.prod(-(-v // 8) * 8 for v in volume)
    rows = [{"seconds_per_volume": 1.0, "dice": 0.9, "window": None, "overlap": None, "computed_voxels": 100},
            {"seconds_per_volume": 6.0, "dice": 0.9, "window": 96, "overlap": 0.5, "computed_voxels": 400}]
    target = _compare_with_whole(rows)
    assert target["voxel_ratio_vs_96_0.5"] == 4 and target["per_voxel_speedup_vs_96_0.5"] == 1.5
    assert target["pass"] and rows[1]["whole_speedup"] == 6
