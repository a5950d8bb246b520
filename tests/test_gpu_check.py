"""Tests for the prepared GPU check (``launch/gpu_check.sh``, ``lampseg.doctor.gpu_check``): its CPU dry run
end to end on a subset of its steps, the commands it plans for GPU machines, and what a failed, timed-out or
skipped step leaves in the JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from lampseg.doctor import gpu_check
from lampseg.doctor.gpu_check import BUDGET_S, STEPS, Step, plan_steps, processes, run_check
from lampseg.runtime.device import resolve_precision

# The whole dry run takes 2-5 minutes on a 2-core CPU (doctor, two torchrun benchmarks and a DDP train, each a
# fresh interpreter); the default suite runs these three (25-60 s), the extended one all seven.
SUBSET = ["environment", "train", "bench_inference"]


def _dry_run(tmp_path: Path, steps: list[str] | None) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "dry.json"
    command = ["bash", str(REPO / "launch" / "gpu_check.sh"), "--dry-run", str(out)]
    if steps is not None:
        command[3:3] = ["--steps", ",".join(steps)]
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    return proc, json.loads(out.read_text())


@pytest.mark.parametrize("steps", [pytest.param(SUBSET, id="subset"),
                                   pytest.param(None, id="all", marks=pytest.mark.extended)])
def test_dry_run_writes_one_json_with_every_step(tmp_path: Path, steps: list[str] | None) -> None:
    proc, report = _dry_run(tmp_path, steps)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = steps or list(STEPS)
    assert list(report["steps"]) == names and report["ok"] is True
    assert report["dry_run"] is True and report["gpus"] == 0
    assert report["processes"] == {"ddp": 2, "pipeline_spatial": 2}
    assert 0 < report["wall_s"] and f"{len(names)} of {len(names)} steps passed" in proc.stdout
    for name, step in report["steps"].items():
        assert step["ok"] and step["exit_code"] == 0 and not step["timed_out"], (name, step)
        assert step["wall_s"] > 0 and step["timeout_s"] > 0 and isinstance(step["command"], list)
        assert "tail" not in step and "error" not in step["figures"], (name, step)
    env = report["environment"]
    assert env["versions"]["torch"] and env["gpus"] == [] and env["gpu_names"] == []
    assert report["steps"]["environment"]["figures"] == env
    train = report["steps"]["train"]
    assert "+exp=smoke" in train["command"] and "trainer.precision=auto" in train["command"]
    figures = train["figures"]
    assert figures["status"] == "completed" and figures["epochs"] == 2 and figures["device"] == "cpu"
    assert figures["precision"] == resolve_precision("auto", "cpu").name and figures["precision_reason"]
    assert 0 <= figures["best_val_dice"] <= 1 and figures["wall_s"] > 0
    inference = report["steps"]["bench_inference"]
    ckpt = Path(report["work"]) / "train" / "checkpoints" / "best.pt"
    assert f"ckpt={ckpt}" in inference["command"] and ckpt.exists()
    modes = inference["figures"]["modes"]
    assert modes[0]["name"] == "whole" and all(m["seconds_per_volume"] > 0 for m in modes)
    if steps is None:  # the distributed steps, the doctor and the benchmarks' figures
        s = report["steps"]
        assert s["doctor"]["figures"]["ok"] and set(s["doctor"]["figures"]["checks"]) == {
            "single", "ddp", "pipeline", "spatial", "inference"}
        configs = s["bench_pipeline"]["figures"]["configs"]
        assert {(c["pp"], c["microbatches"]) for c in configs} == {(1, 2), (2, 2)}
        spatial = s["bench_spatial"]["figures"]["summary"]
        assert spatial["2"]["first_loss"] == pytest.approx(spatial["1"]["first_loss"], rel=1e-4)
        assert (s["ddp"]["figures"]["world_size"], s["ddp"]["figures"]["backend"]) == (2, "gloo")


def test_gpu_commands_use_every_gpu_and_fit_eight_minutes(tmp_path: Path) -> None:
    one, four = plan_steps(tmp_path, 1, False), plan_steps(tmp_path, 4, False)
    assert [s.name for s in one] == list(STEPS)
    assert sum(s.timeout_s for s in one) <= BUDGET_S == 480
    by_one, by_four = {s.name: s for s in one}, {s.name: s for s in four}
    # one GPU: two DDP ranks share it over gloo (NCCL refuses two ranks on one device); pipeline stages and
    # slabs need send/receive of CUDA tensors, which gloo lacks: their one-process arm only
    assert processes(1, False) == (2, 1) and processes(4, False) == (4, 4) and processes(8, True) == (2, 2)
    assert "--nproc_per_node=2" in by_one["ddp"].command and "parallel.backend=gloo" in by_one["ddp"].command
    assert "bench.sp=[1]" in by_one["bench_spatial"].command and "bench.pp=[1]" in by_one[
        "bench_pipeline"].command
    # four GPUs: four processes, NCCL (the default backend), one per GPU
    assert "--nproc_per_node=4" in by_four["ddp"].command
    assert not any("backend" in arg for arg in by_four["ddp"].command)
    assert "bench.sp=[1,4]" in by_four["bench_spatial"].command and "bench.pp=[1,4]" in by_four[
        "bench_pipeline"].command
    for step in four:  # the real sizes: no smoke config, the default train with precision=auto, the GPU
        assert "+exp=smoke" not in step.command and "trainer.device=cpu" not in step.command
        assert "CUDA_VISIBLE_DEVICES" not in step.env
    assert by_four["train"].command[-2:] == ["trainer.precision=auto", f"run_dir={tmp_path / 'train'}"]
    assert by_four["bench_inference"].needs == tmp_path / "train" / "checkpoints" / "best.pt"
    dry = {s.name: s for s in plan_steps(tmp_path, 4, True)}  # a GPU machine's dry run stays on the CPU
    assert all(s.env["CUDA_VISIBLE_DEVICES"] == "" for s in dry.values())
    assert "--nproc_per_node=2" in dry["ddp"].command and "+exp=smoke" in dry["bench_spatial"].command


def _step(tmp_path: Path, name: str, code: str, timeout_s: float = 60, needs: Path | None = None) -> Step:
    return Step(name, [sys.executable, "-c", code], timeout_s, tmp_path / name,
                lambda run_dir: json.loads((run_dir / "figures.json").read_text()), needs=needs)


def test_a_failed_a_timed_out_and_a_skipped_step_are_recorded_and_the_others_run(tmp_path: Path,
                                                                                  monkeypatch) -> None:
    ok = ("import json, pathlib; d = pathlib.Path(r'{}'); d.mkdir(parents=True); "
          "(d / 'figures.json').write_text(json.dumps({{'dice': 0.9}}))").format(tmp_path / "good")
    steps = [
        _step(tmp_path, "bad", "import sys; print('going wrong'); sys.exit('it broke')"),
        _step(tmp_path, "good", ok),
        _step(tmp_path, "noisy", "print('no figures')"),  # exit 0 but no JSON output: not a pass
        _step(tmp_path, "missing", "print('never runs')", needs=tmp_path / "nothing.pt"),
        _step(tmp_path, "hangs", "import time; print('started', flush=True); time.sleep(120)", timeout_s=100),
        _step(tmp_path, "late", "print('never runs')"),
    ]
    monkeypatch.setattr(gpu_check, "plan_steps", lambda work, gpus, dry_run: steps)
    out = tmp_path / "check.json"
    report = run_check(out, dry_run=False, budget_s=8)  # the budget cuts "hangs" short and skips "late"
    assert json.loads(out.read_text()) == report and report["ok"] is False
    s = report["steps"]
    assert list(s) == ["bad", "good", "noisy", "missing", "hangs", "late"]
    assert (s["bad"]["ok"], s["bad"]["exit_code"], s["bad"]["timed_out"]) == (False, 1, False)
    assert "going wrong" in s["bad"]["tail"] and "it broke" in s["bad"]["tail"]
    assert s["good"]["ok"] and s["good"]["figures"] == {"dice": 0.9} and "tail" not in s["good"]
    assert not s["noisy"]["ok"] and "FileNotFoundError" in s["noisy"]["figures"]["error"]
    assert "no figures" in s["noisy"]["tail"]
    assert "nothing.pt is missing" in s["missing"]["skipped"] and s["missing"]["exit_code"] is None
    hangs = s["hangs"]
    assert hangs["timed_out"] and hangs["exit_code"] is None and "started" in hangs["tail"]
    assert hangs["timeout_s"] < 8 and hangs["wall_s"] < 15
    assert s["late"]["skipped"] == "the check's time budget is spent"
    assert report["wall_s"] < 20


def test_unknown_steps_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown step"):
        run_check(tmp_path / "x.json", dry_run=True, only=["train", "nosuch"])
    assert gpu_check.main(["--environment", str(tmp_path / "env.json")]) == 0
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["versions"]["python"] and "cpu" in env and isinstance(env["gpus"], list)


def test_a_rerun_step_starts_afresh(tmp_path):
    """A second check reports its own figures, never a past run's (a resumed train would skip its loop and
    report the first run's Dice)."""
    import json
    import sys

    from lampseg.doctor.gpu_check import Step, _train_figures, run_step

    run_dir = tmp_path / "runs" / "train"
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"status": "completed", "best_val_dice": 0.95}))
    step = Step("train", [sys.executable, "-c", "pass"], 30, run_dir, _train_figures)
    record = run_step(step, 30)
    assert not (run_dir / "summary.json").exists() and not record["ok"]  # it wrote nothing this time
    assert "best_val_dice" not in json.dumps(record["figures"])
