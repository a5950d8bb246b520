"""``python -m lampseg bench experiment_parallel``: N short trials run three ways (as Berral et al. compared).

    python -m lampseg bench experiment_parallel +exp=smoke trainer.max_epochs=3 bench.trials=4 bench.repeats=1

The N trials are ``lampseg train`` runs of the configured model and data that differ in ``optim.lr``
(``optim.lr / 2**k``, k < ``bench.trials``). Each round times, with every command a real CLI process:

- **(a) sequential, all cores**: ``lampseg train`` N times, one after another, with every core as a thread;
- **(b) data-parallel, sequential**: ``python -m lampseg.launch --nproc_per_node 2 ... train parallel=ddp`` N
  times (torchrun on loopback; 1 thread per process, ``data.batch_size / 2`` per replica: the same global
  batch and samples as (a));
- **(c) experiment-parallel**: one ``lampseg tune`` study of the N trials, ``bench.workers`` (W) at a time
  with one core each (``tune.resources.cpu=1``), Ray started and stopped by the command;
- **t1**: one trial alone with (c)'s per-trial resources: ``lampseg train`` with 1 thread, pinned with its
  data-loader workers to one core (otherwise the loaders would run on the idle cores for free).

Reported (medians over ``bench.repeats`` rounds): the wall time of each, the speed-ups of (c) over (a) and
(b), the parallel efficiency ``N * t1 / (W * T_c)``, and the framework overheads: Ray's start, and per trial
the part of (c)'s time not spent inside ``run`` (process start, imports, Tune's bookkeeping). Writes
``bench_experiment_parallel.json`` and ``.png`` in ``run_dir``.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from lampseg.config import ConfigError, checked, enum_value
from lampseg.io import atomic_write_bytes, write_json
from lampseg.plots import figure_png, pyplot
from lampseg.runtime.launcher import job_command, run_command

DROP = ("run_dir=", "bench.", "optim.lr=", "trainer.num_threads=", "data.batch_size=", "parallel", "tune")


def _user_overrides(overrides: list[str]) -> list[str]:
    """The command line's overrides that shape each trial (not the bench's own or those it sets)."""
    return [o for o in overrides if not o.lstrip("+~").startswith(DROP)]


def _timed(command: list[str], threads: int, timeout: float, cores: int | None = None) -> float:
    """Run a command with ``threads`` OpenMP threads (and, with ``cores``, pinned with its children, such as
    data-loader workers, to that many CPUs); its wall time. Every process of it ends on a timeout.

    Raises:
        JobError: it failed or outlived ``bench.timeout_s`` (with the end of its output).
    """
    pinned = cores is not None and hasattr(os, "sched_getaffinity")
    name = f"bench experiment_parallel: {' '.join(command[:8])} ..."
    result = run_command(command, timeout_s=timeout, name=name, timeout_key="bench.timeout_s",
                         env={"OMP_NUM_THREADS": str(threads)},
                         cpus=sorted(os.sched_getaffinity(0))[:cores] if pinned else None)
    return result.seconds


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _round(k: int, cfg, base: list[str], lrs: list[float], out: Path, log) -> dict:
    b, cores = cfg.bench, os.cpu_count() or 1
    lampseg = [sys.executable, "-m", "lampseg"]
    row: dict = {"round": k}
    runs = [out / f"a{k}_{i}" for i in range(len(lrs))]
    row["a_s"] = sum(_timed([*lampseg, "train", *base, f"optim.lr={lr}", f"trainer.num_threads={cores}",
                             f"run_dir={rd}"], cores, b.timeout_s)
                     for lr, rd in zip(lrs, runs))
    row["a_dice"] = [_summary(rd)["best_val_dice"] for rd in runs]
    if cfg.data.batch_size % 2 == 0:
        runs = [out / f"b{k}_{i}" for i in range(len(lrs))]
        row["b_s"] = sum(_timed(job_command(["-m", "lampseg", "train", *base, "parallel=ddp",  # loopback only
                                             f"data.batch_size={cfg.data.batch_size // 2}", f"optim.lr={lr}",
                                             "trainer.num_threads=1", f"run_dir={rd}"], 2), 1, b.timeout_s)
                         for lr, rd in zip(lrs, runs))
        row["b_dice"] = [_summary(rd)["best_val_dice"] for rd in runs]
    study = out / f"c{k}"
    grid = ",".join(str(lr) for lr in lrs)
    row["c_s"] = _timed([*lampseg, "tune", *base, f"tune.space=[{{key:optim.lr,grid:[{grid}]}}]",
                         "tune.search=grid", "tune.scheduler=fifo", "tune.num_samples=1",
                         "tune.resources.cpu=1", "tune.resources.gpu=0", f"tune.max_concurrent={b.workers}",
                         f"tune.num_cpus={b.workers}", f"run_dir={study}"], 1, b.timeout_s)
    report = json.loads((study / "tune" / "study.json").read_text())
    trials = [_summary(p.parent) for p in sorted((study / "tune").glob("trial_*/summary.json"))]
    row.update(ray_start_s=report["ray_start_s"], c_trial_run_s=[t["wall_s"] for t in trials],
               c_dice=sorted(t["best_val_dice"] for t in trials))
    single = out / f"t{k}"
    row["t1_s"] = _timed([*lampseg, "train", *base, f"optim.lr={lrs[0]}", "trainer.num_threads=1",
                          f"run_dir={single}"], 1, b.timeout_s, cores=1)
    row["t1_run_s"] = _summary(single)["wall_s"]
    log(f"  round {k + 1}: (a) {row['a_s']:.1f} s, (b) {row.get('b_s', float('nan')):.1f} s, "
        f"(c) {row['c_s']:.1f} s, t1 {row['t1_s']:.1f} s")
    return row


def _plot(result: dict) -> bytes:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    m = result["medians"]
    labels = ["(a) sequential\nall cores", "(b) DDP x2\nsequential",
              f"(c) Tune\n{result['workers']} at a time"]
    values = [m["a_s"], m.get("b_s", float("nan")), m["c_s"]]
    ax.bar(labels, values, color=["#888888", "#4477aa", "#cc6677"])
    ax.axhline(result["trials"] * m["t1_s"] / result["workers"], color="black", linestyle="--",
               label="ideal (c): N x t1 / W")
    ax.set_ylabel("wall time for all trials (s)")
    ax.set_title(f"bench experiment_parallel: {result['trials']} trials, efficiency "
                 f"{result['efficiency']:.2f}, (c) {result['speedup_c_over_a']:.2f}x over (a)")
    ax.legend()
    fig.tight_layout()
    return figure_png(fig, 110)


def run(cfg, overrides: list[str], log=print) -> dict:
    """Run the benchmark (see the module docstring); returns what it writes as JSON.

    Raises:
        ConfigError: for bad ``bench.trials`` / ``bench.workers`` / ``bench.repeats``.
    """
    cfg = checked(cfg)
    b = cfg.bench
    if b.trials < 1 or b.workers < 1 or b.repeats < 1:
        raise ConfigError(f"config keys 'bench.trials'/'bench.workers'/'bench.repeats': expected >= 1, got "
                          f"{b.trials}/{b.workers}/{b.repeats}")
    out = Path(cfg.run_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = _user_overrides(overrides) + ["trainer.progress=none"]
    lrs = [cfg.optim.lr / 2**k for k in range(b.trials)]
    log(f"bench experiment_parallel: {b.trials} trials of {cfg.model.name} ({cfg.trainer.max_epochs} epochs "
        f"of {cfg.data.samples_per_epoch} samples, {enum_value(cfg.trainer.precision)}), {b.workers} at a "
        f"time in (c); {b.repeats} round(s); overrides {base}")
    start = time.perf_counter()
    rows = [_round(k, cfg, base, lrs, out, log) for k in range(b.repeats)]
    keys = ["a_s", "b_s", "c_s", "t1_s", "t1_run_s", "ray_start_s"]
    medians = {k: statistics.median(r[k] for r in rows) for k in keys if all(k in r for r in rows)}
    n, w = b.trials, b.workers
    per_trial_c = w * medians["c_s"] / n  # wall per trial slot in (c)
    mean_run = statistics.median(statistics.mean(r["c_trial_run_s"]) for r in rows)
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result = {"benchmark": "experiment_parallel", "date": date,
              "trials": n, "workers": w, "learning_rates": lrs, "medians": medians, "rounds": rows,
              "efficiency": n * medians["t1_s"] / (w * medians["c_s"]),
              "speedup_c_over_a": medians["a_s"] / medians["c_s"],
              "speedup_c_over_b": medians["b_s"] / medians["c_s"] if "b_s" in medians else None,
              "overhead": {"ray_start_s": medians["ray_start_s"],
                           "per_trial_outside_run_s": per_trial_c - mean_run,
                           "standalone_outside_run_s": medians["t1_s"] - medians["t1_run_s"]},
              "config": {"model": cfg.model.name, "max_epochs": cfg.trainer.max_epochs,
                         "samples_per_epoch": cfg.data.samples_per_epoch, "batch_size": cfg.data.batch_size,
                         "precision": enum_value(cfg.trainer.precision), "cpu_count": os.cpu_count(),
                         "overrides": base},
              "wall_s": round(time.perf_counter() - start, 1)}
    result["pass"] = {"efficiency_ge_0.9": result["efficiency"] >= 0.9,
                      "c_faster_than_a": result["speedup_c_over_a"] > 1,
                      "c_faster_than_b": None if result["speedup_c_over_b"] is None
                      else result["speedup_c_over_b"] > 1}
    json_path, png_path = out / "bench_experiment_parallel.json", out / "bench_experiment_parallel.png"
    write_json(json_path, result)
    atomic_write_bytes(png_path, _plot(result))
    b_text = f"{medians['b_s']:.1f} s" if "b_s" in medians else "skipped (odd data.batch_size)"
    log(f"(a) sequential, {os.cpu_count()} threads: {medians['a_s']:.1f} s; (b) DDP x2 sequential: "
        f"{b_text}; (c) Tune, {w} at a time: {medians['c_s']:.1f} s; t1 (1 trial, 1 thread): "
        f"{medians['t1_s']:.1f} s")
    speed_b = f", {result['speedup_c_over_b']:.2f}x over (b)" if result["speedup_c_over_b"] else ""
    log(f"speed-up of (c): {result['speedup_c_over_a']:.2f}x over (a){speed_b}; efficiency N t1 / (W T_c) "
        f"= {result['efficiency']:.2f}; Ray start {medians['ray_start_s']:.1f} s, per trial outside run() "
        f"{result['overhead']['per_trial_outside_run_s']:.1f} s (standalone process: "
        f"{result['overhead']['standalone_outside_run_s']:.1f} s)")
    log(f"wrote {json_path} and {png_path}")
    return result
