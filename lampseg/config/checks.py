"""What the typed schema cannot express: ranges, shapes and cross-field rules, one function per section.

``validate(cfg)`` runs them all before any heavy work; each raises ``ConfigError`` naming the key, what would
work and what it got. The rules for single values are in ``rules``; ``studies`` checks the sections of the
tools (``bench``, ``doctor``, ``tune``, ``loo``).
"""
from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig

from lampseg.config.rules import (
    as_list,
    at_least,
    fail,
    in_range,
    is_int,
    is_number,
    one_of,
    positive_ints,
    seconds,
)
from lampseg.config.schema import BACKENDS, LR_SCALING
from lampseg.config.studies import check_studies

MAX_SEED = 2**32  # NumPy's RandomState (Optuna's and Tune's samplers) takes seeds below 2**32


def patch_size_of(cfg: DictConfig) -> list[int] | None:
    """``data.patch_size`` as three ints, or None for whole-volume training and ``auto`` (chosen from the
    data by ``parallel.patch.auto_patch_size``)."""
    value = cfg.data.patch_size
    if isinstance(value, str):
        if value not in ("whole", "auto"):
            fail("data.patch_size", "a list of 3 positive integers, 'whole' or 'auto'", value)
        return None
    return positive_ints("data.patch_size", value, 3)


def is_auto_patch(cfg: DictConfig) -> bool:
    """``data.patch_size=auto``: the largest patch that fits the memory budget."""
    return isinstance(cfg.data.patch_size, str) and cfg.data.patch_size == "auto"


def check_patch(key: str, patch: list[int], divisor: int, norm: str, sp: int = 1) -> None:
    """A patch (or window) the model takes: multiples of ``divisor`` (the product of ``model.strides``), a
    bottleneck larger than 1x1x1 under instance normalisation, and under ``parallel.sp`` slabs a first size
    of at least ``sp`` multiples of the divisor (``data.sampling.split_rows``: each slab a multiple of it)."""
    if any(v % divisor for v in patch):
        fail(key, f"multiples of {divisor} (the product of model.strides)", patch)
    if norm == "instance" and all(v == divisor for v in patch):
        # The bottleneck would be 1x1x1: instance normalisation has nothing to normalise over.
        fail(key, f"a patch larger than {divisor}^3 in at least one axis (model.norm=instance cannot "
             f"normalise the 1x1x1 bottleneck this patch leaves after model.strides)", patch)
    if sp > 1 and patch[0] < divisor * sp:
        fail(key, f"a first size of at least {divisor * sp} (parallel.sp={sp} slabs, each a multiple of the "
             f"model's size divisor {divisor})", patch)


def _check_seed(key: str, value: int) -> None:
    if not 0 <= value < MAX_SEED:
        fail(key, f"an integer in [0, 2**32) = [0, {MAX_SEED})", value)


def _check_modalities(value: Any) -> None:
    if value is None:
        return
    items = as_list(value)
    if not items or not all(isinstance(m, str) or (is_int(m) and m >= 0) for m in items) \
            or len(set(items)) != len(items):
        fail("data.modalities", "null (every modality) or a non-empty list of distinct modality names or "
             "channel indices >= 0", value)


def _check_data(d: DictConfig) -> None:
    if not is_int(d.fold) or not 0 <= d.fold < d.folds:
        fail("data.fold", f"0 <= fold < data.folds ({d.folds})", d.fold)
    in_range("data.foreground_ratio", d.foreground_ratio, 0, 1)
    positive_ints("data.synthetic.shape", d.synthetic.shape, 3)
    _check_seed("data.synthetic.seed", d.synthetic.seed)
    one_of([("data.synthetic.layout", d.synthetic.layout, ("4d", "3d")),
            ("data.synthetic.kind", d.synthetic.kind, ("brats", "known_importance")),
            ("data.synthetic.context", d.synthetic.context, ("none", "laterality")),
            ("data.nonfinite", d.nonfinite, ("error", "zero"))])
    if d.target_spacing is not None:
        spacing = as_list(d.target_spacing)  # None: an interpolation that resolved to a non-list
        if spacing is None or len(spacing) != 3 or not all(is_number(v) and v > 0 for v in spacing):
            fail("data.target_spacing", "3 positive numbers or null", spacing or d.target_spacing)
    if d.regions is not None:
        if not d.regions:
            fail("data.regions", "a non-empty mapping name -> label values, or null", dict(d.regions))
        for name, labels in d.regions.items():
            positive_ints(f"data.regions.{name}", labels)
    _check_modalities(d.modalities)
    a = d.augment
    for key in ("flip_prob", "intensity_prob", "rotate_prob"):
        in_range(f"data.augment.{key}", a[key], 0, 1)
    in_range("data.augment.rotate_degrees", a.rotate_degrees, 0, 180)


def _check_model(m: DictConfig, pp: int) -> int:
    """The model section; returns the network's spatial divisor (the product of the strides)."""
    channels = positive_ints("model.channels", m.channels)
    strides = positive_ints("model.strides", m.strides)
    if len(strides) != len(channels) - 1:
        fail("model.strides", f"len(model.channels) - 1 = {len(channels) - 1} entries", list(strides))
    if m.kernel_size < 1 or m.kernel_size % 2 == 0:
        fail("model.kernel_size", "an odd integer >= 1 (MONAI's U-Net pads kernel_size // 2 on each side)",
             m.kernel_size)
    at_least([("model.num_res_units", m.num_res_units, 0)])
    in_range("model.dropout", m.dropout, 0, 1, open_high=True)
    blocks = 2 * len(strides) + 1  # the U-Net's pipeline blocks: a down block per level, bottom, up blocks
    if pp > blocks:
        fail("parallel.pp", f"at most {blocks} stages (the model has {blocks} blocks: {len(strides)} down, "
             f"bottom, {len(strides)} up)", pp)
    return math.prod(strides)


def _check_curriculum(t: DictConfig, divisor: int, norm: str, sp: int) -> None:
    if (t.curriculum is None) != (t.curriculum_epochs is None):
        fail("trainer.curriculum_epochs", "epochs per phase exactly when trainer.curriculum is set",
             t.curriculum_epochs)
    if t.curriculum is None:
        return
    if not t.curriculum or len(t.curriculum) != len(t.curriculum_epochs):
        fail("trainer.curriculum_epochs", f"one positive integer per trainer.curriculum phase "
             f"({len(t.curriculum)})", list(t.curriculum_epochs))
    positive_ints("trainer.curriculum_epochs", t.curriculum_epochs)
    for k, phase in enumerate(t.curriculum):
        if isinstance(phase, str):
            if phase != "whole":
                fail(f"trainer.curriculum[{k}]", "a list of 3 positive integers or 'whole'", phase)
        else:
            check_patch(f"trainer.curriculum[{k}]", positive_ints(f"trainer.curriculum[{k}]", phase, 3),
                        divisor, norm, sp)


def _check_optim(o: DictConfig, max_epochs: int) -> None:
    in_range("optim.lr", o.lr, 0, open_low=True)
    in_range("optim.grad_clip", o.grad_clip, 0, open_low=True, null=True)
    in_range("optim.weight_decay", o.weight_decay, 0)
    in_range("optim.momentum", o.momentum, 0, 1, open_high=True)
    if o.name == "sgd" and o.nesterov and o.momentum == 0:
        fail("optim.momentum", "a momentum > 0 with optim.nesterov=true (or optim.nesterov=false)",
             o.momentum)
    in_range("optim.poly_power", o.poly_power, 0)
    in_range("optim.focal_weight", o.focal_weight, 0)
    for key in ("beta1", "beta2"):
        in_range(f"optim.{key}", o[key], 0, 1, open_high=True)
    if o.lr_scaling not in LR_SCALING:
        fail("optim.lr_scaling", "one of " + "|".join(LR_SCALING), o.lr_scaling)
    if not 0 <= o.warmup_epochs <= max_epochs:
        fail("optim.warmup_epochs", f"0 to trainer.max_epochs ({max_epochs})", o.warmup_epochs)


def _check_trainer(t: DictConfig) -> None:
    if t.resume not in ("auto", "never") and not str(t.resume).endswith(".pt"):
        fail("trainer.resume", "'auto', 'never' or a path to a .pt checkpoint", t.resume)
    device = str(t.device)
    if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        fail("trainer.device", "'auto', 'cpu', 'cuda' or 'cuda:N'", t.device)
    at_least([("trainer.max_epochs", t.max_epochs, 1), ("trainer.val_every", t.val_every, 1),
              ("trainer.max_nan_steps", t.max_nan_steps, 1), ("trainer.val_overlays", t.val_overlays, 0)])
    at_least([("trainer.num_threads", t.num_threads, 1), ("trainer.val_max_cases", t.val_max_cases, 1),
              ("trainer.stop_after_epochs", t.stop_after_epochs, 1),
              ("trainer.fail_at_epoch", t.fail_at_epoch, 1)], null=True)


def _check_inference(cfg: DictConfig, divisor: int) -> None:
    i, p = cfg.inference, cfg.parallel
    in_range("inference.overlap", i.overlap, 0, 1, open_high=True)
    at_least([("inference.sw_batch_size", i.sw_batch_size, 1)])
    at_least([("inference.devices", i.devices, 1)], null=True)
    in_range("inference.memory_gb", i.memory_gb, 0, open_low=True, null=True)
    if i.patch_size is not None:
        window = positive_ints("inference.patch_size", i.patch_size, 3)
        if checkpoint_of(cfg) is None:  # with a checkpoint the model (its divisor) is the checkpoint's
            check_patch("inference.patch_size", window, divisor, cfg.model.norm, p.sp)


def checkpoint_of(cfg: DictConfig) -> str | None:
    """The checkpoint a subcommand was given (``evaluate``/``predict``/``visualize``/``bench``/``export``
    ``ckpt=``)."""
    given = [cfg[section].ckpt for section in ("evaluate", "predict", "visualize", "bench", "export")]
    return next((c for c in given if c is not None), None)


def _check_commands(cfg: DictConfig) -> None:
    """Keys of single subcommands (visualize) and the run's seed."""
    slices = cfg.visualize.slices
    if slices is not None and (len(slices) != 3 or min(slices) < 0):
        fail("visualize.slices", "3 voxel indices [x, y, z], each >= 0", list(slices))
    _check_seed("seed", cfg.seed)


def _check_parallel(p: DictConfig, batch_size: int) -> None:
    at_least([("parallel.pp", p.pp, 1), ("parallel.sp", p.sp, 1)])
    at_least([("parallel.dp", p.dp, 1), ("parallel.devices", p.devices, 1),
              ("parallel.microbatches", p.microbatches, 1)], null=True)
    if p.backend not in BACKENDS:
        fail("parallel.backend", "one of " + "|".join(BACKENDS), p.backend)
    seconds("parallel.timeout_s", p.timeout_s)
    if p.microbatches is not None and batch_size % p.microbatches:
        fail("parallel.microbatches", f"a divisor of data.batch_size ({batch_size}) or null (auto)",
             p.microbatches)
    in_range("parallel.memory_gb", p.memory_gb, 0, open_low=True, null=True)
    in_range("parallel.device_tflops", p.device_tflops, 0, open_low=True)
    one_of([("parallel.schedule", p.schedule, ("gpipe", "1f1b"))])  # "1f1b" cannot be an enum name


def _check_sizes(cfg: DictConfig) -> None:
    d = cfg.data
    workers = d.num_workers
    if workers != "auto" and (not is_int(workers) or workers < 0):
        fail("data.num_workers", "auto or an integer >= 0", workers)
    at_least([("data.batch_size", d.batch_size, 1), ("data.samples_per_epoch", d.samples_per_epoch, 1),
              ("data.folds", d.folds, 2), ("data.synthetic.cases", d.synthetic.cases, 2)])


def validate(cfg: DictConfig) -> None:
    """Check value ranges and cross-field rules that the typed schema cannot express.

    Args:
        cfg: the composed config.

    Raises:
        ConfigError: naming the first offending key.
    """
    d, m, t, p = cfg.data, cfg.model, cfg.trainer, cfg.parallel
    _check_sizes(cfg)
    patch = patch_size_of(cfg)
    _check_parallel(p, d.batch_size)
    _check_data(d)
    divisor = _check_model(m, p.pp)
    if patch is not None:
        check_patch("data.patch_size", patch, divisor, m.norm, p.sp)
    _check_trainer(t)
    _check_curriculum(t, divisor, m.norm, p.sp)
    _check_optim(cfg.optim, t.max_epochs)
    _check_inference(cfg, divisor)
    _check_commands(cfg)
    check_studies(cfg, divisor)
