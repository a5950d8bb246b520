"""The one training function, ``run(cfg, reporter)``, shared by the CLI, torchrun workers, Ray Tune trials
and tests.

    python -m lampseg train                       # synthetic BraTS-like data, a few minutes on a CPU
    python -m lampseg train +exp=brats data.root=/data/Task01_BrainTumour
"""
from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from lampseg.config import ConfigError, enum_value, to_container, validate
from lampseg.data.pipeline import DataBundle, curriculum_phases, phase_at, prepare_data, training_dataset
from lampseg.engine.checkpoint import (
    load_checkpoint,
    load_latest,
    load_optimizer_state_by_name,
    merge_optimizer_states,
    optimizer_state_by_name,
    save_checkpoint,
)
from lampseg.engine.evaluate import evaluate_cases
from lampseg.engine.inference import autocast
from lampseg.engine.logs import RunLogger, peak_memory_mb, write_json
from lampseg.engine.optim import build_optimizer, build_scheduler, lr_scale
from lampseg.errors import TrainingDiverged
from lampseg.io import atomic_write_text, portable
from lampseg.model.losses import build_loss
from lampseg.model.unet import build_model, count_parameters, size_divisor
from lampseg.parallel import distributed
from lampseg.parallel.dims import resolve_dims
from lampseg.parallel.memory import keep_freed_cpu_memory
from lampseg.parallel.parallelize import parallelize
from lampseg.parallel.plan import preflight_plan
from lampseg.viz import validation_overlay


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def _rng_state() -> dict:
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": keys.tolist(),
             "numpy_pos": [int(pos), int(has_gauss), float(gauss)], "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    pos, has_gauss, gauss = state.get("numpy_pos", [624, 0, 0.0])  # position, so the stream continues
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), int(pos), int(has_gauss),
                         float(gauss)))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _resume_checkpoint(cfg, run_dir: Path, log: Callable[[str], None], main: bool
                       ) -> tuple[Path, dict] | None:
    """``trainer.resume``: never (None), auto (`load_latest`, with its fallback) or a path loaded as is."""
    resume = str(cfg.trainer.resume)
    if resume == "never":
        return None
    if resume != "auto":
        return Path(resume), load_checkpoint(resume)
    return load_latest(run_dir / "checkpoints" / "latest.pt", log, main)


class _Progress:
    """A tqdm bar on a terminal; otherwise nothing per step (one line per epoch is printed by ``run``)."""

    def __init__(self, mode: str, total: int, epoch: int):
        use_bar = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
        self.bar = None
        if use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True)

    def update(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def make_grad_scaler(cfg, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for fp16 on CUDA (bf16 and fp32 need none; a disabled scaler is a no-op)."""
    fp16 = enum_value(cfg.trainer.precision) == "fp16"
    return torch.amp.GradScaler(device.type, enabled=fp16 and device.type == "cuda")


def local_step(model, optimizer, loss_fn, cfg, device: torch.device, scaler: torch.amp.GradScaler
               ) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """One optimiser step on a model that runs in this process (unsplit, or torchgpipe over devices).

    The step returns the loss, or NaN when it skipped the update because the loss or the gradient norm
    was not finite (fp16's GradScaler skips such steps itself; bf16/fp32 need this check, or one
    overflowing step turns every weight into NaN through gradient clipping).
    """
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else math.inf

    def step(image: torch.Tensor, target: torch.Tensor) -> float:
        with autocast(device, cfg.trainer.precision):
            logits = model(image)
        loss = loss_fn(logits.float(), target.to(logits.device))  # pipelines end on their last device
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        value = float(loss.detach())
        if not scaler.is_enabled() and not (math.isfinite(float(norm)) and math.isfinite(value)):
            optimizer.zero_grad(set_to_none=True)
            return math.nan
        scaler.step(optimizer)
        scaler.update()
        return value

    return step


def pipelined_step(net, optimizer, loss_fn, cfg) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """One optimiser step of this rank's stage (``PipelinedUNet``): the schedule runs forward and backward
    over micro-batches, gradients are clipped by the norm over all stages, each rank steps its stage."""
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else math.inf

    def step(image: torch.Tensor, target: torch.Tensor) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = net.train_step(image, target, loss_fn)
        norm = net.clip_grad_norm_(max_norm)  # the same all-reduced value on every rank: they agree to skip
        if not (math.isfinite(norm) and math.isfinite(loss)):
            optimizer.zero_grad(set_to_none=True)
            return math.nan
        optimizer.step()
        return loss

    return step


def _train_epoch(model, step, loader, bundle: DataBundle, cfg, device, progress: _Progress
                 ) -> tuple[float, int, float, float, int]:
    """One epoch of ``step(image, target)``.

    Returns:
        (mean loss over the steps taken, batches, seconds, seconds waiting for data, steps skipped for
        non-finite loss or gradients).
    """
    model.train()
    total, steps, wait, skipped = 0.0, 0, 0.0, 0
    start = tick = time.perf_counter()
    for batch in loader:
        wait += time.perf_counter() - tick
        image = batch["image"].to(device, non_blocking=True)
        if cfg.trainer.channels_last:
            image = image.contiguous(memory_format=torch.channels_last_3d)
        target = bundle.targets.loss_target(batch["label"].to(device, non_blocking=True))
        value = step(image, target)
        steps += 1
        if math.isnan(value):
            skipped += 1
        else:
            total += value
            progress.update(value)
        tick = time.perf_counter()
    mean = total / (steps - skipped) if steps > skipped else math.nan
    return mean, steps, time.perf_counter() - start, wait, skipped


def _drill_failure(fail_at_epoch: int | None, epoch: int, run_dir: Path) -> None:
    """``trainer.fail_at_epoch``: raise once, after that epoch's checkpoint and report (fault-tolerance
    drills: a Tune retry, a relaunch). A marker file in the run directory makes it fire only once."""
    marker = run_dir / ".failed_at_epoch"
    if fail_at_epoch == epoch and not marker.exists():
        atomic_write_text(marker, f"{epoch}\n")
        raise RuntimeError(f"trainer.fail_at_epoch={epoch}: simulated failure after the epoch's checkpoint")


def _overlay_drawer(bundle: DataBundle, cases: list[str], run_dir: Path, logger: RunLogger, epoch: int
                    ) -> Callable[[str, torch.Tensor, torch.Tensor], None]:
    """``evaluate_cases``' ``on_logits``: pictures of ``cases`` from the predictions validation makes anyway
    (TensorBoard; the first also ``val_overlay.png``)."""
    def draw(case: str, image: torch.Tensor, logits: torch.Tensor) -> None:
        if case in cases:
            validation_overlay(bundle, case, image, logits, run_dir, logger, epoch, png=case == cases[0])
    return draw


def run(cfg, reporter: Callable[[dict, Path], None] | None = None,
        log: Callable[[str], None] = print) -> dict:
    """Train a segmentation model as ``cfg`` says and write the run directory.

    Args:
        cfg: the composed config (``conf/config.yaml`` + overrides); ``cfg.run_dir`` is the run directory.
        reporter: called after every epoch, once its checkpoint is written, with the epoch's metrics
            (``val_*`` are NaN on epochs without validation) and the path of ``latest.pt`` (Ray Tune's
            report and checkpoint; rank 0 only).
        log: where progress lines go.

    Returns:
        The summary written to ``summary.json``.
    """
    validate(cfg)
    dims = resolve_dims(cfg)  # joins the torchrun job, checks dp x pp against WORLD_SIZE
    staged = dims.staged  # one pipeline stage per torchrun process
    if cfg.data.samples_per_epoch < dims.dp * cfg.data.batch_size:
        raise ConfigError(f"config key 'data.samples_per_epoch': {cfg.data.samples_per_epoch} samples make "
                          f"no step of data.batch_size {cfg.data.batch_size} on each of {dims.dp} replicas")
    main = distributed.is_main()  # only rank 0 writes files and prints
    log = log if main else (lambda *_: None)
    run_dir = Path(cfg.run_dir)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    device = distributed.local_device(resolve_device(cfg.trainer.device))
    if device.type == "cpu" and cfg.trainer.cache_cpu_memory:
        keep_freed_cpu_memory()
    if staged and enum_value(cfg.trainer.precision) == "fp16" and device.type == "cuda":
        raise ConfigError("config key 'trainer.precision': fp16 loss scaling is not coordinated across "
                          "pipeline stages; use bf16 or fp32 with parallel.engine=pipelining")
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    divisor = size_divisor(cfg.model)
    with distributed.main_first():  # rank 0 builds the cache and splits.json, the others read them
        preflight_plan(cfg, log)
        bundle = prepare_data(cfg, run_dir, divisor, log)
    if main:
        atomic_write_text(run_dir / ".hydra" / "config.yaml", OmegaConf.to_yaml(to_container(cfg)))
    model = build_model(cfg.model, len(bundle.channels), bundle.targets.out_channels).to(device)
    if cfg.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    phases = curriculum_phases(cfg, bundle)
    largest = max((patch for _, patch, _ in phases), key=math.prod)  # plan stages for the largest input
    net, plan = parallelize(model, dims, cfg, [len(bundle.channels), *largest], device, bundle.targets)
    infer_net = net.module if isinstance(net, DistributedDataParallel) else net  # validation shards cases
    params = count_parameters(model)
    log(f"model {cfg.model.name}: {params:,} parameters; {len(bundle.channels)} input channels "
        f"({', '.join(bundle.modality_names)}) -> {bundle.targets.out_channels} outputs "
        f"({', '.join(bundle.targets.names)}); device {device}")
    scale = lr_scale(cfg.optim, dims.dp)
    if dims.world > 1:
        log(f"{dims.world} processes: dp={dims.dp} x pp={dims.pp if staged else 1}; global batch "
            f"{dims.dp * cfg.data.batch_size} ({cfg.data.batch_size} per replica); lr {cfg.optim.lr:g} x "
            f"{scale:g} (optim.lr_scaling={cfg.optim.lr_scaling})")
    if plan is not None:
        log(plan.table())
    optimizer = build_optimizer(net if staged else model, cfg.optim, scale)  # a stage's parameters only
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.trainer.max_epochs)
    loss_fn = build_loss(cfg.optim, bundle.targets)
    scaler = make_grad_scaler(cfg, device)
    state = {"epoch": 0, "step": 0, "best_val_dice": -math.inf, "best_epoch": None, "best_metrics": {},
             "history": [], "train_time_s": 0.0, "train_samples": 0, "wall_s": 0.0, "skipped_steps": 0}
    resumed = _resume_checkpoint(cfg, run_dir, log, main)  # on CPU: RNG states must stay CPU tensors
    if resumed is not None:
        resume_from, ckpt = resumed
        model.load_state_dict(ckpt["model"])
        load_optimizer_state_by_name(model, optimizer, ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scheduler.base_lrs = [cfg.optim.lr * scale] * len(optimizer.param_groups)  # this launch's dp and lr
        for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * factor(scheduler.last_epoch)  # a changed trainer.max_epochs applies at once
        scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"])
        state.update(ckpt["train_state"])
        log(f"resumed from {resume_from} at epoch {state['epoch']}")
    if dims.dp_rank > 0:  # replicas start identical (DDP broadcasts rank 0's weights), then draw their own
        torch.manual_seed(cfg.seed + 1_000_003 * dims.dp_rank + state["epoch"])  # dropout masks
    logger = RunLogger(run_dir, bundle.targets.names, state["history"], write=main)
    dataset = training_dataset(cfg, bundle)
    wall_start = time.perf_counter() - state["wall_s"]

    def checkpoint_state() -> dict | None:
        """The checkpoint on rank 0 (stages gathered under unsplit names); None on other ranks."""
        state["history"] = logger.rows
        state["wall_s"] = time.perf_counter() - wall_start
        optim_state = optimizer_state_by_name(model, optimizer)
        weights = net.full_state_dict() if staged else model.state_dict()
        if staged:
            parts = net.gather_on_first(optim_state)
            optim_state = merge_optimizer_states(parts) if parts is not None else None
        if not main:
            return None
        return {"model": weights, "optimizer": optim_state,
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": state["epoch"],
                "rng": _rng_state(),
                "train_state": dict(state), "config": portable(to_container(cfg)),
                "data": {"modalities": bundle.dataset.modalities, "channels": bundle.channels,
                         "labels": {str(k): v for k, v in bundle.dataset.labels.items()},
                         "patch_size": bundle.patch_size}}

    def summary(status: str) -> dict:
        data = {"status": status, "epochs": state["epoch"], "max_epochs": cfg.trainer.max_epochs,
                "best_epoch": state["best_epoch"],
                "best_val_dice": state["best_val_dice"] if state["best_epoch"] is not None else None,
                "val_dice": {n: state["best_metrics"].get(f"dice_{n}") for n in bundle.targets.names},
                "val_hd95": {n: state["best_metrics"].get(f"hd95_{n}") for n in bundle.targets.names},
                "wall_s": round(time.perf_counter() - wall_start, 2),
                "train_samples_per_s": state["train_samples"] / max(state["train_time_s"], 1e-9),
                "peak_memory_mb": round(peak_memory_mb(device), 1), "params": params,
                "skipped_steps": state["skipped_steps"],
                "plan": plan.to_dict() if plan is not None else None, "stage_memory": stage_memory["rows"],
                "patch_size_auto": bundle.patch_decision,
                "model": cfg.model.name, "device": str(device), "dataset": str(bundle.dataset.root),
                "modalities": bundle.modality_names, "fold": cfg.data.fold,
                **dims.to_dict(), "global_batch_size": dims.dp * cfg.data.batch_size, "lr_scale": scale,
                "engine": engine}
        if main:
            write_json(run_dir / "summary.json", data)
        return data

    engine = enum_value(cfg.parallel.engine) if plan is not None else None
    replica_step = pipelined_step(net, optimizer, loss_fn, cfg) if staged else local_step(
        net, optimizer, loss_fn, cfg, device, scaler)

    steps_done = [state["step"]]
    nan_streak = [0]  # consecutive skipped steps: the same on every rank (the loss is all-reduced)

    def step(image: torch.Tensor, target: torch.Tensor) -> float:  # the loss of the global batch
        steps_done[0] += 1
        if dims.world > 1:  # lets a failed collective name the rank that fell behind
            distributed.heartbeat("started", steps_done[0], f"epoch {state['epoch'] + 1}")
        loss = replica_step(image, target)
        if dims.world > 1:
            distributed.heartbeat("finished")
        loss = dims.dp_mean(loss, device)
        nan_streak[0] = nan_streak[0] + 1 if math.isnan(loss) else 0
        if nan_streak[0] >= cfg.trainer.max_nan_steps:
            raise TrainingDiverged(
                f"training diverged: {nan_streak[0]} consecutive steps (up to step {steps_done[0]}, epoch "
                f"{state['epoch'] + 1}) had a non-finite loss or gradients and were skipped "
                f"(trainer.max_nan_steps={cfg.trainer.max_nan_steps}); they did not change the weights and "
                f"{run_dir / 'checkpoints' / 'latest.pt'} holds epoch {state['epoch']}. Try a lower "
                f"optim.lr, optim.grad_clip, trainer.precision=fp32, or check the data (lampseg validate)")
        return loss
    stage_memory: dict = {"calls": 0, "rows": None}
    if staged:  # measure each stage's peak memory on the second step (optimiser state exists by then)
        plain_step = step

        def step(image: torch.Tensor, target: torch.Tensor) -> float:
            stage_memory["calls"] += 1
            if stage_memory["calls"] != 2:
                return plain_step(image, target)
            loss, stage_memory["mine"] = net.measure_step(plain_step, optimizer, image, target)
            return loss
    current_phase = None
    stop_at = cfg.trainer.max_epochs
    if cfg.trainer.stop_after_epochs is not None:
        stop_at = min(stop_at, state["epoch"] + cfg.trainer.stop_after_epochs)
    summary("running")
    sampler = None  # replica r takes samples r, r + dp, ...: together, the global batch of one process
    if dims.dp_enabled:
        sampler = DistributedSampler(dataset, num_replicas=dims.dp, rank=dims.dp_rank, shuffle=False,
                                     drop_last=True)
    loader_kwargs = dict(batch_size=cfg.data.batch_size, shuffle=False, drop_last=True, sampler=sampler,
                         num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
                         persistent_workers=False)
    try:
        while state["epoch"] < stop_at:
            epoch = state["epoch"] + 1
            phase = phase_at(phases, epoch)
            if phase != current_phase and len(phases) > 1:
                kind = "whole volumes" if phase[2] else "patches"
                log(f"curriculum: from epoch {epoch}, {kind} {phase[1]}")
            current_phase = phase
            _, dataset.patch_size, dataset.whole_volume = phase
            dataset.set_epoch(epoch)
            loader = DataLoader(dataset, **loader_kwargs)
            progress = _Progress(cfg.trainer.progress if main else "none", len(loader), epoch)
            lr = optimizer.param_groups[0]["lr"]
            loss, steps, seconds, wait, skipped = _train_epoch(net, step, loader, bundle, cfg, device,
                                                               progress)
            state["skipped_steps"] += skipped
            progress.close()
            if "mine" in stage_memory:  # gathered once (a collective: every rank gets here together)
                stage_memory["rows"] = net.gather_on_first(stage_memory.pop("mine"))
                if main:
                    log("stage memory, planned / measured (step 2): " + ", ".join(
                        f"stage {r['stage']} {r['planned_gb'] * 1024:.1f} / {r['measured_gb'] * 1024:.1f} MB"
                        for r in stage_memory["rows"]))
            scheduler.step()
            state["step"] += steps
            state["train_time_s"] += seconds
            state["train_samples"] += steps * cfg.data.batch_size * dims.dp
            row = {"epoch": epoch, "step": state["step"], "train_loss": loss, "lr": lr, "epoch_s": seconds,
                   "samples_per_s": steps * cfg.data.batch_size * dims.dp / seconds,
                   "data_wait_frac": wait / seconds,
                   "val_dice": math.nan}
            if epoch % cfg.trainer.val_every == 0 or epoch == cfg.trainer.max_epochs:
                cases = bundle.val_cases[: cfg.trainer.val_max_cases or None]
                mine = cases[::dims.dp] if dims.dp_enabled else cases  # rank 0's shard of the validation
                drawn = mine[:cfg.trainer.val_overlays] if main and not staged else []
                _, means = evaluate_cases(infer_net, bundle, cases, cfg, device, dims,
                                          on_logits=_overlay_drawer(bundle, drawn, run_dir, logger, epoch))
                row["val_dice"] = means["dice"]
                row.update({f"val_{k}": v for k, v in means.items() if k != "dice"})
                if means["dice"] > state["best_val_dice"]:
                    state.update(best_val_dice=means["dice"], best_epoch=epoch, best_metrics=means)
            state["epoch"] = epoch
            logger.log_epoch(row)
            ckpt = checkpoint_state()
            if main:
                save_checkpoint(run_dir / "checkpoints" / "latest.pt", ckpt, keep_previous=True)
                if state["best_epoch"] == epoch:
                    save_checkpoint(run_dir / "checkpoints" / "best.pt", ckpt)
                if reporter is not None:
                    reporter(dict(row), run_dir / "checkpoints" / "latest.pt")
                _drill_failure(cfg.trainer.fail_at_epoch, epoch, run_dir)
            names = " ".join(f"{n}={row.get(f'val_dice_{n}', math.nan):.3f}" for n in bundle.targets.names)
            val = f" val_dice={row['val_dice']:.4f} ({names})" if not math.isnan(row["val_dice"]) else ""
            skip = f" (skipped {skipped} step(s): non-finite loss or gradients)" if skipped else ""
            log(f"epoch {epoch}/{cfg.trainer.max_epochs} step {state['step']} loss={loss:.4f} lr={lr:.2e} "
                f"{seconds:.1f}s {row['samples_per_s']:.1f} samples/s{val}{skip}")
            summary("running")
        if state["epoch"] >= cfg.trainer.max_epochs:
            final = checkpoint_state()
            if main:
                save_checkpoint(run_dir / "checkpoints" / "final.pt", final)
                if not (run_dir / "checkpoints" / "best.pt").is_file():
                    save_checkpoint(run_dir / "checkpoints" / "best.pt", final)
            result = summary("completed")
            log(f"done: best val_dice={result['best_val_dice']} at epoch {result['best_epoch']}; "
                f"run dir {run_dir}")
        else:
            result = summary("running")
            log(f"stopped after epoch {state['epoch']} (trainer.stop_after_epochs); resume with the same "
                f"command; run dir {run_dir}")
        return result
    except BaseException:
        summary("failed")
        raise
    finally:
        logger.close()
