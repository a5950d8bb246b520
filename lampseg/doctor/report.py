"""``python -m lampseg doctor``: will lampseg work on this machine, and how should a run be split here?

    python -m lampseg doctor                                     # this machine, the default model
    python -m lampseg doctor model=unet64 data.root=/data/Task01_BrainTumour --json doctor.json
    python -m lampseg doctor "doctor.checks=[single,inference]"  # only these checks

Reports versions (torch, CUDA, cuDNN, NCCL, MONAI, Ray), the CPU (cores, kernel level, native bf16) and
devices with free memory; runs a functional check of every parallel mode on what is visible (one process,
DDP, a two-stage pipeline, two spatial slabs, memory-aware whole-volume inference; ``lampseg.doctor.checks``)
and prints each as PASS or FAIL; then the planner's capacity table for ``model`` and the dataset's channels
and labels at this machine's memory, and its suggestion for the devices visible here. Writes everything to
``run_dir/doctor.json`` (and to ``--json PATH``); exits 1 when a check fails. About 30 s on a 2-core CPU.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import DictConfig

from lampseg.config import enum_value, patch_size_of
from lampseg.data.msd import load_dataset
from lampseg.data.prepare import dataset_root, resolve_channels, resolve_targets
from lampseg.data.synth import LABELS, MODALITIES
from lampseg.doctor.checks import run_checks
from lampseg.doctor.system import cpu, devices, summary_lines, versions
from lampseg.errors import LampsegError
from lampseg.io import write_json
from lampseg.model.losses import Targets
from lampseg.model.unet import size_divisor
from lampseg.planner.capacity import DEVICE_COUNTS, capacity_lines, capacity_table
from lampseg.planner.plan import OPTIMIZER_STATES, profile_for, skip_routing
from lampseg.runtime.device import planned_precision

PROBE_SIDE = 64  # the planner's costs are profiled at this cube and scaled (when the patch is not fixed)


class DoctorFailed(LampsegError):
    """A ``lampseg doctor`` check failed (the report says which and why)."""


def _data(cfg: DictConfig) -> tuple[int, Targets, str]:
    """Channels, targets and a description of the dataset the planner plans for: ``data.root``'s
    ``dataset.json``, or the default synthetic dataset's (without generating it)."""
    if cfg.data.root is None:
        modalities = cfg.data.modalities or MODALITIES
        targets = Targets.from_config({int(k): v for k, v in LABELS.items()}, cfg.data.regions)
        return len(modalities), targets, "the default synthetic dataset"
    dataset = load_dataset(dataset_root(cfg.data))
    return (len(resolve_channels(dataset, cfg.data)), resolve_targets(dataset, cfg.data),
            f"{dataset.root / 'dataset.json'}")


def planner(cfg: DictConfig, machine: dict) -> dict:
    """The capacity table for ``model`` and the dataset at this machine's memory per device, and the layout
    it suggests for the devices visible here (GPUs; the CPU counts as one: its processes share memory)."""
    channels, targets, source = _data(cfg)
    gpus = machine["devices"]
    count = len(gpus) or 1
    budget = cfg.parallel.memory_gb
    if budget is None:
        budget = min(g["free_gb"] for g in gpus) if gpus else machine["cpu"]["memory_available_gb"]
    patch = patch_size_of(cfg) if cfg.data.patch_size not in ("whole", "auto") else None
    shape = [channels, *(patch or [PROBE_SIDE] * 3)]
    batch, p = cfg.data.batch_size, cfg.parallel
    costs = profile_for(cfg, channels, targets.out_channels, shape, "cpu", targets)
    precision = planned_precision(cfg).name  # what the costs assumed: auto resolved for trainer.device
    rows = capacity_table(costs, batch, budget, shape, p.schedule, OPTIMIZER_STATES.get(enum_value(
        cfg.optim.name), 2), size_divisor(cfg.model), skips=skip_routing(p))
    row = [r for r in rows if r.devices <= count][-1]
    side = max(row.pipeline_side, row.spatial_side, row.hybrid_side)
    layout = "one process" if row.devices == 1 else row.best
    where = f"{count} GPU(s)" if gpus else "this CPU (one device: its processes share its memory)"
    suggestion = {"devices": row.devices, "layout": layout, "largest_cube": side,
                  "text": f"on {where}: {layout}, the largest whole cube {side}^3 at batch {batch}, "
                          f"{precision} (`train parallel=auto` chooses the layout)"}
    return {"model": cfg.model.name, "params": sum(c.params for c in costs), "channels": channels,
            "out_channels": targets.out_channels, "dataset": source, "batch": batch,
            "precision": precision, "budget_gb": round(budget, 2),
            "device_counts": list(DEVICE_COUNTS), "capacity": [asdict(r) for r in rows],
            "suggestion": suggestion, "lines": capacity_lines(rows, budget)}


def run_doctor(cfg: DictConfig, log=print) -> dict:
    """Check this machine (module docstring); returns the report written to ``doctor.json``.

    Raises:
        DoctorFailed: a check failed (after the report is written).
    """
    started = time.perf_counter()
    machine = {"versions": versions(), "cpu": cpu(), "devices": devices()}
    log(f"lampseg doctor ({datetime.now().astimezone():%Y-%m-%d %H:%M %Z})")
    for line in summary_lines(machine):
        log(line)
    log("checks:")
    checks = run_checks(cfg, log)
    report = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **machine, "checks": checks}
    try:
        plan = planner(cfg, machine)
        log(f"planner: model {plan['model']} ({plan['params']:,} parameters), {plan['channels']} channels -> "
            f"{plan['out_channels']} outputs ({plan['dataset']}), batch {plan['batch']}, {plan['precision']}")
        for line in plan.pop("lines"):
            log("  " + line)
        log(f"suggestion: {plan['suggestion']['text']}")
    except LampsegError as error:  # a bad data.root or model: the checks above still stand
        plan = {"error": str(error)}
        log(f"planner: {error}")
    failed = [name for name, result in checks.items() if not result["ok"]]
    report.update(planner=plan, ok=not failed, failed=failed,
                  seconds=round(time.perf_counter() - started, 1))
    paths = [Path(cfg.run_dir) / "doctor.json"] + ([Path(cfg.doctor.json)] if cfg.doctor.json else [])
    for path in paths:
        write_json(path, report)
    log(f"{len(checks) - len(failed)} of {len(checks)} checks passed in {report['seconds']:.0f} s; "
        f"wrote {', '.join(str(p) for p in paths)}")
    if failed:
        raise DoctorFailed(f"check(s) failed: {', '.join(failed)} (details above and in {paths[-1]})")
    return report
