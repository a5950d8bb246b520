"""``python -m lampseg bench overhead``: lampseg's training step vs a plain hand-written MONAI loop.

Both loops train the same network (one model deep-copied, so identical initial weights), on the same
patches (one ``PatchDataset``, same seed and epoch), with the same batch size, precision, memory format,
optimizer and loss:

* **lampseg**: ``lampseg.engine.steps.train_epoch`` -- the function ``Trainer.train`` calls every epoch,
  with a ``torch.utils.data.DataLoader`` built exactly as ``Trainer.loader`` builds it -- so the time
  includes lampseg's data loading, target mapping, autocast, clipping and per-step bookkeeping. Its own
  seconds and data-wait seconds are used.
* **plain**: ``monai.data.DataLoader`` over the same dataset and the loop of the MONAI tutorials:
  ``to(device)``, autocast, ``DiceCELoss``, ``backward``, ``clip_grad_norm_``, ``step``, ``loss.item()``
  (through a ``GradScaler``, enabled only for fp16 on CUDA, as lampseg does).

Both loaders have ``data.num_workers`` workers (``auto``: ``runtime.device.loader_workers``) kept alive from
round to round, as ``Trainer`` keeps them from epoch to epoch, so the comparison is of the loops.

The machine may be noisy, so the two run side by side: ``bench.repeats`` rounds of A B, each phase
``bench.warmup`` untimed steps then ``bench.steps`` timed steps. Reported: median step time of each loop,
``overhead = median(lampseg) / median(plain) - 1``, and the median fraction of lampseg's step time spent
waiting for the DataLoader. Targets: overhead <= 3 %, data wait <= 2 %. Noise-robust companions are
reported beside it (not judged): the median of the per-round ratios (``overhead_paired_median``), the
ratio of the fastest rounds (``overhead_min``; noise only ever adds time) and the overhead of the step
time without the data wait (``overhead_compute``: the loops' own code, forward to optimiser step).
``bench.profile=true`` adds one phase of each loop under ``torch.profiler``: operator and non-operator
milliseconds per step, and the operators only one loop runs (``profile`` in the JSON).
"""
from __future__ import annotations

import copy
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import monai
import torch
from hydra.core.hydra_config import HydraConfig
from monai.data import DataLoader as MonaiDataLoader
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader

from lampseg.config import ConfigError, checked, derive, enum_value
from lampseg.data.prepare import DataBundle, training_dataset
from lampseg.data.sampling import EpochSampler, PatchDataset, training_loader
from lampseg.engine.optim import build_optimizer
from lampseg.engine.setup import load_data, make_grad_scaler
from lampseg.engine.steps import EpochResult, Progress, local_step, train_epoch
from lampseg.io import atomic_write_bytes, write_json
from lampseg.model.losses import build_loss
from lampseg.model.unet import build_model, count_parameters
from lampseg.plots import figure_png, pyplot
from lampseg.runtime.device import autocast, loader_workers, resolve_device, seed_everything

MAX_OVERHEAD = 0.03  # issue 19's targets, medians
MAX_DATA_WAIT = 0.02
WARMUP_EPOCH_OFFSET = 1000  # warm-up phases draw other patches than the timed phases (epochs 1..repeats)
PROFILE_EPOCH = 2000  # the profiled phases' patches (the same for both loops)


def _dataset(cfg: DictConfig, bundle: DataBundle, steps: int) -> PatchDataset:
    """The training ``PatchDataset`` of ``run()``, ``steps`` batches long."""
    short = derive(cfg, {"data.samples_per_epoch": steps * cfg.data.batch_size}, check=False)
    return training_dataset(short, bundle)


def _lampseg_phase(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module,
                   scaler: torch.amp.GradScaler, loader: DataLoader, epoch: int, bundle: DataBundle,
                   cfg: DictConfig, device: torch.device) -> EpochResult:
    """One "epoch" of lampseg's real training function (loss, steps, seconds, wait seconds, skipped)."""
    loader.sampler.set_epoch(epoch)
    step = local_step(model, optimizer, loss_fn, cfg, device, scaler)
    result = train_epoch(model, step, loader, bundle, cfg, device, Progress("none", 0, 0))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result


def _plain_phase(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module,
                 scaler: torch.amp.GradScaler, loader: MonaiDataLoader, epoch: int, bundle: DataBundle,
                 cfg: DictConfig, device: torch.device) -> tuple[float, int, float, float]:
    """One epoch of a plain MONAI training loop; returns (mean loss, steps, seconds, wait seconds).

    Labels go to the loss as they are when the dataset's label values are 0..K-1 (per-label softmax);
    otherwise (regions, gaps in the values) they are mapped with ``bundle.targets.loss_target``, as any
    loop would have to.
    """
    targets = bundle.targets
    raw_labels = not targets.region_based and targets.label_values == tuple(range(len(targets.label_values)))
    channels_last = bool(cfg.trainer.channels_last)
    clip = cfg.optim.grad_clip
    precision = enum_value(cfg.trainer.precision)
    loader.sampler.set_epoch(epoch)
    model.train()
    epoch_loss, steps, wait = 0.0, 0, 0.0
    start = tick = time.perf_counter()
    for batch in loader:
        wait += time.perf_counter() - tick
        image, label = batch["image"].to(device), batch["label"].to(device)
        if channels_last:
            image = image.contiguous(memory_format=torch.channels_last_3d)
        target = label.long() if raw_labels else targets.loss_target(label)
        with autocast(device, precision):
            logits = model(image)
        loss = loss_fn(logits.float(), target)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        if clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(optimizer)
        scaler.update()
        epoch_loss += loss.item()
        steps += 1
        tick = time.perf_counter()
    seconds = time.perf_counter() - start  # taken where train_epoch takes it: loss.item() synced each step
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return epoch_loss / max(steps, 1), steps, seconds, wait


def _profile(phases: dict, loaders: dict, bundle: DataBundle, cfg: DictConfig, device: torch.device,
             top: int = 12) -> dict:
    """``bench.profile``: one more phase of each loop under ``torch.profiler`` (same patches for both).
    Per loop: wall and operator (self CPU) milliseconds per step, the rest being Python and waiting; and
    the operators whose time per step differs most between the loops."""
    per_op, totals = {}, {}
    for name, (phase, model, opt, loss_fn, scaler) in phases.items():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            out = phase(model, opt, loss_fn, scaler, loaders[name], PROFILE_EPOCH, bundle, cfg, device)
            wall = time.perf_counter() - start
        steps = out[1]
        # self time of the main thread's operators: loader workers run in other processes
        events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        per_op[name] = {e.key: e.self_cpu_time_total / 1e3 / steps for e in events}
        ops = sum(per_op[name].values())
        totals[name] = {"wall_ms": wall * 1e3 / steps, "operators_ms": ops,
                        "outside_operators_ms": wall * 1e3 / steps - ops, "wait_ms": out[3] * 1e3 / steps}
    keys = set(per_op["lampseg"]) | set(per_op["plain"])
    diff = sorted(((k, per_op["lampseg"].get(k, 0.0), per_op["plain"].get(k, 0.0)) for k in keys),
                  key=lambda row: -abs(row[1] - row[2]))[:top]
    pairs = (("lampseg", "plain"), ("plain", "lampseg"))
    only = {name: {k: round(v, 3) for k, v in per_op[name].items() if k not in per_op[other]}
            for name, other in pairs}
    return {"per_step": totals, "only_in": only, "largest_differences_ms": [
        {"op": k, "lampseg": a, "plain": b, "difference": a - b} for k, a, b in diff]}


def _loop_stats(rows: list[tuple[float, int, float, float]], batch_size: int) -> dict:
    """Per-repeat and median step time, data-wait fraction and loss of one loop."""
    step_s = [r[2] / r[1] for r in rows]  # rows: (loss, steps, seconds, wait[, skipped])
    wait = [r[3] / r[2] for r in rows]
    median = statistics.median(step_s)
    compute = [(r[2] - r[3]) / r[1] for r in rows]
    return {"step_s_median": median, "step_s": step_s, "compute_s_median": statistics.median(compute),
            "step_s_min": min(step_s), "step_s_max": max(step_s),
            "data_wait_frac_median": statistics.median(wait), "data_wait_frac": wait,
            "samples_per_s": batch_size / median, "loss": [r[0] for r in rows]}


def _overrides() -> list[str]:
    """The command line's Hydra overrides, when running under Hydra."""
    try:
        return [o for o in HydraConfig.get().overrides.task if not o.startswith("bench.name=")]
    except (ImportError, ValueError):
        return []


def _plot(result: dict) -> bytes:
    """PNG bytes: median step time per loop with the data wait stacked under compute, and every repeat."""
    plt = pyplot()
    names = ["lampseg", "plain"]
    labels = ["lampseg train_epoch", "plain MONAI loop"]
    total = [result[n]["step_s_median"] * 1e3 for n in names]
    wait = [t * result[n]["data_wait_frac_median"] for t, n in zip(total, names)]
    top = max(total) * 1.5
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(labels, wait, color="tab:orange", label="waiting for data (median)")
    ax.bar(labels, [t - w for t, w in zip(total, wait)], bottom=wait, color="tab:blue", alpha=0.8,
           label="compute: fwd/bwd/step (median)")
    for i, name in enumerate(names):
        ax.text(i, total[i] / 2, f"{total[i]:.1f} ms", ha="center", va="center", color="white")
        repeats = [t * 1e3 for t in result[name]["step_s"]]
        offsets = [0.25 + 0.1 * k / max(len(repeats) - 1, 1) for k in range(len(repeats))]
        inside = [(i + o, t) for o, t in zip(offsets, repeats) if t <= top]
        outside = [i + o for o, t in zip(offsets, repeats) if t > top]
        if inside:
            ax.scatter(*zip(*inside), color="black", s=12, zorder=3, label="each repeat" if i == 0 else None)
        if outside:
            ax.scatter(outside, [top * 0.98] * len(outside), marker="^", color="red", s=20, zorder=3,
                       label=f"repeat > {top:.0f} ms" if i == 0 else None)
    cfg = result["config"]
    ax.set(ylabel="step time (ms)", ylim=(0, top),
           title=f"overhead {result['overhead']:+.1%}, lampseg data wait {result['data_wait_frac']:.1%}")
    ax.legend(loc="upper right", fontsize=7)
    fig.text(0.01, 0.01, f"{cfg['model']} patch {cfg['patch_size']} batch {cfg['batch_size']} "
             f"{cfg['precision']} {cfg['device']} num_workers={cfg['num_workers']} "
             f"{cfg['repeats']} x {cfg['steps']} steps", fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return figure_png(fig, 90)


def run(cfg: DictConfig, log: Callable[[str], None] = print) -> dict:
    """Measure lampseg's training loop against a plain MONAI loop, interleaved, and write the results.

    Args:
        cfg: the composed config; ``bench.steps``, ``bench.warmup`` and ``bench.repeats`` set the
            schedule, ``data``/``model``/``optim``/``trainer`` the training setup (as ``train`` uses them).
        log: where progress lines go.

    Returns:
        The result, also written to ``run_dir/bench_overhead.json`` (chart: ``bench_overhead.png``).

    Raises:
        ConfigError: a bench count is out of range, or the config is invalid.
    """
    cfg = checked(cfg)
    b = cfg.bench
    for key, value, lo in [("bench.steps", b.steps, 1), ("bench.warmup", b.warmup, 0),
                           ("bench.repeats", b.repeats, 1)]:
        if value < lo:
            raise ConfigError(f"config key '{key}': expected an integer >= {lo}, got {value!r}")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    device = resolve_device(cfg.trainer.device)
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    bundle = load_data(cfg, run_dir, log)
    phases = _arms(cfg, bundle, device)
    workers = loader_workers(cfg.data.num_workers)
    timed = _loaders(cfg, bundle, b.steps, workers, device)
    warm = _loaders(cfg, bundle, b.warmup, workers, device) if b.warmup else None
    params = count_parameters(phases["lampseg"][1])
    log(f"bench overhead: {cfg.model.name} ({params:,} parameters), patch {bundle.patch_size}, batch "
        f"{cfg.data.batch_size}, {enum_value(cfg.trainer.precision)}, device {device}, "
        f"{torch.get_num_threads()} threads, num_workers={workers}; {b.repeats} x (lampseg, "
        f"plain) x ({b.warmup} warm-up + {b.steps} timed steps)")
    start = time.perf_counter()
    rows = _interleaved(phases, timed, warm, bundle, cfg, device, log)
    profiled = _profile(phases, timed, bundle, cfg, device) if b.profile else None
    lamp, plain = (_loop_stats(rows[name], cfg.data.batch_size) for name in ("lampseg", "plain"))
    result = {
        "benchmark": "overhead",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "overrides": _overrides(),
        **_compare(lamp, plain),
        "lampseg": lamp,
        "plain": plain,
        "config": _run_config(cfg, device, params, bundle.patch_size, workers),
        "wall_s": round(time.perf_counter() - start, 2),
        "profile": profiled,
    }
    json_path, png_path = run_dir / "bench_overhead.json", run_dir / "bench_overhead.png"
    write_json(json_path, result)
    atomic_write_bytes(png_path, _plot(result))
    _log_result(result, log)
    log(f"wrote {json_path} and {png_path}")
    return result


def _arms(cfg: DictConfig, bundle: DataBundle, device: torch.device) -> dict[str, tuple]:
    """Each loop's (phase function, model, optimizer, loss, gradient scaler): one model deep-copied, so both
    start from the same weights."""
    model_a = build_model(cfg.model, len(bundle.channels), bundle.targets.out_channels).to(device)
    if cfg.trainer.channels_last:
        model_a = model_a.to(memory_format=torch.channels_last_3d)
    model_b = copy.deepcopy(model_a)
    opt_a, opt_b = build_optimizer(model_a, cfg.optim), build_optimizer(model_b, cfg.optim)
    # Both loops use the same MONAI loss object type (build_loss returns DiceCELoss/DiceFocalLoss as is).
    loss_a, loss_b = build_loss(cfg.optim, bundle.targets), build_loss(cfg.optim, bundle.targets)
    fp16 = enum_value(cfg.trainer.precision) == "fp16" and device.type == "cuda"
    scaler_a = make_grad_scaler(cfg, device)  # one for the whole run, as setup() makes it
    scaler_b = torch.amp.GradScaler(device.type, enabled=fp16)  # disabled: every call is a pass-through
    return {"lampseg": (_lampseg_phase, model_a, opt_a, loss_a, scaler_a),
            "plain": (_plain_phase, model_b, opt_b, loss_b, scaler_b)}


def _loaders(cfg: DictConfig, bundle: DataBundle, steps: int, workers: int,
             device: torch.device) -> dict[str, DataLoader]:
    """Each loop's loader of ``steps`` batches, workers kept from round to round as ``run`` keeps
    them from epoch to epoch (the plain loop: MONAI's DataLoader, its collate and worker seeding)."""
    bs, pin = cfg.data.batch_size, device.type == "cuda"
    dataset = _dataset(cfg, bundle, steps)
    return {"lampseg": training_loader(dataset, EpochSampler(len(dataset)), bs, workers, pin),
            "plain": MonaiDataLoader(dataset, batch_size=bs, sampler=EpochSampler(len(dataset)),
                                     drop_last=True, num_workers=workers, pin_memory=pin,
                                     persistent_workers=workers > 0)}


def _interleaved(phases: dict, timed: dict, warm: dict | None, bundle: DataBundle, cfg: DictConfig,
                 device: torch.device, log: Callable[[str], None]) -> dict[str, list]:
    """``bench.repeats`` rounds of (lampseg, plain), each phase after its untimed warm-up phase; per loop
    the timed phases' (loss, steps, seconds, wait[, skipped]), each round logged."""
    rows: dict[str, list] = {"lampseg": [], "plain": []}
    repeats = cfg.bench.repeats
    for r in range(repeats):
        for name, (phase, model, opt, loss_fn, scaler) in phases.items():
            if warm is not None:
                phase(model, opt, loss_fn, scaler, warm[name], WARMUP_EPOCH_OFFSET + r, bundle, cfg, device)
            rows[name].append(phase(model, opt, loss_fn, scaler, timed[name], r + 1, bundle, cfg, device))
        a, p = rows["lampseg"][-1], rows["plain"][-1]
        log(f"  repeat {r + 1}/{repeats}: lampseg {a[2] / a[1] * 1e3:.1f} ms/step (data wait "
            f"{a[3] / a[2]:.1%}), plain {p[2] / p[1] * 1e3:.1f} ms/step (data wait {p[3] / p[2]:.1%})")
    return rows


def _compare(lamp: dict, plain: dict) -> dict:
    """lampseg's overhead over the plain loop (medians, and the noise-robust companions), its data wait,
    the targets and the verdicts."""
    overhead = lamp["step_s_median"] / plain["step_s_median"] - 1
    paired = statistics.median(x / y for x, y in zip(lamp["step_s"], plain["step_s"])) - 1
    wait = lamp["data_wait_frac_median"]
    return {
        "overhead": overhead,
        "overhead_paired_median": paired,
        "overhead_min": lamp["step_s_min"] / plain["step_s_min"] - 1,
        "overhead_compute": lamp["compute_s_median"] / plain["compute_s_median"] - 1,
        "ratio": lamp["step_s_median"] / plain["step_s_median"],
        "data_wait_frac": wait,
        "targets": {"overhead_max": MAX_OVERHEAD, "data_wait_frac_max": MAX_DATA_WAIT},
        "pass": {"overhead": overhead <= MAX_OVERHEAD, "data_wait": wait <= MAX_DATA_WAIT},
    }


def _run_config(cfg: DictConfig, device: torch.device, params: int, patch_size, workers: int) -> dict:
    """The setup the result was measured with (the ``config`` of the JSON)."""
    b = cfg.bench
    return {"device": str(device), "precision": enum_value(cfg.trainer.precision),
            "model": cfg.model.name, "params": params,
            "patch_size": list(patch_size), "batch_size": cfg.data.batch_size,
            "channels_last": bool(cfg.trainer.channels_last), "num_workers": workers,
            "num_workers_setting": cfg.data.num_workers,
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "steps": b.steps, "warmup": b.warmup, "repeats": b.repeats,
            "torch": torch.__version__, "monai": monai.__version__,
            "python": platform.python_version(),
            "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def _log_result(result: dict, log: Callable[[str], None]) -> None:
    """The medians, the overhead against its target and, with ``bench.profile``, where the time goes."""
    lamp, plain, verdict = result["lampseg"], result["plain"], {True: "pass", False: "FAIL"}
    log(f"lampseg {lamp['step_s_median'] * 1e3:.1f} ms/step ({lamp['samples_per_s']:.2f} samples/s), plain "
        f"{plain['step_s_median'] * 1e3:.1f} ms/step ({plain['samples_per_s']:.2f} samples/s)")
    log(f"overhead {result['overhead']:+.1%} (target <= {MAX_OVERHEAD:.0%}: "
        f"{verdict[result['pass']['overhead']]}; paired median {result['overhead_paired_median']:+.1%}, "
        f"fastest rounds {result['overhead_min']:+.1%}, without data wait "
        f"{result['overhead_compute']:+.1%}); data wait {result['data_wait_frac']:.1%} (target <= "
        f"{MAX_DATA_WAIT:.0%}: {verdict[result['pass']['data_wait']]})")
    profiled = result["profile"]
    if profiled:
        for name, t in profiled["per_step"].items():
            log(f"profile {name}: {t['wall_ms']:.1f} ms/step = operators {t['operators_ms']:.1f} + outside "
                f"operators {t['outside_operators_ms']:.1f} (of which data wait {t['wait_ms']:.1f})")
        for name, ops in profiled["only_in"].items():  # what one loop does and the other does not
            ranked = sorted(ops.items(), key=lambda kv: -kv[1])
            log(f"  operators only in {name}: " + (", ".join(f"{k} {v:.2f} ms/step" for k, v in ranked)
                                                   or "none"))
        for row in profiled["largest_differences_ms"][:6]:  # same operators: mostly the machine's noise
            log(f"  {row['op']:<40} lampseg {row['lampseg']:7.2f}  plain {row['plain']:7.2f}  ms/step")
