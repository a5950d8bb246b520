"""``python -m lampseg bench data_parallel``: training throughput of DDP over 1..N processes.

    python -m lampseg bench data_parallel bench.processes=[1,2] bench.steps=20 bench.repeats=3

For every process count in ``bench.processes`` (default 1 and 2) one ``torchrun --nproc_per_node N`` job
(127.0.0.1, ``OMP_NUM_THREADS`` threads per process, default 1) trains the configured U-Net through the same
step as ``lampseg train`` (``engine.steps.local_step``; ``parallelize``'s DDP when N > 1) on random
batches of ``data.batch_size`` per process (weak scaling: the global batch is N x batch). Every step starts
and ends at a barrier, so its time is the slowest rank's. The jobs are interleaved ``bench.repeats`` times
(1, 2, 1, 2, ...) so that the machine's noise hits every count alike; per count the median step time over
the rounds is kept. Reported: step time, samples/s (N x batch / step), speed-up over one process and the
scaling efficiency ``samples/s(N) / (N x samples/s(1))``, plus each job's start-up (torchrun, imports,
process group). One more job per round runs one process with all of the machine's cores as threads
(``bench.all_threads``): what a plain ``lampseg train`` would use, the baseline a user compares with.
Writes ``bench_data_parallel.json`` and ``bench_data_parallel.png`` in ``run_dir``.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from omegaconf import OmegaConf

from lampseg.bench.workers import launch_workers
from lampseg.config import Config, ConfigError, checked, enum_value, patch_size_of, to_container
from lampseg.data.msd import load_dataset
from lampseg.data.prepare import dataset_root, resolve_channels, resolve_targets
from lampseg.io import atomic_write_bytes, atomic_write_text, write_json
from lampseg.plots import figure_png, pyplot
from lampseg.runtime.device import resolve_device


def _worker(spec_path: str, out_path: str) -> None:
    """One rank: warm-up and timed steps of DDP training on random data; rank 0 writes the timings."""
    started = time.time()
    # Imported after the clock starts: a job's start-up (startup_s) includes what a worker must import.
    import torch.distributed as dist

    from lampseg.engine.optim import build_optimizer
    from lampseg.engine.setup import make_grad_scaler
    from lampseg.engine.steps import local_step
    from lampseg.model.losses import Targets, build_loss
    from lampseg.model.unet import build_model
    from lampseg.parallel.dims import ParallelDims
    from lampseg.parallel.parallelize import parallelize
    from lampseg.runtime import distributed
    from lampseg.runtime.device import resolve_device

    spec = json.loads(Path(spec_path).read_text())
    cfg = OmegaConf.merge(OmegaConf.structured(Config), spec["config"])
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    distributed.init_from_env(alone=True)
    world, rank = dist.get_world_size(), dist.get_rank()
    device = distributed.local_device(resolve_device(cfg.trainer.device))
    targets = Targets.from_config({int(k): v for k, v in spec["labels"].items()}, cfg.data.regions)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, spec["in_channels"], targets.out_channels).to(device)
    if cfg.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    dims = ParallelDims(dp=world, pp=1, world=world)  # DDP over the job's processes (none for one)
    net = parallelize(model, dims, None, device)  # DDP: nothing to plan
    optimizer = build_optimizer(model, cfg.optim)
    loss_fn = build_loss(cfg.optim, targets)
    step = local_step(net, optimizer, loss_fn, cfg, device, make_grad_scaler(cfg, device))
    generator = torch.Generator().manual_seed(cfg.seed + rank)  # each replica its own batch
    batch, patch = cfg.data.batch_size, spec["patch"]
    image = torch.randn(batch, spec["in_channels"], *patch, generator=generator).to(device)
    if cfg.trainer.channels_last:
        image = image.contiguous(memory_format=torch.channels_last_3d)
    values = torch.tensor(sorted(int(k) for k in spec["labels"]))
    label = values[torch.randint(len(values), (batch, 1, *patch), generator=generator)].to(device)
    target = targets.loss_target(label)
    dist.barrier()
    ready = time.time()
    times = []
    for k in range(cfg.bench.warmup + cfg.bench.steps):
        dist.barrier()
        start = time.perf_counter()
        step(image, target)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()
        if k >= cfg.bench.warmup:
            times.append(time.perf_counter() - start)
    if rank == 0:
        atomic_write_text(out_path, json.dumps([{"processes": world, "threads": torch.get_num_threads(),
                                                 "step_s": statistics.median(times),
                                                 "steps": times, "startup_s": ready - started}]))
    del net, optimizer, step, model
    distributed.shutdown()


def _summarise(rows: list[dict], batch: int) -> list[dict]:
    """Per (processes, threads): medians over the rounds; speed-up and efficiency against one process with
    the per-process thread count of the others (``rows[0]``'s)."""
    threads = rows[0]["threads"]
    keys = sorted({(r["processes"], r["threads"]) for r in rows}, key=lambda k: (k[1] != threads, k))
    out = []
    for n, t in keys:
        mine = [r for r in rows if (r["processes"], r["threads"]) == (n, t)]
        step = statistics.median(r["step_s"] for r in mine)
        out.append({"processes": n, "threads": t, "step_s": step, "samples_per_s": n * batch / step,
                    "step_s_rounds": [r["step_s"] for r in mine],
                    "startup_s": statistics.median(r["startup_s"] for r in mine),
                    "launch_s": statistics.median(r["launch_s"] for r in mine)})
    base = out[0] if out[0]["processes"] == 1 else None
    for entry in out:
        if base is not None and entry["threads"] == threads:
            entry["speedup"] = entry["samples_per_s"] / base["samples_per_s"]
            entry["efficiency"] = entry["speedup"] / entry["processes"]
    return out


def _plot(result: dict) -> bytes:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    rows = [r for r in result["processes"] if "speedup" in r]
    n = [r["processes"] for r in rows]
    axes[0].plot(n, [r["samples_per_s"] for r in rows], "o-", label="measured")
    if rows and "speedup" in rows[0]:
        axes[0].plot(n, [rows[0]["samples_per_s"] * k for k in n], "--", label="perfect scaling")
        axes[1].bar(n, [r["efficiency"] for r in rows], width=0.5)
        axes[1].set_xticks(n)
        axes[1].axhline(1.0, color="grey", linestyle="--")
    for r in result["processes"]:
        if "speedup" not in r:
            axes[0].axhline(r["samples_per_s"], color="red", linestyle=":",
                            label=f"1 process x {r['threads']} threads")
    axes[0].set_xlabel("processes (replicas)")
    axes[0].set_ylabel("training samples/s")
    axes[0].set_xticks(n)
    axes[0].legend()
    axes[1].set_xlabel("processes (replicas)")
    axes[1].set_ylabel("scaling efficiency")
    c = result["config"]
    fig.suptitle(f"bench data_parallel: {c['model']} {c['patch_size']} batch {c['batch_size']}/process, "
                 f"{c['precision']}, {c['threads_per_process']} thread(s)/process on {c['device']}")
    fig.tight_layout()
    return figure_png(fig, 110)


def run(cfg, log=print) -> dict:
    """Run the data-parallel benchmark (see the module docstring); returns what it writes as JSON.

    Raises:
        ConfigError: for bad ``bench.*`` values or a whole-volume patch size.
    """
    cfg = checked(cfg)
    b = cfg.bench
    patch = _checked_patch(cfg)
    dataset = load_dataset(dataset_root(cfg.data, log))
    in_ch = len(resolve_channels(dataset, cfg.data))
    resolve_targets(dataset, cfg.data)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_path = run_dir / "bench_data_parallel_spec.json"
    atomic_write_text(spec_path, json.dumps({"config": to_container(cfg), "in_channels": in_ch,
                                             "patch": list(patch),
                                             "labels": {str(k): v for k, v in dataset.labels.items()}}))
    counts = sorted(set(int(n) for n in b.processes))
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    jobs = [(n, threads) for n in counts]
    if b.all_threads and (os.cpu_count() or 1) != threads:
        jobs.append((1, os.cpu_count() or 1))
    log(f"bench data_parallel: {cfg.model.name}, input {[in_ch, *patch]} x batch {cfg.data.batch_size} per "
        f"process, {enum_value(cfg.trainer.precision)}, processes {counts}, {b.repeats} interleaved round(s) "
        f"of {b.warmup} warm-up + {b.steps} timed steps")
    start = time.perf_counter()
    rows = _rounds(jobs, b, spec_path, run_dir, log)
    device = str(resolve_device(cfg.trainer.device))
    result = {"benchmark": "data_parallel", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "processes": _summarise(rows, cfg.data.batch_size), "rounds": rows,
              "config": {"model": cfg.model.name, "channels": list(cfg.model.channels),
                         "patch_size": list(patch), "in_channels": in_ch, "batch_size": cfg.data.batch_size,
                         "precision": enum_value(cfg.trainer.precision),
                         "optimizer": enum_value(cfg.optim.name), "channels_last": cfg.trainer.channels_last,
                         "device": device, "backend": "nccl" if device.startswith("cuda") else "gloo",
                         "steps": b.steps, "warmup": b.warmup,
                         "repeats": b.repeats, "cpu_count": os.cpu_count(),
                         "threads_per_process": int(os.environ.get("OMP_NUM_THREADS", "1")),
                         "torch": torch.__version__},
              "wall_s": round(time.perf_counter() - start, 1)}
    json_path, png_path = run_dir / "bench_data_parallel.json", run_dir / "bench_data_parallel.png"
    write_json(json_path, result)
    atomic_write_bytes(png_path, _plot(result))
    for r in result["processes"]:
        extra = f", speed-up {r['speedup']:.2f}x, efficiency {r['efficiency']:.2f}" if "speedup" in r else ""
        log(f"{r['processes']} process(es) x {r['threads']} thread(s): step {r['step_s'] * 1e3:.0f} ms, "
            f"{r['samples_per_s']:.2f} samples/s{extra}; start-up {r['startup_s']:.1f} s")
    log(f"wrote {json_path} and {png_path}")
    return result


def _checked_patch(cfg) -> list[int]:
    """``data.patch_size``, once ``bench.*`` and it are usable for this benchmark (else ConfigError)."""
    b = cfg.bench
    if b.steps < 1 or b.warmup < 0 or b.repeats < 1:
        raise ConfigError(f"config keys 'bench.steps'/'bench.warmup'/'bench.repeats': expected >= 1 / >= 0 / "
                          f">= 1, got {b.steps}/{b.warmup}/{b.repeats}")
    if not b.processes or min(b.processes) < 1:
        raise ConfigError(f"config key 'bench.processes': expected a list of integers >= 1, "
                          f"got {list(b.processes)}")
    patch = patch_size_of(cfg)
    if patch is None:
        raise ConfigError("config key 'data.patch_size': bench data_parallel needs a fixed patch size")
    return patch


def _rounds(jobs: list[tuple[int, int]], b, spec_path: Path, run_dir: Path, log) -> list[dict]:
    """``b.repeats`` rounds of one torchrun job per (processes, threads) in ``jobs``, interleaved; a row per
    job and round (its rank 0's timings, the launch time, the round), each logged."""
    rows = []
    for round_ in range(b.repeats):
        for n, t in jobs:
            launched = time.perf_counter()
            row = launch_workers("lampseg.bench.data_parallel", n, spec_path,
                                 run_dir / f"bench_data_parallel_n{n}t{t}.json", b.timeout_s, threads=t)[0]
            rows.append({**row, "launch_s": time.perf_counter() - launched, "round": round_})
            log(f"  round {round_ + 1}: {n} process(es) x {t} thread(s): step {row['step_s'] * 1e3:.0f} ms")
    return rows


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
