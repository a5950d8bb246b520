"""The one training function, ``run(cfg, reporter)``, shared by the CLI, torchrun workers, Ray Tune trials
and tests: ``build_run`` builds the run (``engine/build.py``), ``Trainer.train`` loops over epochs.

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

from lampseg.data.prepare import phase_at
from lampseg.data.sampling import training_loader
from lampseg.engine.build import Run, build_run
from lampseg.engine.checkpoint import merge_optimizer_states, optimizer_state_by_name, save_checkpoint
from lampseg.engine.evaluate import evaluate_cases
from lampseg.engine.logs import RunLogger
from lampseg.engine.metrics import metric_key
from lampseg.engine.setup import saved_config
from lampseg.engine.steps import EpochResult, Progress, train_epoch
from lampseg.io import atomic_write_text, portable, write_json
from lampseg.runtime.device import rng_state
from lampseg.runtime.memory import peak_memory_mb
from lampseg.viz import validation_overlay

Reporter = Callable[[dict, Path], None]
DATA_WAIT_NOTE = 0.05  # an epoch line names the data wait above this fraction of the epoch


class Trainer:
    """Trains a built ``Run`` epoch by epoch, writing ``metrics.csv``, ``summary.json`` and checkpoints.

    Args:
        run: what ``build_run`` built; the trainer keeps its parts, not the run.
        reporter: called after every epoch, once its checkpoint is written, with the epoch's metrics
            (``val_*`` are NaN on epochs without validation) and the path of ``latest.pt`` (Ray Tune's
            report and checkpoint; rank 0 only).
    """

    def __init__(self, run: Run, reporter: Reporter | None = None) -> None:
        self.cfg, self.log, self.run_dir, self.reporter = run.cfg, run.log, run.run_dir, reporter
        self.place, self.nets, self.optim, self.data = run.place, run.nets, run.optim, run.data
        self.step, self.state, self.started = run.step, run.state, run.started
        self.logger = RunLogger(self.run_dir, self.data.bundle.targets.names, self.state.history,
                                write=self.place.main)
        self.stage_memory: list[dict] | None = None
        self.stop_at = self.cfg.trainer.max_epochs
        if self.cfg.trainer.stop_after_epochs is not None:
            self.stop_at = min(self.stop_at, self.state.epoch + self.cfg.trainer.stop_after_epochs)
        self.phase = None
        self._loader: DataLoader | None = None

    def train(self) -> dict:
        """Train until ``trainer.max_epochs`` (or ``trainer.stop_after_epochs``); returns the summary."""
        cfg, state, net, bundle = self.cfg, self.state, self.nets.net, self.data.bundle
        self.summary("running")
        try:
            while state.epoch < self.stop_at:
                epoch = state.epoch + 1
                loader = self.loader(epoch)
                lr = self.optim.optimizer.param_groups[0]["lr"]
                progress = Progress(cfg.trainer.progress if self.place.main else "none", len(loader), epoch)
                result = train_epoch(net, self.step, loader, bundle, cfg, self.place.device, progress)
                progress.close()
                self.log_stage_memory()
                self.optim.scheduler.step()
                row = self.record(epoch, result, lr)
                if epoch % cfg.trainer.val_every == 0 or epoch == cfg.trainer.max_epochs:
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
        data = self.data
        phase = phase_at(data.phases, epoch)
        if phase != self.phase:
            if len(data.phases) > 1:
                kind = "whole volumes" if phase[2] else "patches"
                self.log(f"curriculum: from epoch {epoch}, {kind} {phase[1]}")
            self.phase = phase
            _, data.dataset.patch_size, data.dataset.whole_volume = phase
            self._loader = training_loader(data.dataset, data.sampler, self.cfg.data.batch_size, data.workers,
                                           pin_memory=self.place.device.type == "cuda")
        data.sampler.set_epoch(epoch)
        return self._loader

    def record(self, epoch: int, result: EpochResult, lr: float) -> dict:
        """Count the epoch in the state; its ``metrics.csv`` row (validation not yet filled in)."""
        state, samples = self.state, result.steps * self.cfg.data.batch_size * self.place.dims.dp
        state.skipped_steps += result.skipped
        state.step += result.steps
        state.train_time_s += result.seconds
        state.train_samples += samples
        return {"epoch": epoch, "step": state.step, "train_loss": result.loss, "lr": lr,
                "epoch_s": result.seconds, "samples_per_s": samples / result.seconds,
                "data_wait_frac": result.wait_s / result.seconds, "val_dice": math.nan}

    def validate(self, epoch: int, row: dict) -> None:
        """Validate (each replica its shard of the cases), fill ``row`` and keep the best; draw overlays."""
        cfg, state, place, bundle = self.cfg, self.state, self.place, self.data.bundle
        cases = bundle.val_cases[: cfg.trainer.val_max_cases or None]
        mine = cases[::place.dims.dp] if place.dims.dp_enabled else cases  # rank 0's shard of the validation
        # Every rank of a slab group names the same cases: they assemble the drawn label maps together.
        drawn = mine[:cfg.trainer.val_overlays] if not place.dims.staged else []

        def draw(case: str, image: torch.Tensor, labels: torch.Tensor) -> None:
            if place.main:  # from the predictions validation makes anyway (the first also as PNG)
                validation_overlay(bundle, case, image, labels, self.run_dir, self.logger, epoch,
                                   png=case == drawn[0])

        _, means = evaluate_cases(self.nets.infer_net, bundle, cases, cfg, place.device, place.dims, draw,
                                  drawn)
        row["val_dice"] = means["dice"]
        row.update({f"val_{k}": v for k, v in means.items() if k != "dice"})
        if means["dice"] > state.best_val_dice:
            state.best_val_dice, state.best_epoch, state.best_metrics = means["dice"], epoch, means

    def checkpoint(self) -> dict | None:
        """The checkpoint on rank 0 (stages gathered under unsplit names); None on other ranks."""
        state, nets, optim, place = self.state, self.nets, self.optim, self.place
        state.history = self.logger.rows
        state.wall_s = time.perf_counter() - self.started
        optim_state = optimizer_state_by_name(nets.model, optim.optimizer)
        weights = nets.net.full_state_dict() if place.dims.staged else nets.model.state_dict()
        if place.dims.staged:
            parts = nets.net.gather_on_first(optim_state)
            optim_state = merge_optimizer_states(parts) if parts is not None else None
        if not place.main:
            return None
        bundle = self.data.bundle
        return {"model": weights, "optimizer": optim_state, "scheduler": optim.scheduler.state_dict(),
                "scaler": optim.scaler.state_dict(), "epoch": state.epoch, "rng": rng_state(),
                "train_state": state.to_dict(), "config": portable(saved_config(self.cfg, place.precision)),
                "precision": place.precision.name,
                "data": {"modalities": bundle.dataset.modalities, "channels": bundle.channels,
                         "labels": {str(k): v for k, v in bundle.dataset.labels.items()},
                         "patch_size": bundle.patch_size}}

    def save_epoch(self, epoch: int, row: dict) -> None:
        """``latest.pt`` (and ``best.pt``), then the reporter; ``trainer.fail_at_epoch`` drills fire here."""
        ckpt, checkpoints = self.checkpoint(), self.run_dir / "checkpoints"
        if not self.place.main:
            return
        save_checkpoint(checkpoints / "latest.pt", ckpt, keep_previous=True)
        if self.state.best_epoch == epoch:
            save_checkpoint(checkpoints / "best.pt", ckpt)
        if self.reporter is not None:
            self.reporter(dict(row), checkpoints / "latest.pt")
        drill_failure(self.cfg.trainer.fail_at_epoch, epoch, self.run_dir)

    def finish(self) -> dict:
        """``final.pt`` (and ``best.pt`` when no epoch validated) and the summary, or the line that says how
        to continue a run stopped by ``trainer.stop_after_epochs``."""
        if self.state.epoch < self.cfg.trainer.max_epochs:
            result = self.summary("running")
            self.log(f"stopped after epoch {self.state.epoch} (trainer.stop_after_epochs); resume with the "
                     f"same command; run dir {self.run_dir}")
            return result
        final, checkpoints = self.checkpoint(), self.run_dir / "checkpoints"
        if self.place.main:
            save_checkpoint(checkpoints / "final.pt", final)
            if not (checkpoints / "best.pt").is_file():
                save_checkpoint(checkpoints / "best.pt", final)
        result = self.summary("completed")
        self.log(f"done: best val_dice={result['best_val_dice']} at epoch {result['best_epoch']}; "
                 f"run dir {self.run_dir}")
        return result

    def summary(self, status: str) -> dict:
        """``summary.json`` (written by rank 0), returned on every rank."""
        state, cfg, place, nets, bundle = self.state, self.cfg, self.place, self.nets, self.data.bundle
        names = bundle.targets.names
        data = {"status": status, "epochs": state.epoch, "max_epochs": cfg.trainer.max_epochs,
                "best_epoch": state.best_epoch,
                "best_val_dice": state.best_val_dice if state.best_epoch is not None else None,
                "val_dice": {n: state.best_metrics.get(f"dice_{metric_key(n)}") for n in names},
                "val_hd95": {n: state.best_metrics.get(f"hd95_{metric_key(n)}") for n in names},
                "wall_s": round(time.perf_counter() - self.started, 2),
                "train_samples_per_s": state.train_samples / max(state.train_time_s, 1e-9),
                "peak_memory_mb": round(peak_memory_mb(place.device), 1), "params": nets.params,
                "skipped_steps": state.skipped_steps,
                "plan": nets.plan.to_dict() if nets.plan is not None else None,
                "stage_memory": self.stage_memory,
                "patch_size_auto": bundle.patch_decision,
                "model": cfg.model.name, "device": str(place.device), "precision": place.precision.name,
                "precision_reason": place.precision.reason, "dataset": str(bundle.dataset.root),
                "modalities": bundle.modality_names, "fold": cfg.data.fold,
                **place.dims.to_dict(), "global_batch_size": place.dims.dp * cfg.data.batch_size,
                "lr_scale": self.optim.lr_scale, "engine": place.dims.engine}
        if place.main:
            write_json(self.run_dir / "summary.json", data)
        return data

    def log_stage_memory(self) -> None:
        """Each stage's planned and measured peak, once, after the epoch that measured it."""
        rows = self.step.gather_stage_memory()
        if rows is None:
            return
        self.stage_memory = rows
        self.log("stage memory, planned / measured (step 2): " + ", ".join(
            f"stage {r['stage']} {r['planned_gb'] * 1024:.1f} / {r['measured_gb'] * 1024:.1f} MB"
            for r in rows))

    def log_epoch(self, row: dict, skipped: int) -> None:
        self.log(epoch_line(row, self.cfg.trainer.max_epochs, self.data.bundle.targets.names,
                            self.data.workers, skipped))


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
        cfg: the composed config (``conf/config.yaml`` + overrides), checked and read-only or not (then
            checked here); ``cfg.run_dir`` is the run directory. It is not changed (``build_run``).
        reporter: see ``Trainer``.
        log: where progress lines go.

    Returns:
        The summary written to ``summary.json``.
    """
    return Trainer(build_run(cfg, log), reporter).train()
