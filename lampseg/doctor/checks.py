"""``lampseg doctor``'s functional checks, each PASS or FAIL with one line of detail.

* ``single``: three optimiser steps of the probe U-Net in this process (``engine.steps.local_step``, the
  step ``lampseg train`` runs) at ``trainer.precision`` on ``trainer.device``: finite losses, weights moved.
* ``ddp``, ``pipeline``, ``spatial``: one torchrun job of two processes on 127.0.0.1
  (``lampseg.doctor.worker``, started by ``runtime.launcher.run_job``): NCCL on two or more GPUs, else gloo on
  the CPU. After ``doctor.timeout_s`` every process of the job is ended (torchrun and its workers, each in
  a session of its own), so nothing is left behind.
* ``inference``: ``inference.mode=auto`` on a whole 64x64x48 volume with this device's free memory as the
  budget (its choice and estimate), then with a budget too small for the whole volume (it must fall back
  to sliding windows); both outputs are finite and the volume's size.
"""
from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import DictConfig

from lampseg.config import derive, enum_value
from lampseg.doctor.probe import BATCH, SHAPE, failure_line, probe_config, probe_problem
from lampseg.engine.inference import infer
from lampseg.engine.optim import build_optimizer
from lampseg.engine.steps import local_step
from lampseg.model.unet import size_divisor
from lampseg.planner.inference import inference_memory
from lampseg.runtime.device import resolve_device, resolve_precision
from lampseg.runtime.launcher import JobError, run_job

DISTRIBUTED = ("ddp", "pipeline", "spatial")
CHECKS = ("single", "ddp", "pipeline", "spatial", "inference")
VOLUME = [64, 64, 48]


def _result(ok: bool, started: float, detail: str) -> dict:
    return {"ok": ok, "seconds": round(time.perf_counter() - started, 2), "detail": detail}


def check_single(cfg: DictConfig) -> str:
    """Three training steps in one process at the run's precision and device."""
    device = resolve_device(cfg.trainer.device)
    probe = probe_config(device=str(device))
    probe.trainer.precision = cfg.trainer.precision
    model, _, loss_fn, _, image, target = probe_problem(probe, device)
    before = [p.detach().clone() for p in model.parameters()]
    precision = resolve_precision(probe.trainer.precision, device).name
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16" and device.type == "cuda")
    step = local_step(model, build_optimizer(model, probe.optim), loss_fn, probe, device, scaler)
    started = time.perf_counter()
    losses = [step(image, target) for _ in range(3)]
    seconds = (time.perf_counter() - started) / 3
    if not all(math.isfinite(v) for v in losses):
        raise AssertionError(f"non-finite loss in 3 steps: {losses}")
    if all(torch.equal(a, b) for a, b in zip(before, model.parameters())):
        raise AssertionError("the optimiser step left every weight unchanged")
    return (f"3 training steps on {device} at {precision}, batch {BATCH} x "
            f"{SHAPE}: loss {losses[0]:.3f} -> {losses[-1]:.3f}, {seconds * 1000:.0f} ms/step")


def check_inference(cfg: DictConfig) -> str:
    """``inference.mode=auto`` with the device's free memory, then with too little for a whole volume."""
    device = resolve_device(cfg.trainer.device)
    probe = derive(probe_config(device=str(device)), {"trainer.precision": cfg.trainer.precision,
                                                       "inference": {"mode": "auto", "memory_gb": None}})
    model, _, _, targets, _, _ = probe_problem(probe, device)
    model.eval()
    image = torch.randn(1, SHAPE[0], *VOLUME, generator=torch.Generator().manual_seed(2)).to(device)
    divisor, roi = size_divisor(probe.model), SHAPE[1:]
    memory = inference_memory(probe, SHAPE[0], targets.out_channels, device)
    choices = []
    for budget in (memory.budget_gb, memory.whole_gb(VOLUME) * 0.75):  # what it has, then too little
        report: dict = {}
        with torch.no_grad():
            logits = infer(model, image, probe.inference, roi, divisor, enum_value(probe.trainer.precision),
                           memory=replace(memory, budget_gb=budget), report=report)
        if tuple(logits.shape) != (1, targets.out_channels, *VOLUME) or not torch.isfinite(logits).all():
            raise AssertionError(f"{report['mode']} inference gave {tuple(logits.shape)} or non-finite "
                                 "logits")
        choices.append(report)
    whole, small = choices
    if small["mode"] != "sliding":
        raise AssertionError(f"with {small['budget_gb']:.3g} GB, less than the whole volume's "
                             f"{whole['estimate_gb']:.3g} GB, it chose {small['mode']}")
    return (f"{VOLUME} volume: {whole['mode']} (~{whole['estimate_gb']:.3g} GB of "
            f"{whole['budget_gb']:.3g} GB free); with {small['budget_gb']:.2g} GB: sliding windows "
            f"{small['window']}")


def distributed_setting(cfg: DictConfig) -> tuple[str, str]:
    """(device, backend) of the two-process checks: two GPUs with NCCL, else the CPU with gloo."""
    device = resolve_device(cfg.trainer.device)
    if device.type == "cuda" and torch.cuda.device_count() >= 2:
        return "cuda", "cpu:gloo,cuda:nccl"
    return "cpu", "gloo"


def run_distributed(cfg: DictConfig, checks: list[str]) -> dict[str, dict]:
    """The two-process checks in one torchrun job on 127.0.0.1 (``lampseg.doctor.worker``); a job that
    fails or outlives ``doctor.timeout_s`` fails the checks it did not finish, with its last error line."""
    device, backend = distributed_setting(cfg)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lampseg-doctor-") as folder:
        spec, out = Path(folder) / "spec.json", Path(folder) / "out.json"
        timeout = float(cfg.doctor.timeout_s)
        spec.write_text(json.dumps({"checks": checks, "device": device, "backend": backend,
                                    "timeout_s": max(timeout / 2, 5.0)}))
        try:
            job = run_job(["-m", "lampseg.doctor.worker", spec, out], 2, timeout_s=timeout,
                          name="the 2-process job", timeout_key="doctor.timeout_s",
                          env={"OMP_NUM_THREADS": "1"}, check=False)
            problem = None if job.returncode == 0 else \
                f"the 2-process job exited {job.returncode}: {_last_error(job.stderr)}"
        except JobError:  # every process of it has ended
            problem = f"the 2-process job did not finish in doctor.timeout_s={timeout:g} s (killed)"
        results = json.loads(out.read_text()) if out.is_file() else {}
    for name in checks:
        if name not in results:
            results[name] = _result(False, started, problem or "not run")
        results[name].update(processes=2, backend=backend, device=device)
        results[name]["detail"] += f" [2 processes, {backend}, {device}]"
    return {name: results[name] for name in checks}


def _last_error(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if "Error" in line or "error" in line]
    return (lines[-1] if lines else stderr.strip().splitlines()[-1] if stderr.strip() else "no output")[:300]


def run_checks(cfg: DictConfig, log=print) -> dict[str, dict]:
    """Every check in ``doctor.checks`` (in ``CHECKS`` order), each logged as it finishes."""
    wanted = [c for c in CHECKS if c in cfg.doctor.checks]
    results: dict[str, dict] = {}
    local = {"single": check_single, "inference": check_inference}
    for name in wanted:
        if name in DISTRIBUTED:
            if any(d in results for d in DISTRIBUTED):
                continue
            batch = run_distributed(cfg, [d for d in wanted if d in DISTRIBUTED])
        else:
            started = time.perf_counter()
            try:
                batch = {name: _result(True, started, local[name](cfg))}
            except Exception as error:  # noqa: BLE001 - a check's failure is its result
                batch = {name: _result(False, started, failure_line(error))}
        for key, result in batch.items():
            results[key] = result
            verdict = "PASS" if result["ok"] else "FAIL"
            log(f"  {verdict}  {key:<10} {result['detail']} ({result['seconds']:.1f} s)")
    return results
