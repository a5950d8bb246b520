"""Scoring a model on cached cases (validation during training, ``evaluate``, ``bench inference``) and
rebuilding a checkpoint's model under any parallel layout (``evaluate``, ``predict``).

    python -m lampseg evaluate ckpt=outputs/run/checkpoints/best.pt inference.mode=sliding
"""
from __future__ import annotations

import time
from collections.abc import Callable, Collection
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from lampseg.config import enum_value, restore
from lampseg.engine.checkpoint import load_weights
from lampseg.engine.inference import infer
from lampseg.engine.metrics import dice_hd95, summarize
from lampseg.engine.setup import select_device
from lampseg.engine.slab_inference import infer_volume, slab_applies, slab_scores
from lampseg.model.losses import Targets
from lampseg.model.unet import build_model, size_divisor
from lampseg.parallel.dims import resolve_dims
from lampseg.parallel.parallelize import inference_module, parallelize
from lampseg.planner.inference import inference_memory
from lampseg.planner.layout import plan_split
from lampseg.runtime.memory import CasePeakMemory


def roi_size(cfg, patch_size: list[int]) -> list[int]:
    """Sliding-window size: ``inference.patch_size``, or the training patch."""
    return list(cfg.inference.patch_size) if cfg.inference.patch_size is not None else list(patch_size)


def evaluate_cases(model, bundle, cases: list[str], cfg, device: torch.device, dims=None,
                   draw: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None,
                   draw_cases: Collection[str] = ()) -> tuple[list[dict], dict]:
    """Dice/HD95 per case (in preprocessed space, spacing from the cache metadata) and their means.

    With data parallelism each replica evaluates every ``dp``-th case and the results are gathered, so
    every rank returns the same per-case list (in the order of ``cases``) and means. A model split into
    slabs reads, infers and scores each case slab by slab (``slab_inference``; no rank holds a whole
    volume's logits).

    Args:
        model: the network (not DDP-wrapped); put in eval mode here and left in eval mode.
        bundle: the ``DataBundle`` (cache, targets, channels, patch size).
        cases: case names to evaluate.
        cfg: the config (``inference.*``, ``trainer.precision``, ``trainer.hd95``).
        device: where to run.
        dims: the run's ``ParallelDims`` (None: one process evaluates everything).
        draw: called with each case of ``draw_cases`` this process infers (under slabs: the group's first
            rank): its name, image (1, C, X, Y, Z) and label map (1, X, Y, Z) (training draws overlays from
            them without a second inference).
        draw_cases: the cases ``draw`` is called for (the same on every rank of a slab group).

    Returns:
        (per-case dicts with ``case``, ``dice``, ``hd95``, ``seconds``; means from ``metrics.summarize``).
    """
    model.eval()
    names, per_case = bundle.targets.names, []
    memory = inference_memory(cfg, len(bundle.channels), bundle.targets.out_channels, device)
    shard = cases[dims.dp_rank::dims.dp] if dims is not None and dims.dp_enabled else cases
    score = _slab_case if slab_applies(model, cfg.inference) else _case
    for name in shard:
        start = time.perf_counter()
        report = {"mode": enum_value(cfg.inference.mode)}
        with CasePeakMemory(device) as peak:
            dice, hd, labels = score(model, bundle, name, cfg, device, memory, report, name in draw_cases)
        if draw is not None and labels is not None:
            draw(name, case_image(bundle, name), labels)
        per_case.append({"case": name, "dice": dict(zip(names, dice)), "hd95": dict(zip(names, hd)),
                         "seconds": time.perf_counter() - start, "inference": report, **peak.report()})
    if dims is not None and dims.dp_enabled:
        order = {name: k for k, name in enumerate(cases)}
        per_case = sorted(dims.dp_gather(per_case), key=lambda c: order[c["case"]])
    return per_case, summarize(per_case, names)


def _case(model, bundle, name: str, cfg, device: torch.device, memory, report: dict, drawn: bool
          ) -> tuple[list[float], list[float], torch.Tensor | None]:
    """One case inferred whole on this process: Dice, HD95 and (when ``drawn``) its label map."""
    image = case_image(bundle, name).to(device)
    logits = infer(model, image, cfg.inference, roi_size(cfg, bundle.patch_size), size_divisor(cfg.model),
                   cfg.trainer.precision, memory, report)
    return _case_scores_drawn(bundle, name, logits, cfg.trainer.hd95, drawn)


def _slab_case(model, bundle, name: str, cfg, device: torch.device, memory, report: dict, drawn: bool
               ) -> tuple[list[float], list[float], torch.Tensor | None]:
    """One case slab by slab (``slab_inference``): each rank reads its rows of the cached image and label;
    the label map (when ``drawn``) is assembled on the group's first rank only."""
    cache, channels, targets = bundle.cache, bundle.channels, bundle.targets
    meta = cache.meta(name)
    shape = list(meta["preprocessed_shape"])
    got = infer_volume(model, lambda lo, hi: cache.image(name)[channels, lo:hi], shape, cfg.inference,
                       roi_size(cfg, bundle.patch_size), size_divisor(cfg.model), cfg.trainer.precision,
                       device, memory, report, lambda: case_image(bundle, name).to(device))
    if isinstance(got, torch.Tensor):  # sliding windows: every rank holds the whole logits
        return _case_scores_drawn(bundle, name, got, cfg.trainer.hd95, drawn)
    spacing = meta.get("target_spacing") or meta["spacing"]
    dice, hd, masks = slab_scores(model, targets, got, cache.label(name)[got.start:got.stop], spacing,
                                  cfg.trainer.hd95, lambda: cache.label(name), keep_masks=drawn)
    return dice, hd, targets.labels_from_masks(masks[None]) if drawn and masks is not None else None


def _case_scores_drawn(bundle, name: str, logits: torch.Tensor, with_hd95: bool, drawn: bool
                       ) -> tuple[list[float], list[float], torch.Tensor | None]:
    dice, hd = case_scores(bundle, name, logits, with_hd95)
    return dice, hd, bundle.targets.labels_from_logits(logits) if drawn else None


def case_image(bundle, name: str) -> torch.Tensor:
    """A cached case's selected channels as a (1, C, X, Y, Z) tensor (preprocessed space)."""
    return torch.from_numpy(np.stack([bundle.cache.image(name)[c] for c in bundle.channels]))[None]


def case_scores(bundle, name: str, logits: torch.Tensor, with_hd95: bool) -> tuple[list[float], list[float]]:
    """Dice and HD95 (mm, spacing from the cache metadata) per region/label of ``logits`` for a cached case.

    Args:
        bundle: the ``DataBundle``.
        name: the case.
        logits: (1, K, X, Y, Z) network outputs in the case's preprocessed space.
        with_hd95: compute HD95 (NaN otherwise).
    """
    label = torch.from_numpy(np.array(bundle.cache.label(name)))[None, None].to(logits.device)
    meta = bundle.cache.meta(name)
    return dice_hd95(bundle.targets.masks_from_logits(logits)[0], bundle.targets.masks_from_labels(label)[0],
                     meta.get("target_spacing") or meta["spacing"], with_hd95)


def config_from_checkpoint(ckpt: dict, changes: dict | None = None, run_dir: str | Path | None = None
                           ) -> DictConfig:
    """The checkpoint's training config with ``changes`` (``config.changes_from``: the settings a command line
    changed), checked and read-only; ``run_dir`` is where this command writes.

    Raises:
        ConfigError: a change does not fit the checkpoint's config (an ``inference.patch_size`` its model's
            strides cannot divide, say).
    """
    changes = dict(changes or {})
    if run_dir is not None:
        changes["run_dir"] = str(run_dir)
    return restore(ckpt["config"], changes)


def load_model(ckpt: dict, cfg, path: Path | None = None):
    """Rebuild the network of a checkpoint, load its weights (unsplit names) and apply ``cfg.parallel``
    (pipeline stages when ``parallel=pipeline``; under torchrun this rank's stage; whole volumes split
    into slabs when ``parallel=spatial``), in eval mode.

    Returns:
        (the module to run, the targets, this process's device, the run's ``ParallelDims``).

    Raises:
        CheckpointError: the weights do not fit the model the config describes (naming ``path``).
    """
    dims = resolve_dims(cfg)  # under torchrun: joins the job first, so the device is this rank's
    device = select_device(cfg)
    info = ckpt["data"]
    targets = Targets.from_config({int(k): v for k, v in info["labels"].items()}, cfg.data.regions)
    model = build_model(cfg.model, len(info["channels"]), targets.out_channels)
    load_weights(model, ckpt["model"], path, cfg.model.name)
    if cfg.trainer.channels_last:  # as trained: the faster 3D convolution layout (bf16 on CPU especially)
        model = model.to(memory_format=torch.channels_last_3d)
    shape = [len(info["channels"]), *info["patch_size"]]
    plan = plan_split(cfg, shape[0], targets.out_channels, shape, device, train=False)
    net = parallelize(model.to(device), dims, plan, device, cfg.trainer.precision, cfg.model, train=False)
    return inference_module(model, net, dims, size_divisor(cfg.model)).eval(), targets, device, dims
