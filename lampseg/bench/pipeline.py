"""``python -m lampseg bench pipeline``: the pipelining engine measured against its plan.

    python -m lampseg bench pipeline data.patch_size=[64,64,64] bench.steps=3

For every pp in ``bench.pp`` (default 1, 2, 4) one ``torchrun --nproc_per_node pp`` job (127.0.0.1, one
thread per process) trains the configured U-Net with ``lampseg.parallel.pipelining.PipelinedUNet`` for
every micro-batch count in ``bench.microbatches`` (default 1, 2, 4, 8; the batch is their least common
multiple), built by ``parallelize`` as ``train`` builds it, on random data, and each rank reports:

* step time (median of ``bench.steps`` timed steps after ``bench.warmup``), the same on all ranks;
* peak memory of one step: CUDA's peak allocated; on CPU, the bytes held at entry (parameters and
  optimiser state of the stage) plus the peak the step allocates, read from the profiler's allocation
  events (``lampseg.runtime.memory.PeakMemory``); split into static (weights, gradients, optimiser
  state, counted exactly) and activations (the rest);
* the plan's estimate for the same stage.

pp=1 is the unsplit model through the same code (one stage, micro-batches = gradient accumulation). The
measured bubble is ``1 - t(1, M) / (pp * t(pp, M))`` (idle share against perfect scaling of the unsplit
step at the same micro-batch size), next to the ideal ``(S - 1) / (M + S - 1)``; it is only meaningful
when every process has its own core or GPU. The largest cubic input per pp comes from the planner for
``bench.memory_gb`` per stage. Writes ``bench_pipeline.json`` and ``bench_pipeline.png`` in ``run_dir``.
"""
from __future__ import annotations

import gc
import json
import math
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from lampseg.bench.workers import launch_workers, random_batch, start_worker, timed_steps
from lampseg.config import ConfigError, checked, derive, enum_value, patch_size_of, to_container
from lampseg.data.msd import load_dataset
from lampseg.data.prepare import dataset_root, resolve_channels, resolve_targets
from lampseg.engine.optim import build_optimizer
from lampseg.engine.steps import pipelined_step
from lampseg.io import atomic_write_bytes, atomic_write_text, write_json
from lampseg.model.losses import build_loss
from lampseg.model.unet import build_model, size_divisor
from lampseg.parallel.dims import ParallelDims
from lampseg.parallel.parallelize import parallelize
from lampseg.planner.layout import plan_split
from lampseg.planner.plan import OPTIMIZER_STATES, largest_cube, plan_for
from lampseg.plots import figure_png, pyplot
from lampseg.runtime import distributed
from lampseg.runtime.device import resolve_device

MEMORY_TOLERANCE = 0.10  # planned within 10 % of measured
UNDER_TOLERANCE = 0.05  # and never more than 5 % below it (the unsafe side)
ACTIVATION_SHARE = 1.25  # per-stage activations <= 1.25 x unsplit / pp
EFFICIENCY_TOLERANCE = 0.15  # GPU: efficiency within 15 % of M / (M + S - 1)


def _worker(config_path: str, out_path: str) -> None:
    """One rank of one pp: every micro-batch count, one JSON row per (M, rank) gathered on rank 0."""
    spec, cfg, device = start_worker(config_path)
    pp, rank = dist.get_world_size(), dist.get_rank()
    dims = ParallelDims(dp=1, pp=pp, world=pp, engine="pipelining")
    in_ch, patch, batch = spec["in_channels"], spec["patch"], spec["batch"]
    targets, image, target = random_batch(spec, cfg, batch)
    rows = []
    for micro in spec["microbatches"]:
        if cfg.parallel.schedule == "1f1b" and pp > 1 and micro < pp:
            continue  # 1F1B needs at least as many micro-batches as stages
        cfg = derive(cfg, {"parallel": {"name": "pipeline", "pp": pp, "microbatches": micro}}, check=False)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, in_ch, targets.out_channels)
        plan = plan_split(cfg, in_ch, targets.out_channels, [in_ch, *patch], device, targets)  # rank 0's
        net = parallelize(model, dims, plan, device, cfg.trainer.precision, cfg.model)
        net.train()
        optimizer = build_optimizer(net, cfg.optim)
        step = pipelined_step(net, optimizer, build_loss(cfg.optim, targets), cfg)
        for _ in range(cfg.bench.warmup):
            step(image, target)
        times = timed_steps(partial(step, image, target), cfg.bench.steps, device)
        _, memory = net.measure_step(step, optimizer, image, target)
        stage = plan.stages[rank]
        rows.append({"pp": pp, "microbatches": micro, **memory, "step_s": statistics.median(times),
                     "measured_activation_gb": memory["measured_gb"] - memory["static_gb"],
                     "planned_activation_gb": stage.activation_gb, "plan_bubble": plan.bubble,
                     "checkpoint": plan.checkpoint, "schedule": plan.schedule})
        del net, optimizer, step, model
        gc.collect()
    parts = [None] * pp if rank == 0 else None
    dist.gather_object(rows, parts, dst=0)
    if rank == 0:
        atomic_write_text(out_path, json.dumps([row for part in parts for row in part]))
    distributed.shutdown()


def _summarise(rows: list[dict], cfg, cubes: dict[int, int], device: str) -> dict:
    by = {(r["pp"], r["microbatches"]): [] for r in rows}
    for r in rows:
        by[(r["pp"], r["microbatches"])].append(r)
    configs = []
    for (pp, micro), stages in sorted(by.items()):
        stages.sort(key=lambda r: r["stage"])
        unsplit = by.get((1, micro))
        step = max(r["step_s"] for r in stages)
        entry = {"pp": pp, "microbatches": micro, "step_s": step,
                 "bubble_ideal": (pp - 1) / (micro + pp - 1), "stages": stages,
                 "memory_error_max": max(abs(r["planned_gb"] / r["measured_gb"] - 1) for r in stages),
                 "memory_under_max": max(0.0, *(1 - r["planned_gb"] / r["measured_gb"] for r in stages))}
        if unsplit:
            base_step, base_act = unsplit[0]["step_s"], unsplit[0]["measured_activation_gb"]
            entry["efficiency"] = base_step / (pp * step)
            entry["bubble_measured"] = 1 - entry["efficiency"]
            entry["activation_share_max"] = max(r["measured_activation_gb"] for r in stages) / (base_act / pp)
        configs.append(entry)
    errors, unders = [c["memory_error_max"] for c in configs], [c["memory_under_max"] for c in configs]
    shares = [c["activation_share_max"] for c in configs if c["pp"] > 1 and "activation_share_max" in c]
    result = {"memory_error_max": max(errors), "memory_under_max": max(unders),
              "activation_share_max": max(shares) if shares else None,
              "pass": {"memory_within_10pct": max(errors) <= MEMORY_TOLERANCE,
                       "memory_under_at_most_5pct": max(unders) <= UNDER_TOLERANCE,
                       "activation_share": (max(shares) <= ACTIVATION_SHARE) if shares else None}}
    if device.startswith("cuda"):
        gaps = [abs(c["efficiency"] / (1 - c["bubble_ideal"]) - 1) for c in configs
                if c["pp"] > 1 and "efficiency" in c]
        result["pass"]["efficiency_within_15pct"] = max(gaps) <= EFFICIENCY_TOLERANCE if gaps else None
    return {**result, "configs": configs, "largest_cube": {str(k): v for k, v in cubes.items()},
            "targets": {"memory_error_max": MEMORY_TOLERANCE, "memory_under_max": UNDER_TOLERANCE,
                        "activation_share_max": ACTIVATION_SHARE,
                        "efficiency_gap_max": EFFICIENCY_TOLERANCE}}


def _plot(result: dict) -> bytes:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    configs = result["configs"]
    labels, measured, planned = [], [], []
    for c in configs:
        for r in c["stages"]:
            labels.append(f"pp{c['pp']} M{c['microbatches']} s{r['stage']}")
            measured.append(r["measured_gb"] * 1024)
            planned.append(r["planned_gb"] * 1024)
    x = range(len(labels))
    axes[0].bar([i - 0.2 for i in x], measured, 0.4, label="measured")
    axes[0].bar([i + 0.2 for i in x], planned, 0.4, label="planned")
    axes[0].set_xticks(list(x), labels, rotation=90, fontsize=6)
    axes[0].set_ylabel("peak memory per stage (MB)")
    axes[0].legend()
    for pp in sorted({c["pp"] for c in configs if c["pp"] > 1}):
        rows = [c for c in configs if c["pp"] == pp and "bubble_measured" in c]
        ms = [c["microbatches"] for c in rows]
        line = axes[1].plot(ms, [c["bubble_measured"] for c in rows], "o-", label=f"pp={pp} measured")[0]
        axes[1].plot(ms, [c["bubble_ideal"] for c in rows], "--", color=line.get_color(),
                     label=f"pp={pp} ideal")
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("micro-batches M")
    axes[1].set_ylabel("bubble (idle share)")
    axes[1].legend(fontsize=7)
    cubes = result["largest_cube"]
    axes[2].bar([f"pp={k}" for k in cubes], list(cubes.values()))
    axes[2].set_ylabel(f"largest cube side within {result['config']['memory_gb']:g} GB/stage")
    fig.suptitle(f"bench pipeline: {result['config']['model']} {result['config']['patch_size']} "
                 f"batch {result['config']['batch_size']} on {result['config']['device']}")
    fig.tight_layout()
    return figure_png(fig, 110)


def run(cfg, log=print) -> dict:
    """Run the pipeline benchmark (see the module docstring); returns what it writes as JSON.

    Raises:
        ConfigError: for bad ``bench.*`` values or a patch size that is not set.
    """
    cfg = checked(cfg)
    b = cfg.bench
    patch = _checked_patch(cfg)
    dataset = load_dataset(dataset_root(cfg.data, log))
    in_ch = len(resolve_channels(dataset, cfg.data))
    targets = resolve_targets(dataset, cfg.data)
    batch = math.lcm(*b.microbatches)
    cfg = derive(cfg, {"data.batch_size": batch}, check=False)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_path = run_dir / "bench_pipeline_spec.json"
    atomic_write_text(spec_path, json.dumps({
        "config": to_container(cfg), "in_channels": in_ch, "patch": list(patch), "batch": batch,
        "labels": {str(k): v for k, v in dataset.labels.items()}, "microbatches": list(b.microbatches)}))
    log(f"bench pipeline: {cfg.model.name}, input {[in_ch, *patch]} x batch {batch}, "
        f"{enum_value(cfg.trainer.precision)}, pp {list(b.pp)} x micro-batches {list(b.microbatches)}, "
        f"{b.warmup} warm-up + {b.steps} timed steps each")
    start, rows = time.perf_counter(), []
    for pp in b.pp:
        out_path = run_dir / f"bench_pipeline_pp{pp}.json"
        rows += launch_workers("lampseg.bench.pipeline", pp, spec_path, out_path, b.timeout_s)
        log(f"  pp={pp}: " + ", ".join(f"M={r['microbatches']} stage {r['stage']} {r['step_s'] * 1e3:.0f} ms "
                                       f"{r['measured_gb'] * 1024:.1f}/{r['planned_gb'] * 1024:.1f} MB"
                                       for r in rows if r["pp"] == pp))
    cubes = _largest_cubes(cfg, in_ch, targets, patch, batch)
    device = str(resolve_device(cfg.trainer.device))
    result = {"benchmark": "pipeline", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              **_summarise(rows, cfg, cubes, device),
              "config": {"model": cfg.model.name, "channels": list(cfg.model.channels),
                         "patch_size": list(patch), "in_channels": in_ch,
                         "out_channels": targets.out_channels, "batch_size": batch,
                         "precision": enum_value(cfg.trainer.precision),
                         "optimizer": enum_value(cfg.optim.name), "schedule": cfg.parallel.schedule,
                         "checkpoint": enum_value(cfg.parallel.checkpoint), "device": device,
                         "memory_gb": b.memory_gb,
                         "steps": b.steps, "warmup": b.warmup, "cpu_count": os.cpu_count(),
                         "threads_per_process": int(os.environ.get("OMP_NUM_THREADS", "1")),
                         "torch": torch.__version__},
              "wall_s": round(time.perf_counter() - start, 1)}
    json_path, png_path = run_dir / "bench_pipeline.json", run_dir / "bench_pipeline.png"
    write_json(json_path, result)
    atomic_write_bytes(png_path, _plot(result))
    _log_summary(result, b.memory_gb, log)
    log(f"wrote {json_path} and {png_path}")
    return result


def _checked_patch(cfg) -> list[int]:
    """``data.patch_size``, once ``bench.*`` and it are usable for this benchmark (else ConfigError)."""
    b = cfg.bench
    if b.steps < 1 or b.warmup < 0:
        raise ConfigError(f"config keys 'bench.steps'/'bench.warmup': expected >= 1 / >= 0, got {b.steps}/"
                          f"{b.warmup}")
    if not b.pp or min(b.pp) < 1 or not b.microbatches or min(b.microbatches) < 1:
        raise ConfigError(f"config keys 'bench.pp'/'bench.microbatches': expected lists of integers >= 1, "
                          f"got {list(b.pp)}/{list(b.microbatches)}")
    patch = patch_size_of(cfg)
    if patch is None:
        raise ConfigError("config key 'data.patch_size': bench pipeline needs a fixed patch size, not whole")
    return patch


def _largest_cubes(cfg, in_ch: int, targets, patch: list[int], batch: int) -> dict[int, int]:
    """Per pp of ``bench.pp``: the planner's largest cubic input within ``bench.memory_gb`` per stage."""
    b = cfg.bench
    opt_states = OPTIMIZER_STATES.get(enum_value(cfg.optim.name), 2)
    costs = plan_for(cfg, in_ch, targets.out_channels, [in_ch, *patch], targets=targets)[1]
    return {pp: largest_cube(costs, pp, batch, b.memory_gb, [in_ch, *patch], cfg.parallel.schedule,
                             opt_states, size_divisor(cfg.model)) for pp in b.pp}


def _log_summary(result: dict, memory_gb: float, log) -> None:
    """Per (pp, M): step time, the plan's memory error, the bubble; then the largest cube per pp."""
    for c in result["configs"]:
        extra = ""
        if "bubble_measured" in c and c["pp"] > 1:
            extra = (f" bubble {c['bubble_measured']:.2f} (ideal {c['bubble_ideal']:.2f}), activations "
                     f"{c['activation_share_max']:.2f} x unsplit/pp")
        log(f"pp={c['pp']} M={c['microbatches']}: step {c['step_s'] * 1e3:.0f} ms, memory plan error "
            f"{c['memory_error_max']:.1%}{extra}")
    log(f"largest cube within {memory_gb:g} GB/stage: "
        + ", ".join(f"pp={k}: {v}^3" for k, v in result["largest_cube"].items()))


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
