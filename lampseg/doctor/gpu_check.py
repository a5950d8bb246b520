"""A prepared GPU check: every CUDA/NCCL path of lampseg in one command of under 8 minutes, one JSON out.

    launch/gpu_check.sh gpu_check.json            # on a machine with 1+ GPUs
    launch/gpu_check.sh --dry-run dry.json        # the same steps on the CPU at tiny sizes (CI runs it)
    python -m lampseg.doctor.gpu_check --steps train,bench_inference --dry-run dry.json   # some steps

Each step is a ``python -m lampseg ...`` command of its own (doctor imports no benchmark; it starts them),
run by ``runtime.launcher.run_command`` with its own timeout, after which every process of it ends; a
failed step does not stop the others. Steps (``STEPS``), as many processes as GPUs for the distributed
ones (``processes``: with one GPU, two DDP ranks share it over gloo, and the pipeline and spatial
benchmarks run their one-process arm, since their point-to-point exchanges need a GPU per rank):

* ``environment``: GPU names and memory, torch, CUDA, cuDNN, NCCL and the other versions
  (``doctor.system``, in a subprocess: CUDA is not initialised in the check's own process);
* ``doctor``: ``python -m lampseg doctor`` with every check;
* ``train``: the default ``python -m lampseg train`` with ``trainer.precision=auto`` (20 epochs);
* ``bench_pipeline``, ``bench_inference`` (on the train's ``best.pt``), ``bench_spatial``: short runs;
* ``ddp``: ``python -m lampseg.launch ... -m lampseg train parallel=ddp`` over the processes.

The JSON (rewritten after every step, so a killed check leaves what it had) holds per step the command,
exit code, wall seconds, the key figures parsed from the step's own JSON output and, on failure, the end
of its output. ``--dry-run`` runs the same steps on the CPU (``CUDA_VISIBLE_DEVICES`` empty,
``trainer.device=cpu``) at ``+exp=smoke`` sizes. Exit status 0 when every step passed, else 1.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from lampseg.doctor.system import cpu, devices, versions
from lampseg.io import write_json
from lampseg.runtime.launcher import JobError, JobResult, job_command, run_command

BUDGET_S = 480.0  # the whole check (8 minutes): no step may run past it
TAIL_LINES = 40  # of a failed step's output kept in the JSON
STEPS = ("environment", "doctor", "train", "bench_pipeline", "bench_inference", "bench_spatial", "ddp")
Figures = Callable[[Path], dict]


@dataclass
class Step:
    """One command of the check.

    Attributes:
        name: its key in the JSON (one of ``STEPS``).
        command: the program and its arguments.
        timeout_s: its own limit (cut to what is left of the budget when it starts).
        run_dir: where it writes; its figures are read from there.
        figures: reads the key figures from ``run_dir`` once it has run (``{}`` when there are none).
        env: variables set for it.
        needs: a file it needs (a checkpoint); the step is skipped when an earlier step did not write it.
    """

    name: str
    command: list[str]
    timeout_s: float
    run_dir: Path
    figures: Figures
    env: dict[str, str] = field(default_factory=dict)
    needs: Path | None = None


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def _doctor_figures(run_dir: Path) -> dict:
    report = _read(run_dir / "doctor.json")
    return {"ok": report["ok"], "failed": report["failed"], "seconds": report["seconds"],
            "checks": {name: {k: check.get(k) for k in ("ok", "seconds", "detail")}
                       for name, check in report["checks"].items()},
            "suggestion": report.get("planner", {}).get("suggestion", {}).get("text")}


def _train_figures(run_dir: Path) -> dict:
    summary = _read(run_dir / "summary.json")
    keys = ("status", "epochs", "best_epoch", "best_val_dice", "wall_s", "precision", "precision_reason",
            "train_samples_per_s", "peak_memory_mb", "device", "world_size", "dp", "backend")
    return {k: summary.get(k) for k in keys}


def _pipeline_figures(run_dir: Path) -> dict:
    result = _read(run_dir / "bench_pipeline.json")
    return {"memory_error_max": result["memory_error_max"], "pass": result["pass"],
            "largest_cube": result["largest_cube"],
            "configs": [{k: c.get(k) for k in ("pp", "microbatches", "step_s", "efficiency",
                                               "memory_error_max")} for c in result["configs"]]}


def _inference_figures(run_dir: Path) -> dict:
    result = _read(run_dir / "bench_inference.json")
    return {"modes": [{k: m.get(k) for k in ("name", "seconds_per_volume", "whole_speedup", "dice",
                                             "peak_memory_mb")} for m in result["modes"]],
            "auto": [{k: a.get(k) for k in ("name", "budget_gb", "chose", "pass")} for a in result["auto"]]}


def _spatial_figures(run_dir: Path) -> dict:
    result = _read(run_dir / "bench_spatial.json")
    keys = ("train_s", "infer_s", "train_speedup", "infer_speedup", "ceiling_train_speedup",
            "ceiling_infer_speedup", "measured_gb_max", "planned_gb", "first_loss", "kernels",
            "memory_format")
    return {"precision": result["config"].get("precision"),
            "summary": {sp: {k: s.get(k) for k in keys} for sp, s in result["summary"].items()}}


def _environment_figures(run_dir: Path) -> dict:
    return _read(run_dir / "environment.json")


def environment() -> dict:
    """The machine as ``doctor`` reports it: versions (torch, CUDA, cuDNN, NCCL, ...), CPU and GPUs.

    Returns:
        ``{"versions", "cpu", "gpus", "gpu_names"}``, JSON-ready.
    """
    gpus = devices()
    return {"versions": versions(), "cpu": cpu(), "gpus": gpus, "gpu_names": [g["name"] for g in gpus]}


def processes(gpus: int, dry_run: bool) -> tuple[int, int]:
    """How many processes the distributed steps start: as many as GPUs, with these exceptions.

    DDP needs only broadcast and all-reduce, which gloo does for CUDA tensors, so with one GPU two DDP ranks
    share it over gloo. Pipeline stages and slabs exchange tensors point to point (and gather them): NCCL
    refuses two ranks on one GPU ("Duplicate GPU detected") and gloo has no send, receive or all-gather for
    CUDA tensors, so with one GPU ``bench pipeline`` and ``bench spatial`` run their one-process arm only.

    Args:
        gpus: GPUs visible.
        dry_run: the CPU dry run (two processes each, over gloo).

    Returns:
        ``(DDP processes, pipeline and spatial processes)``.
    """
    if dry_run or gpus == 0:
        return 2, 2
    return max(2, gpus), gpus


def plan_steps(work: Path, gpus: int, dry_run: bool, python: str = sys.executable) -> list[Step]:
    """The check's commands for this machine.

    Args:
        work: a folder for the steps' run directories and logs.
        gpus: GPUs visible (``nvidia-smi -L``'s count; ignored by a dry run).
        dry_run: the same steps on the CPU at ``+exp=smoke`` sizes.
        python: the interpreter with lampseg installed.

    Returns:
        Every step of ``STEPS``, in order.
    """
    ddp_procs, split_procs = processes(gpus, dry_run)
    shared = not dry_run and ddp_procs > gpus  # two DDP ranks on one GPU: over gloo (NCCL refuses)
    lampseg = [python, "-m", "lampseg"]
    device = ["trainer.device=cpu"] if dry_run else []
    tiny = ["+exp=smoke", *device] if dry_run else []
    env = {"CUDA_VISIBLE_DEVICES": ""} if dry_run else {}
    backend = ["parallel.backend=gloo"] if shared else []
    side = max(64, 8 * split_procs)  # bench spatial: a multiple of unet_small's divisor (8) on every slab
    runs = {name: work / name for name in STEPS}
    ckpt = runs["train"] / "checkpoints" / "best.pt"
    if dry_run:
        pipeline = ["bench.pp=[1,2]", "bench.microbatches=[2]", "bench.steps=1", "bench.warmup=0"]
        inference = ["bench.windows=[16]", "bench.overlaps=[0.5]", "bench.repeats=1", "bench.cases=1"]
        spatial = ["data.batch_size=1", "bench.steps=1", "bench.warmup=1", "bench.repeats=1"]
        train, ddp = ["trainer.max_epochs=2"], ["trainer.max_epochs=1"]
    else:
        split = "1" if split_procs == 1 else f"1,{split_procs}"
        pipeline = [f"bench.pp=[{split}]", "bench.microbatches=[1,4]", "bench.steps=3", "bench.warmup=1"]
        inference = ["bench.windows=[64]", "bench.overlaps=[0.5]", "bench.repeats=1", "bench.cases=2"]
        spatial = [f"data.patch_size=[{side},{side},{side}]", "data.batch_size=1", f"bench.sp=[{split}]",
                   "bench.steps=3", "bench.warmup=1", "bench.repeats=1"]
        train, ddp = [], ["trainer.max_epochs=6"]
    timeouts = {"environment": 20, "doctor": 70, "train": 150, "bench_pipeline": 60, "bench_inference": 45,
                "bench_spatial": 60, "ddp": 75}  # 480 s in all
    if dry_run:  # a 2-core CPU is slower than a GPU at these sizes; the dry run is not held to 8 minutes
        timeouts = {name: 2 * t for name, t in timeouts.items()}

    def step(name: str, command: list[str], figures: Figures, step_env: dict[str, str] | None = None,
             needs: Path | None = None) -> Step:
        return Step(name, command, timeouts[name], runs[name], figures, step_env or env, needs)

    return [
        step("environment", [python, "-m", "lampseg.doctor.gpu_check", "--environment",
                             str(runs["environment"] / "environment.json")], _environment_figures),
        step("doctor", [*lampseg, "doctor", *device, f"run_dir={runs['doctor']}"], _doctor_figures),
        step("train", [*lampseg, "train", *tiny, *train, "trainer.precision=auto",
                       f"run_dir={runs['train']}"], _train_figures),
        step("bench_pipeline", [*lampseg, "bench", "pipeline", *tiny, *pipeline, "bench.timeout_s=50",
                                f"run_dir={runs['bench_pipeline']}"], _pipeline_figures),
        step("bench_inference", [*lampseg, "bench", "inference", f"ckpt={ckpt}", *device, *inference,
                                 f"run_dir={runs['bench_inference']}"], _inference_figures, needs=ckpt),
        step("bench_spatial", [*lampseg, "bench", "spatial", *tiny, *spatial, "trainer.precision=auto",
                               "bench.timeout_s=50", f"run_dir={runs['bench_spatial']}"], _spatial_figures),
        step("ddp", job_command(["-m", "lampseg", "train", "parallel=ddp", *tiny, *ddp, *backend,
                                 "trainer.precision=auto", f"run_dir={runs['ddp']}"], ddp_procs),
             _train_figures),
    ]


def _tail(result: JobResult) -> str:
    """The last ``TAIL_LINES`` non-empty lines of a step's output, then of its error output."""
    parts = []
    for what, text in (("stdout", result.stdout), ("stderr", result.stderr)):
        lines = [line.rstrip() for line in text.splitlines() if line.strip()][-TAIL_LINES:]
        if lines:
            parts.append(f"--- {what} ---\n" + "\n".join(lines))
    return "\n".join(parts)


def run_step(step: Step, timeout_s: float) -> dict:
    """Run one step and describe it.

    Args:
        step: what to run.
        timeout_s: its limit now (its own, or less when the budget is nearly spent).

    Returns:
        ``command``, ``exit_code`` (None when skipped or timed out), ``ok``, ``timed_out``, ``wall_s``,
        ``timeout_s``, ``log`` and ``figures``; ``tail`` (the end of its output) when it failed; ``skipped``
        (why) when it could not start.
    """
    record = {"command": step.command, "timeout_s": round(timeout_s, 1), "run_dir": str(step.run_dir)}
    if step.needs is not None and not step.needs.exists():
        return {**record, "ok": False, "skipped": f"{step.needs} is missing (an earlier step failed)",
                "exit_code": None, "timed_out": False, "wall_s": 0.0, "figures": {}}
    if timeout_s < 5:
        return {**record, "ok": False, "skipped": "the check's time budget is spent", "exit_code": None,
                "timed_out": False, "wall_s": 0.0, "figures": {}}
    logs = step.run_dir.parent / f"{step.name}.logs"
    for old in (step.run_dir, logs):  # a rerun starts afresh: no resumed train, no figures of a past run
        shutil.rmtree(old, ignore_errors=True)
    try:
        result = run_command(step.command, timeout_s=timeout_s, name=step.name, env=step.env, log_dir=logs,
                             check=False)
    except JobError as error:  # timed out: every process of it has ended
        result = error.result
    except OSError as error:  # it could not start (no such program)
        return {**record, "ok": False, "exit_code": None, "timed_out": False, "wall_s": 0.0, "figures": {},
                "tail": f"{type(error).__name__}: {error}"}
    record.update(exit_code=None if result.timed_out else result.returncode, timed_out=result.timed_out,
                  wall_s=round(result.seconds, 2), log=str(logs))
    try:
        record["figures"] = step.figures(step.run_dir)
    except (OSError, ValueError, KeyError, TypeError) as error:  # no (or a partial) JSON output
        record["figures"] = {"error": f"{type(error).__name__}: {error}"}
    record["ok"] = result.returncode == 0 and not result.timed_out and "error" not in record["figures"]
    if not record["ok"]:
        record["tail"] = _tail(result)
    return record


def visible_gpus() -> int:
    """GPUs ``nvidia-smi -L`` lists (0 without it or without GPUs), counted without initialising CUDA here."""
    try:
        result = run_command(["nvidia-smi", "-L"], timeout_s=30, name="nvidia-smi -L", check=False)
    except (JobError, OSError):
        return 0
    if result.returncode != 0:
        return 0
    count = sum(line.startswith("GPU ") for line in result.stdout.splitlines())
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        count = min(count, len([d for d in visible.split(",") if d.strip()]))
    return count


def run_check(out: Path, dry_run: bool = False, only: list[str] | None = None, work: Path | None = None,
              budget_s: float = BUDGET_S) -> dict:
    """Run the check's steps (module docstring) and write ``out``.

    Args:
        out: the JSON to write (after every step).
        dry_run: the same steps on the CPU at tiny sizes.
        only: run only these steps (names of ``STEPS``, in their order); default all.
        work: where the steps' run directories and logs go (default ``OUT`` without ``.json``, plus
            ``_runs``).
        budget_s: the whole check's limit; a step starts with at most what is left of it (dry runs: none).

    Returns:
        What is written to ``out``: ``ok``, ``dry_run``, ``gpus``, ``processes``, ``wall_s``,
        ``environment`` (the environment step's figures) and ``steps`` (name -> ``run_step``'s record).
    """
    unknown = sorted(set(only or []) - set(STEPS))
    if unknown or only == []:
        raise ValueError(f"unknown step(s) {unknown}; the steps are {', '.join(STEPS)}")
    work = work or out.with_name(out.stem + "_runs")
    gpus = 0 if dry_run else visible_gpus()
    steps = [s for s in plan_steps(work, gpus, dry_run) if only is None or s.name in only]
    started = time.monotonic()
    ddp_procs, split_procs = processes(gpus, dry_run)
    report = {"check": "gpu", "dry_run": dry_run, "ok": False,
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "gpus": gpus,
              "processes": {"ddp": ddp_procs, "pipeline_spatial": split_procs},
              "budget_s": None if dry_run else budget_s,
              "work": str(work), "wall_s": 0.0, "environment": None, "steps": {}}
    for step in steps:
        left = step.timeout_s if dry_run else min(step.timeout_s, budget_s - (time.monotonic() - started))
        print(f"gpu check: {step.name} (up to {left:.0f} s) ...", flush=True)
        record = run_step(step, left)
        report["steps"][step.name] = record
        if step.name == "environment":
            report["environment"] = record["figures"]
        state = "PASS" if record["ok"] else "SKIP" if "skipped" in record else "FAIL"
        why = record.get("skipped") or (record.get("tail") or "").rsplit("\n", 1)[-1]
        print(f"gpu check: {state} {step.name} in {record['wall_s']:.1f} s" + (f": {why}" if why else ""),
              flush=True)
        report.update(wall_s=round(time.monotonic() - started, 1),
                      ok=all(r["ok"] for r in report["steps"].values()))
        write_json(out, report)
    return report


def main(argv: list[str] | None = None) -> int:
    """``python -m lampseg.doctor.gpu_check [--dry-run] [--steps A,B] [--work DIR] [OUT.json]``.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 when every step passed, 1 when one did not, 2 for bad arguments.
    """
    parser = argparse.ArgumentParser(prog="launch/gpu_check.sh", description=__doc__.split("\n")[0])
    parser.add_argument("out", nargs="?", default="gpu_check.json", help="the JSON to write")
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at tiny sizes")
    parser.add_argument("--steps", help=f"comma-separated subset of {','.join(STEPS)}")
    parser.add_argument("--work", help="folder for the steps' run directories (default OUT_runs)")
    parser.add_argument("--environment", action="store_true", help=argparse.SUPPRESS)  # the first step
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    if args.environment:
        write_json(out, environment())
        return 0
    only = [s.strip() for s in args.steps.split(",") if s.strip()] if args.steps else None
    try:
        report = run_check(out, args.dry_run, only, Path(args.work).resolve() if args.work else None)
    except ValueError as error:
        parser.error(str(error))
    passed = sum(r["ok"] for r in report["steps"].values())
    print(f"gpu check: {passed} of {len(report['steps'])} steps passed in {report['wall_s']:.0f} s; "
          f"wrote {out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
