"""The one training function, ``run(cfg, reporter)``, shared by the CLI, torchrun workers, Ray Tune trials
and tests: ``setup`` builds the run (``engine/setup.py``), ``Trainer.train`` loops over epochs.

    python -m lampseg train                       # synthetic BraTS-like data, a few minutes on a CPU
    python -m lampseg train +exp=brats data.root=/data/Task01_BrainTumour
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from lampseg.data.prepare import phase_at, training_dataset
from lampseg.data.sampling import EpochSampler, Slab, training_loader
from lampseg.engine.checkpoint import merge_optimizer_states, optimizer_state_by_name, save_checkpoint
from lampseg.engine.evaluate import evaluate_cases
from lampseg.engine.logs import RunLogger
from lampseg.engine.metrics import metric_key
from lampseg.engine.setup import Run, saved_config, setup
from lampseg.engine.steps import EpochResult, GlobalStep, Progress, local_step, pipelined_step, train_epoch
from lampseg.io import atomic_write_text, portable, write_json
from lampseg.model.unet import size_divisor
from lampseg.runtime.device import loader_workers, rng_state
from lampseg.runtime.memory import peak_memory_mb
from lampseg.viz import validation_overlay

Reporter = Callable[[dict, Path], None]
DATA_WAIT_NOTE = 0.05  # an epoch line names the data wait above this fraction of the epoch


class Trainer:
    """Trains a ``Run`` epoch by epoch, writing ``metrics.csv``, ``summary.json`` and checkpoints.

    Args:
        run: what ``setup`` built.
        reporter: called after every epoch, once its checkpoint is written, with the epoch's metrics
            (``val_*`` are NaN on epochs without validation) and the path of ``latest.pt`` (Ray Tune's
            report and checkpoint; rank 0 only).
    """

    def __init__(self, run: Run, reporter: Reporter | None = None) -> None:
        self.run, self.reporter, cfg = run, reporter, run.cfg
        self.logger = RunLogger(run.run_dir, run.bundle.targets.names, run.state.history, write=run.main)
        slab = Slab(run.dims.sp_rank, run.dims.sp, size_divisor(cfg.model)) if run.dims.spatial else None
        self.dataset = training_dataset(cfg, run.bundle, slab)  # under SP: this rank's slab of each sample
        replica_step = pipelined_step(run.net, run.optimizer, run.loss_fn, cfg) if run.staged else local_step(
            run.net, run.optimizer, run.loss_fn, cfg, run.device, run.scaler)
        self.step = GlobalStep(replica_step, run)
        self.stage_memory: list[dict] | None = None
        self.stop_at = cfg.trainer.max_epochs
        if cfg.trainer.stop_after_epochs is not None:
            self.stop_at = min(self.stop_at, run.state.epoch + cfg.trainer.stop_after_epochs)
        self.phase = None
        self.sampler = EpochSampler(len(self.dataset), run.dims.dp, run.dims.dp_rank)
        self.workers = loader_workers(cfg.data.num_workers)
        self._loader: DataLoader | None = None

    def train(self) -> dict:
        """Train until ``trainer.max_epochs`` (or ``trainer.stop_after_epochs``); returns the summary."""
        run, state = self.run, self.run.state
        self.summary("running")
        try:
            while state.epoch < self.stop_at:
                epoch = state.epoch + 1
                loader = self.loader(epoch)
                lr = run.optimizer.param_groups[0]["lr"]
                progress = Progress(run.cfg.trainer.progress if run.main else "none", len(loader), epoch)
                result = train_epoch(run.net, self.step, loader, run.bundle, run.cfg, run.device, progress)
                progress.close()
                self.log_stage_memory()
                run.scheduler.step()
                row = self.record(epoch, result, lr)
                if epoch % run.cfg.trainer.val_every == 0 or epoch == run.cfg.trainer.max_epochs:
                    self.validate(epoch, row)
                state.epoch = epoch
                self.logger.log_epoch(row)
                self.save_epoch(epoch, row)
                self.log_epoch(row, result.skipped)
                self.summary("running")
            return self.finish()
        except BaseException:
            self.summary("failed")
            raise
        finally:
            self.logger.close()
            self._loader = None  # its workers stop with it

    def loader(self, epoch: int) -> DataLoader:
        """The epoch's loader: its curriculum phase's input size, replica ``r`` taking samples ``r, r + dp,
        ...`` (together, the global batch of one process). Its workers live from epoch to epoch and are
        started again only when a curriculum phase changes the input size."""
        run = self.run
        phase = phase_at(run.phases, epoch)
        if phase != self.phase:
            if len(run.phases) > 1:
                kind = "whole volumes" if phase[2] else "patches"
                run.log(f"curriculum: from epoch {epoch}, {kind} {phase[1]}")
            self.phase = phase
            _, self.dataset.patch_size, self.dataset.whole_volume = phase
            self._loader = training_loader(self.dataset, self.sampler, run.cfg.data.batch_size, self.workers,
                                           pin_memory=run.device.type == "cuda")
        self.sampler.set_epoch(epoch)
        return self._loader

    def record(self, epoch: int, result: EpochResult, lr: float) -> dict:
        """Count the epoch in the state; its ``metrics.csv`` row (validation not yet filled in)."""
        state, samples = self.run.state, result.steps * self.run.cfg.data.batch_size * self.run.dims.dp
        state.skipped_steps += result.skipped
        state.step += result.steps
        state.train_time_s += result.seconds
        state.train_samples += samples
        return {"epoch": epoch, "step": state.step, "train_loss": result.loss, "lr": lr,
                "epoch_s": result.seconds, "samples_per_s": samples / result.seconds,
                "data_wait_frac": result.wait_s / result.seconds, "val_dice": math.nan}

    def validate(self, epoch: int, row: dict) -> None:
        """Validate (each replica its shard of the cases), fill ``row`` and keep the best; draw overlays."""
        run, state = self.run, self.run.state
        cases = run.bundle.val_cases[: run.cfg.trainer.val_max_cases or None]
        mine = cases[::run.dims.dp] if run.dims.dp_enabled else cases  # rank 0's shard of the validation
        drawn = mine[:run.cfg.trainer.val_overlays] if run.main and not run.staged else []

        def draw(case: str, image: torch.Tensor, logits: torch.Tensor) -> None:
            if case in drawn:  # from the predictions validation makes anyway (the first also as PNG)
                validation_overlay(run.bundle, case, image, logits, run.run_dir, self.logger, epoch,
                                   png=case == drawn[0])

        _, means = evaluate_cases(run.infer_net, run.bundle, cases, run.cfg, run.device, run.dims, draw)
        row["val_dice"] = means["dice"]
        row.update({f"val_{k}": v for k, v in means.items() if k != "dice"})
        if means["dice"] > state.best_val_dice:
            state.best_val_dice, state.best_epoch, state.best_metrics = means["dice"], epoch, means

    def checkpoint(self) -> dict | None:
        """The checkpoint on rank 0 (stages gathered under unsplit names); None on other ranks."""
        run, state = self.run, self.run.state
        state.history = self.logger.rows
        state.wall_s = time.perf_counter() - run.started
        optim_state = optimizer_state_by_name(run.model, run.optimizer)
        weights = run.net.full_state_dict() if run.staged else run.model.state_dict()
        if run.staged:
            parts = run.net.gather_on_first(optim_state)
            optim_state = merge_optimizer_states(parts) if parts is not None else None
        if not run.main:
            return None
        bundle = run.bundle
        return {"model": weights, "optimizer": optim_state, "scheduler": run.scheduler.state_dict(),
                "scaler": run.scaler.state_dict(), "epoch": state.epoch, "rng": rng_state(),
                "train_state": state.to_dict(), "config": portable(saved_config(run.cfg, run.precision)),
                "precision": run.precision.name,
                "data": {"modalities": bundle.dataset.modalities, "channels": bundle.channels,
                         "labels": {str(k): v for k, v in bundle.dataset.labels.items()},
                         "patch_size": bundle.patch_size}}

    def save_epoch(self, epoch: int, row: dict) -> None:
        """``latest.pt`` (and ``best.pt``), then the reporter; ``trainer.fail_at_epoch`` drills fire here."""
        ckpt, checkpoints = self.checkpoint(), self.run.run_dir / "checkpoints"
        if not self.run.main:
            return
        save_checkpoint(checkpoints / "latest.pt", ckpt, keep_previous=True)
        if self.run.state.best_epoch == epoch:
            save_checkpoint(checkpoints / "best.pt", ckpt)
        if self.reporter is not None:
            self.reporter(dict(row), checkpoints / "latest.pt")
        drill_failure(self.run.cfg.trainer.fail_at_epoch, epoch, self.run.run_dir)

    def finish(self) -> dict:
        """``final.pt`` (and ``best.pt`` when no epoch validated) and the summary, or the line that says how
        to continue a run stopped by ``trainer.stop_after_epochs``."""
        run = self.run
        if run.state.epoch < run.cfg.trainer.max_epochs:
            result = self.summary("running")
            run.log(f"stopped after epoch {run.state.epoch} (trainer.stop_after_epochs); resume with the "
                    f"same command; run dir {run.run_dir}")
            return result
        final, checkpoints = self.checkpoint(), run.run_dir / "checkpoints"
        if run.main:
            save_checkpoint(checkpoints / "final.pt", final)
            if not (checkpoints / "best.pt").is_file():
                save_checkpoint(checkpoints / "best.pt", final)
        result = self.summary("completed")
        run.log(f"done: best val_dice={result['best_val_dice']} at epoch {result['best_epoch']}; "
                f"run dir {run.run_dir}")
        return result

    def summary(self, status: str) -> dict:
        """``summary.json`` (written by rank 0), returned on every rank."""
        run, state, cfg, names = self.run, self.run.state, self.run.cfg, self.run.bundle.targets.names
        data = {"status": status, "epochs": state.epoch, "max_epochs": cfg.trainer.max_epochs,
                "best_epoch": state.best_epoch,
                "best_val_dice": state.best_val_dice if state.best_epoch is not None else None,
                "val_dice": {n: state.best_metrics.get(f"dice_{metric_key(n)}") for n in names},
                "val_hd95": {n: state.best_metrics.get(f"hd95_{metric_key(n)}") for n in names},
                "wall_s": round(time.perf_counter() - run.started, 2),
                "train_samples_per_s": state.train_samples / max(state.train_time_s, 1e-9),
                "peak_memory_mb": round(peak_memory_mb(run.device), 1), "params": run.params,
                "skipped_steps": state.skipped_steps,
                "plan": run.plan.to_dict() if run.plan is not None else None,
                "stage_memory": self.stage_memory,
                "patch_size_auto": run.bundle.patch_decision,
                "model": cfg.model.name, "device": str(run.device), "precision": run.precision.name,
                "precision_reason": run.precision.reason, "dataset": str(run.bundle.dataset.root),
                "modalities": run.bundle.modality_names, "fold": cfg.data.fold,
                **run.dims.to_dict(), "global_batch_size": run.dims.dp * cfg.data.batch_size,
                "lr_scale": run.lr_scale, "engine": run.engine}
        if run.main:
            write_json(run.run_dir / "summary.json", data)
        return data

    def log_stage_memory(self) -> None:
        """Each stage's planned and measured peak, once, after the epoch that measured it."""
        rows = self.step.gather_stage_memory()
        if rows is None:
            return
        self.stage_memory = rows
        self.run.log("stage memory, planned / measured (step 2): " + ", ".join(
            f"stage {r['stage']} {r['planned_gb'] * 1024:.1f} / {r['measured_gb'] * 1024:.1f} MB"
            for r in rows))

    def log_epoch(self, row: dict, skipped: int) -> None:
        self.run.log(epoch_line(row, self.run.cfg.trainer.max_epochs, self.run.bundle.targets.names,
                                self.workers, skipped))


def epoch_line(row: dict, max_epochs: int, names: list[str], workers: int, skipped: int = 0) -> str:
    """The console line of one epoch's ``metrics.csv`` row: loss, learning rate, time, throughput; the data
    wait when above ``DATA_WAIT_NOTE`` (the loader is the bottleneck: it names the knob); validation."""
    dice = " ".join(f"{n}={row.get(f'val_dice_{metric_key(n)}', math.nan):.3f}" for n in names)
    val = f" val_dice={row['val_dice']:.4f} ({dice})" if not math.isnan(row["val_dice"]) else ""
    skip = f" (skipped {skipped} step(s): non-finite loss or gradients)" if skipped else ""
    wait = ""
    if row["data_wait_frac"] > DATA_WAIT_NOTE:
        wait = f" data wait {row['data_wait_frac']:.0%} (data.num_workers={workers})"
    return (f"epoch {row['epoch']}/{max_epochs} step {row['step']} loss={row['train_loss']:.4f} "
            f"lr={row['lr']:.2e} {row['epoch_s']:.1f}s {row['samples_per_s']:.1f} samples/s{wait}{val}{skip}")


def drill_failure(fail_at_epoch: int | None, epoch: int, run_dir: Path) -> None:
    """``trainer.fail_at_epoch``: raise once, after that epoch's checkpoint and report (fault-tolerance
    drills: a Tune retry, a relaunch). A marker file in the run directory makes it fire only once."""
    marker = run_dir / ".failed_at_epoch"
    if fail_at_epoch == epoch and not marker.exists():
        atomic_write_text(marker, f"{epoch}\n")
        raise RuntimeError(f"trainer.fail_at_epoch={epoch}: simulated failure after the epoch's checkpoint")


def run(cfg, reporter: Reporter | None = None, log: Callable[[str], None] = print) -> dict:
    """Train a segmentation model as ``cfg`` says and write the run directory.

    Args:
        cfg: the composed config (``conf/config.yaml`` + overrides); ``cfg.run_dir`` is the run directory.
        reporter: see ``Trainer``.
        log: where progress lines go.

    Returns:
        The summary written to ``summary.json``.
    """
    return Trainer(setup(cfg, log), reporter).train()
