"""``python -m lampseg bench spatial``: one volume split into slabs over processes, against one process.

    python -m lampseg bench spatial data.patch_size=[128,128,128] data.batch_size=1 trainer.precision=fp32 \
        model.channels=[8,16,32] model.strides=[2,2] bench.steps=3 bench.warmup=1 bench.repeats=3

For every round of ``bench.repeats`` and every ``sp`` in ``bench.sp`` (default 1, 2; interleaved: 1 2 1 2 ...)
one ``torchrun --nproc_per_node sp`` job (127.0.0.1, one thread per process, or one GPU each) builds the
configured U-Net through ``parallelize`` as ``train parallel=spatial`` does, feeds each rank its slab of one
random batch of ``data.patch_size`` (a whole volume), and measures:

* the training step (forward, global loss, backward, DDP's gradient average, optimiser step): median of
  ``bench.steps`` timed steps after ``bench.warmup``;
* whole-volume inference as ``evaluate`` runs it (``slab_inference.infer_slab``: each rank reads its rows
  and keeps its rows of the logits), median, and its peak memory per rank against the plan;
* each rank's peak memory of one training step (CUDA's peak allocated; on CPU what the rank holds at entry
  plus the peak the step allocates, from the profiler's allocation events), next to the planner's estimate
  for that layout (``capacity.spatial_plan``);
* the time spent in halo exchanges and in all-reduces of normalisation and loss sums (``spatial.COMM``);
* the first step's loss: the same for every ``sp`` (the split is exact);
* the ceiling on this machine: every rank training and inferring the unsplit model on the **whole** volume,
  all at once, without communication; ``sp`` x the one-process time over that contended time is the most
  that ``sp`` processes could gain from splitting the work (on CPUs whose cores share memory bandwidth and
  caches, or a shared host, it is below ``sp``). Whole volumes, not slabs: PyTorch's kernel choice
  depends on the tensor's size, so an unsplit model on a thin slab would measure another kernel.

Every arm computes alike: the one-process baseline and the contended run put the unsplit model's
convolutions on the kernels the split model's slabs take (``kernels.steer_convolutions``: oneDNN for fp32 on
a CPU whatever the size, where PyTorch's own choice would take its im2col kernel for thin batch-1 layers),
and all three use ``train``'s memory layout (``trainer.channels_last``: model and input in
``channels_last_3d``) and its precision (``trainer.precision``, ``auto`` resolved as ``train`` does). The
JSON records each arm's kernels and layout (``kernels``, ``memory_format``; ``contended_kernels``,
``contended_memory_format``).

Speed-ups are medians over rounds of ``t(sp=1) / t(sp)``; with one core or GPU per process they show what
the split buys in time, on one core they would show only its overhead. Writes ``bench_spatial.json`` and
``bench_spatial.png`` in ``run_dir``.
"""
from __future__ import annotations

import gc
import json
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from lampseg.bench.workers import launch_workers, random_batch, start_worker, timed_steps
from lampseg.config import ConfigError, derive, enum_value, patch_size_of, to_container
from lampseg.data.msd import load_dataset
from lampseg.data.prepare import dataset_root, resolve_channels, resolve_targets
from lampseg.data.sampling import whole_volume_shape
from lampseg.engine.inference import infer
from lampseg.engine.optim import build_optimizer
from lampseg.engine.setup import make_grad_scaler
from lampseg.engine.slab_inference import infer_slab
from lampseg.engine.steps import local_step
from lampseg.io import atomic_write_bytes, atomic_write_text, write_json
from lampseg.model.losses import Targets, build_loss
from lampseg.model.unet import build_model, size_divisor
from lampseg.parallel import slabs, spatial
from lampseg.parallel.dims import ParallelDims
from lampseg.parallel.kernels import kernel_choice, steer_convolutions
from lampseg.parallel.parallelize import inference_module, parallel_loss, parallelize
from lampseg.planner.capacity import spatial_plan_for
from lampseg.planner.inference import InferenceMemory
from lampseg.planner.layout import plan_split
from lampseg.plots import figure_png, pyplot
from lampseg.runtime import distributed
from lampseg.runtime.device import DTYPES, autocast, resolve_device, resolve_precision
from lampseg.runtime.memory import GB, PeakMemory, tensor_bytes


def ceiling_speedup(sp: int, alone_s: float, contended_s: float) -> float:
    """The most ``sp`` processes could gain by splitting the work on this machine: ``sp`` x the time of one
    process alone over the time of each of ``sp`` processes running the same work at once.

    Args:
        sp: processes (slabs per volume).
        alone_s: one process's time for the whole volume, alone on the machine (the ``sp=1`` job).
        contended_s: the same work's time when ``sp`` processes run it at once, without communication.

    Returns:
        ``sp * alone_s / contended_s`` (``sp`` when running at once costs nothing, below it otherwise).
    """
    return sp * alone_s / contended_s


def _arm(cfg, model: nn.Module, unsplit: bool) -> nn.Module:
    """``model`` as every arm of the benchmark computes: in ``train``'s memory layout
    (``trainer.channels_last``, as ``engine.setup`` builds it) and, when it stays ``unsplit``, with its
    convolutions on the kernels of a split model's slabs (``kernels.steer_convolutions``; ``parallelize``
    converts a split model's own). Call it before ``parallelize``."""
    if cfg.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    if unsplit:
        steer_convolutions(model)
    return model


def _layout(cfg, x: torch.Tensor) -> torch.Tensor:
    """An input as ``train`` gives it to the model (``engine.steps.train_epoch``): ``channels_last_3d``
    under ``trainer.channels_last``."""
    return x.contiguous(memory_format=torch.channels_last_3d if cfg.trainer.channels_last
                        else torch.contiguous_format)


def _computes(model: nn.Module, device: torch.device, precision: str, prefix: str = "") -> dict:
    """An arm's record: its convolutions' kernels (``kernels.kernel_choice``) and the memory layout of its
    weights (``channels_last_3d`` or ``contiguous``, read from its largest convolution weight: a 1x1x1 one
    is both)."""
    dtype = DTYPES[resolve_precision(precision, device).name]
    weight = max((m.weight for m in model.modules() if isinstance(m, nn.Conv3d)), key=lambda w: w.numel())
    layout = "channels_last_3d" if weight.is_contiguous(memory_format=torch.channels_last_3d) \
        and not weight.is_contiguous() else "contiguous"
    return {f"{prefix}kernels": kernel_choice(model, device, dtype), f"{prefix}memory_format": layout}


def _contended_times(cfg, in_ch: int, targets: Targets, whole: tuple[torch.Tensor, torch.Tensor],
                     device: torch.device) -> dict:
    """The ceiling of the split on this machine (module docstring): every rank trains and infers the
    unsplit model on the whole volume at the same time as the others, with no communication, on the
    kernels and in the layout of the other arms."""
    model = _arm(cfg, build_model(cfg.model, in_ch, targets.out_channels).to(device), unsplit=True)
    optimizer = build_optimizer(model, cfg.optim)
    step = local_step(model, optimizer, build_loss(cfg.optim, targets), cfg, device,
                      make_grad_scaler(cfg, device))
    step(*whole)
    dist.barrier()  # all ranks at once
    train_s = timed_steps(lambda: step(*whole), cfg.bench.steps, device)
    model.eval()

    def forward() -> None:
        with torch.no_grad(), autocast(device, cfg.trainer.precision):
            model(whole[0])

    forward()
    dist.barrier()
    return {"contended_train_s": statistics.median(train_s),
            "contended_infer_s": statistics.median(timed_steps(forward, cfg.bench.steps, device)),
            **_computes(model, device, cfg.trainer.precision, "contended_")}


def _inference(cfg, model: nn.Module, net: nn.Module, dims: ParallelDims, volume: torch.Tensor, targets,
               device: torch.device) -> tuple[list[float], float, float]:
    """Whole-volume inference of one (1, C, X, Y, Z) ``volume`` as ``evaluate`` runs it: one process infers
    it whole (``engine.inference.infer``); split into slabs, each rank reads its rows and keeps its rows of
    the logits (``slab_inference.infer_slab``). Returns the timed seconds, this rank's peak GB (the weights
    and its input held at entry, plus the peak the pass allocates) and the planner's estimate for it."""
    sp, divisor, precision = dims.sp, size_divisor(cfg.model), cfg.trainer.precision
    shape = list(volume.shape[2:])
    whole_cfg = derive(cfg, {"inference": {"mode": "whole", "tta": False}}, check=False)
    if sp > 1:
        infer_net = inference_module(model, net, dims, divisor).eval()
        host = volume[0].numpy()
        start, stop = infer_net.rows(shape[0] + (-shape[0]) % divisor)
        held_input = 4 * volume[0, :, :stop - start].numel()  # the rows a rank reads (at most its slab)

        def forward() -> None:
            infer_slab(infer_net, lambda lo, hi: host[:, lo:hi], shape, divisor, precision, device)
    else:
        model.eval()
        whole = volume.to(device)
        held_input = 4 * whole.numel()

        def forward() -> None:
            infer(model, whole, whole_cfg.inference, shape, divisor, precision)

    forward()
    seconds = timed_steps(forward, cfg.bench.steps, device)
    gc.collect()
    held = tensor_bytes(model.parameters()) + held_input
    if device.type == "cuda":
        held = torch.cuda.memory_allocated(device) + (held_input if sp > 1 else 0)
    with PeakMemory(device) as peak:
        forward()
    memory = InferenceMemory.from_config(cfg.model, volume.shape[1], targets.out_channels,
                                         precision, slabs=sp)
    return seconds, (held + peak.bytes) / GB, memory.whole_gb(whole_volume_shape([shape], divisor))


def _worker(config_path: str, out_path: str) -> None:
    """One rank of one sp job: training step, inference, memory and communication; rank 0 writes all."""
    spec, cfg, device = start_worker(config_path)
    sp, rank = dist.get_world_size(), dist.get_rank()
    cfg = derive(cfg, {"parallel": {"name": "spatial", "sp": sp, "dp": 1}}, check=False)
    dims = ParallelDims(dp=1, pp=1, world=sp, sp=sp)
    in_ch, patch, batch = spec["in_channels"], spec["patch"], cfg.data.batch_size
    targets, image, target = random_batch(spec, cfg, batch)
    divisor = size_divisor(cfg.model)
    torch.manual_seed(cfg.seed)
    model = _arm(cfg, build_model(cfg.model, in_ch, targets.out_channels).to(device), unsplit=sp == 1)
    split = plan_split(cfg, in_ch, targets.out_channels, [in_ch, *patch], device, targets)
    net = parallelize(model, dims, split, device, cfg.trainer.precision, cfg.model)
    plan = spatial_plan_for(cfg, in_ch, targets.out_channels, [in_ch, *patch], device, targets)  # sp=1 too
    group = dims.sp_group
    mine = (slabs.slab(image, group, divisor), slabs.slab(target, group, divisor)) if sp > 1 \
        else (image, target)
    # as the data loader gives them, the image in train's layout
    mine = (_layout(cfg, mine[0].to(device)), mine[1].to(device).contiguous())
    optimizer = build_optimizer(model, cfg.optim)
    step = local_step(net, optimizer, parallel_loss(build_loss(cfg.optim, targets), dims), cfg, device,
                      make_grad_scaler(cfg, device))
    first_loss = step(*mine)
    for _ in range(cfg.bench.warmup - 1):
        step(*mine)
    spatial.COMM.reset()
    train_s = timed_steps(lambda: step(*mine), cfg.bench.steps, device)
    comm = {k: v / cfg.bench.steps for k, v in spatial.COMM.seconds.items()}
    # one step's memory: held at entry plus the peak it allocates (the profiler sees allocations only)
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    held = tensor_bytes(model.parameters()) + tensor_bytes(
        v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)) \
        + tensor_bytes(mine)
    if device.type == "cuda":
        held = torch.cuda.memory_allocated(device)
    with PeakMemory(device) as peak:
        step(*mine)
    infer_s, infer_gb, infer_planned = _inference(cfg, model, net, dims, image[:1], targets, device)
    whole = (_layout(cfg, image.to(device)), target.to(device))
    ceiling = _contended_times(cfg, in_ch, targets, whole, device) if sp > 1 else {}
    row = {"sp": sp, "rank": rank, "train_s": statistics.median(train_s),
           "infer_s": statistics.median(infer_s), "first_loss": first_loss,
           "infer_measured_gb": infer_gb, "infer_planned_gb": infer_planned,
           "measured_gb": (held + peak.bytes) / GB,
           "planned_gb": plan.stage.memory_gb, "checkpoint": plan.checkpoint,
           "halo_s": comm.get("halo", 0.0), "allreduce_s": comm.get("allreduce", 0.0),
           **_computes(model, device, cfg.trainer.precision), **ceiling}
    parts = [None] * sp if rank == 0 else None
    dist.gather_object(row, parts, dst=0)
    if rank == 0:
        atomic_write_text(out_path, json.dumps(parts))
    distributed.shutdown()


def summarise(jobs: list[dict]) -> dict:
    """Medians per sp over rounds, speed-ups against sp=1 within each round, memory against the plan.

    Args:
        jobs: ``{"round", "sp", "ranks"}`` per torchrun job, ``ranks`` the rows its ranks measured.

    Returns:
        Per ``sp`` (as a string): median times, speed-ups, memory, communication, the first loss, the
        ceiling (``ceiling_speedup`` of the ``sp=1`` job's time over the contended time, paired by round)
        and the kernels and memory layout each arm computed with.
    """
    by_sp: dict[int, list[list[dict]]] = {}
    for job in jobs:
        by_sp.setdefault(job["sp"], []).append(job["ranks"])
    base = {job["round"]: job["ranks"][0] for job in jobs if job["sp"] == 1}
    out = {}
    for sp, runs in sorted(by_sp.items()):
        rounds = [j for j in jobs if j["sp"] == sp]
        ranks = [r for run in runs for r in run]
        paired = [(base[j["round"]], j["ranks"][0]) for j in rounds if j["round"] in base]
        train_up = [one["train_s"] / split["train_s"] for one, split in paired]
        infer_up = [one["infer_s"] / split["infer_s"] for one, split in paired]
        ceiling = [(ceiling_speedup(sp, one["train_s"], split["contended_train_s"]),
                    ceiling_speedup(sp, one["infer_s"], split["contended_infer_s"]))
                   for one, split in paired if "contended_train_s" in split]
        planned = [r for r in ranks if r["planned_gb"]]
        out[str(sp)] = {
            "train_s": statistics.median(run[0]["train_s"] for run in runs),
            "infer_s": statistics.median(run[0]["infer_s"] for run in runs),
            "train_speedup": statistics.median(train_up) if train_up else None,
            "infer_speedup": statistics.median(infer_up) if infer_up else None,
            "measured_gb_max": max(r["measured_gb"] for r in ranks),
            "planned_gb": planned[0]["planned_gb"] if planned else None,
            "memory_error": (statistics.median(r["measured_gb"] / r["planned_gb"] - 1 for r in planned)
                             if planned else None),
            "halo_s": statistics.median(r["halo_s"] for r in ranks),
            "allreduce_s": statistics.median(r["allreduce_s"] for r in ranks),
            "first_loss": runs[0][0]["first_loss"],
            "kernels": runs[0][0]["kernels"], "memory_format": runs[0][0]["memory_format"],
            "contended_kernels": runs[0][0].get("contended_kernels"),
            "contended_memory_format": runs[0][0].get("contended_memory_format"),
            "ceiling_train_speedup": statistics.median(c[0] for c in ceiling) if ceiling else None,
            "ceiling_infer_speedup": statistics.median(c[1] for c in ceiling) if ceiling else None,
            **_inference_memory(sp, ranks, [r for j in jobs if j["sp"] == 1 for r in j["ranks"]])}
    return out


def _inference_memory(sp: int, ranks: list[dict], alone: list[dict]) -> dict:
    """Whole-volume inference memory of ``sp`` slabs: the largest rank's measured peak, the plan, their
    error, the fraction of one process's peak and the issue's targets (within 15 % of the plan; at most
    1/sp + 0.15 of one process)."""
    if not ranks or "infer_measured_gb" not in ranks[0]:
        return {}
    measured = max(r["infer_measured_gb"] for r in ranks)
    planned = ranks[0]["infer_planned_gb"]
    one = max((r["infer_measured_gb"] for r in alone), default=None)
    fraction = measured / one if one else None
    return {"infer_measured_gb_max": measured, "infer_planned_gb": planned,
            "infer_memory_error": measured / planned - 1, "infer_fraction_of_one": fraction,
            "infer_memory_within_15pct": abs(measured / planned - 1) <= 0.15,
            "infer_fraction_within_target": None if fraction is None else fraction <= 1 / sp + 0.15}


def _plot(summary: dict, path: Path, title: str) -> None:
    plt = pyplot()
    sps = sorted(summary, key=int)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    x = range(len(sps))
    ax1.bar([i - 0.2 for i in x], [summary[s]["train_s"] for s in sps], 0.4, label="training step")
    ax1.bar([i + 0.2 for i in x], [summary[s]["infer_s"] for s in sps], 0.4, label="whole-volume inference")
    ax1.set_xticks(list(x), [f"sp={s}" for s in sps])
    ax1.set_ylabel("seconds (median)")
    ax1.legend()
    ax2.bar([i - 0.2 for i in x], [summary[s]["measured_gb_max"] for s in sps], 0.4,
            label="measured (max rank)")
    ax2.bar([i + 0.2 for i in x], [summary[s]["planned_gb"] or 0 for s in sps], 0.4, label="planned")
    ax2.set_xticks(list(x), [f"sp={s}" for s in sps])
    ax2.set_ylabel("GB per rank")
    ax2.legend()
    fig.suptitle(title)
    atomic_write_bytes(path, figure_png(fig, 120))


def run(cfg) -> dict:
    """Run the benchmark (module docstring); returns what it writes to ``bench_spatial.json``."""
    patch = patch_size_of(cfg)
    if patch is None:
        raise ConfigError("config key 'data.patch_size': bench spatial needs a fixed size (the whole volume "
                          "to split), e.g. data.patch_size=[128,128,128]")
    dataset = load_dataset(dataset_root(cfg.data))
    channels, targets = resolve_channels(dataset, cfg.data), resolve_targets(dataset, cfg.data)
    precision = resolve_precision(cfg.trainer.precision, resolve_device(cfg.trainer.device))
    cfg = derive(cfg, {"trainer.precision": precision.name}, check=False)  # every rank computes alike
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = {"config": to_container(cfg), "in_channels": len(channels), "patch": list(patch),
            "labels": {str(v): n for v, n in zip(targets.label_values, targets.label_names)}}
    spec_path = run_dir / "bench_spatial_spec.json"
    atomic_write_text(spec_path, json.dumps(spec))
    print(f"bench spatial: {precision.line()}; channels_last {bool(cfg.trainer.channels_last)}; every arm's "
          f"convolutions on the split model's kernels", flush=True)
    jobs = []
    for round_ in range(cfg.bench.repeats):
        for sp in cfg.bench.sp:
            out = run_dir / f"bench_spatial_sp{sp}.json"
            ranks = launch_workers("lampseg.bench.spatial", sp, spec_path, out, cfg.bench.timeout_s)
            jobs.append({"round": round_, "sp": sp, "ranks": ranks})
            print(f"round {round_ + 1}/{cfg.bench.repeats} sp={sp}: train {ranks[0]['train_s']:.3f}s "
                  f"infer {ranks[0]['infer_s']:.3f}s, peak {max(r['measured_gb'] for r in ranks):.3f} "
                  f"GB/rank", flush=True)
    summary = summarise(jobs)
    device = str(resolve_device(cfg.trainer.device))
    result = {"benchmark": "spatial", "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "config": {"model": cfg.model.name, "channels": list(cfg.model.channels),
                         "patch_size": list(patch), "batch_size": cfg.data.batch_size,
                         "precision": precision.name, "precision_reason": precision.reason,
                         "channels_last": bool(cfg.trainer.channels_last),
                         "device": device, "sp": list(cfg.bench.sp), "steps": cfg.bench.steps,
                         "warmup": cfg.bench.warmup, "repeats": cfg.bench.repeats,
                         "torch": torch.__version__},
              "summary": summary, "jobs": jobs}
    json_path, png_path = run_dir / "bench_spatial.json", run_dir / "bench_spatial.png"
    write_json(json_path, result)
    _plot(summary, png_path, f"{cfg.model.name} {list(patch)} x{cfg.data.batch_size}, "
                             f"{enum_value(cfg.trainer.precision)}, {device}")
    for sp, s in summary.items():
        up = f", speed-up train {s['train_speedup']:.2f}x infer {s['infer_speedup']:.2f}x" \
            if s["train_speedup"] else ""
        if s["ceiling_train_speedup"]:
            up += (f" (ceiling, {sp} processes at once without communication: train "
                   f"{s['ceiling_train_speedup']:.2f}x infer "
                   f"{s['ceiling_infer_speedup']:.2f}x)")
        plan = f" (plan {s['planned_gb']:.3f})" if s["planned_gb"] else ""
        infer_mem = f"; inference peak {s['infer_measured_gb_max']:.3f} GB/rank (plan " \
            f"{s['infer_planned_gb']:.3f}, {s['infer_fraction_of_one']:.2f} of one process)" \
            if s.get("infer_fraction_of_one") else ""
        print(f"sp={sp}: train {s['train_s']:.3f}s infer {s['infer_s']:.3f}s{up}{infer_mem}; peak "
              f"{s['measured_gb_max']:.3f} GB/rank{plan}; halo {s['halo_s']:.3f}s all-reduce "
              f"{s['allreduce_s']:.3f}s per step; first loss {s['first_loss']:.6f}; kernels {s['kernels']}, "
              f"{s['memory_format']}")
    print(f"wrote {json_path} and {png_path}")
    return result


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
