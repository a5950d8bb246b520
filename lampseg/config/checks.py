"""What the typed schema cannot express: ranges, shapes and cross-field rules, one function per section.

``validate(cfg)`` runs them all before any heavy work; each raises ``ConfigError`` naming the key.
"""
from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig, ListConfig

from lampseg.config.schema import BACKENDS, LR_SCALING, ConfigError, enum_value


def _fail(key: str, expected: str, got: Any) -> None:
    raise ConfigError(f"config key '{key}': expected {expected}, got {got!r}")


def _at_least(checks: list[tuple[str, Any, int]]) -> None:
    """Each ``(key, value, lowest)``: an integer >= lowest."""
    for key, value, lo in checks:
        if value < lo:
            _fail(key, f"an integer >= {lo}", value)


def _one_of(checks: list[tuple[str, Any, tuple]]) -> None:
    """Each ``(key, value, allowed)``: one of the allowed values."""
    for key, value, allowed in checks:
        if value not in allowed:
            _fail(key, "one of " + "|".join(str(a) for a in allowed), value)


def _positive_ints(key: str, value: Any, length: int | None = None) -> list[int]:
    items = list(value) if isinstance(value, (list, tuple, ListConfig)) else None
    if items is None or not items or not all(isinstance(v, int) and v > 0 for v in items):
        _fail(key, "a list of positive integers", value)
    if length is not None and len(items) != length:
        _fail(key, f"{length} entries", value)
    return items


def patch_size_of(cfg: DictConfig) -> list[int] | None:
    """``data.patch_size`` as three ints, or None for whole-volume training and ``auto`` (chosen from the
    data by ``parallel.patch.auto_patch_size``)."""
    value = cfg.data.patch_size
    if isinstance(value, str):
        if value not in ("whole", "auto"):
            _fail("data.patch_size", "a list of 3 positive integers, 'whole' or 'auto'", value)
        return None
    return _positive_ints("data.patch_size", value, 3)


def is_auto_patch(cfg: DictConfig) -> bool:
    """``data.patch_size=auto``: the largest patch that fits the memory budget."""
    return isinstance(cfg.data.patch_size, str) and cfg.data.patch_size == "auto"


def _check_patch(key: str, patch: list[int], divisor: int, norm: str) -> None:
    if any(v % divisor for v in patch):
        _fail(key, f"multiples of {divisor} (the product of model.strides)", patch)
    if norm == "instance" and all(v == divisor for v in patch):
        # The bottleneck would be 1x1x1: instance normalisation has nothing to normalise over.
        _fail(key, f"a patch larger than {divisor}^3 in at least one axis (model.norm=instance cannot "
              f"normalise the 1x1x1 bottleneck this patch leaves after model.strides)", patch)


def _check_data(d: DictConfig) -> None:
    if not 0 <= d.fold < d.folds:
        _fail("data.fold", f"0 <= fold < data.folds ({d.folds})", d.fold)
    if not 0.0 <= d.foreground_ratio <= 1.0:
        _fail("data.foreground_ratio", "a number in [0, 1]", d.foreground_ratio)
    _positive_ints("data.synthetic.shape", d.synthetic.shape, 3)
    _one_of([("data.synthetic.layout", d.synthetic.layout, ("4d", "3d")),
             ("data.synthetic.kind", d.synthetic.kind, ("brats", "known_importance")),
             ("data.synthetic.context", d.synthetic.context, ("none", "laterality")),
             ("data.nonfinite", d.nonfinite, ("error", "zero"))])
    if d.target_spacing is not None and (len(d.target_spacing) != 3 or min(d.target_spacing) <= 0):
        _fail("data.target_spacing", "3 positive numbers or null", list(d.target_spacing))
    if d.regions is not None:
        if not d.regions:
            _fail("data.regions", "a non-empty mapping name -> label values, or null", dict(d.regions))
        for name, labels in d.regions.items():
            _positive_ints(f"data.regions.{name}", labels)


def _check_model(m: DictConfig, pp: int) -> int:
    """The model section; returns the network's spatial divisor (the product of the strides)."""
    channels = _positive_ints("model.channels", m.channels)
    strides = _positive_ints("model.strides", m.strides)
    if len(strides) != len(channels) - 1:
        _fail("model.strides", f"len(model.channels) - 1 = {len(channels) - 1} entries", list(strides))
    blocks = 2 * len(strides) + 1  # the U-Net's pipeline blocks: a down block per level, bottom, up blocks
    if pp > blocks:
        _fail("parallel.pp", f"at most {blocks} stages (the model has {blocks} blocks: {len(strides)} down, "
              f"bottom, {len(strides)} up)", pp)
    return math.prod(strides)


def _check_curriculum(t: DictConfig, divisor: int, norm: str) -> None:
    if (t.curriculum is None) != (t.curriculum_epochs is None):
        _fail("trainer.curriculum_epochs", "epochs per phase exactly when trainer.curriculum is set",
              t.curriculum_epochs)
    if t.curriculum is None:
        return
    if not t.curriculum or len(t.curriculum) != len(t.curriculum_epochs):
        _fail("trainer.curriculum_epochs", f"one positive integer per trainer.curriculum phase "
              f"({len(t.curriculum)})", list(t.curriculum_epochs))
    _positive_ints("trainer.curriculum_epochs", t.curriculum_epochs)
    for k, phase in enumerate(t.curriculum):
        if isinstance(phase, str):
            if phase != "whole":
                _fail(f"trainer.curriculum[{k}]", "a list of 3 positive integers or 'whole'", phase)
        else:
            _check_patch(f"trainer.curriculum[{k}]", _positive_ints(f"trainer.curriculum[{k}]", phase, 3),
                         divisor, norm)


def _check_optim(o: DictConfig, max_epochs: int) -> None:
    if o.lr <= 0:
        _fail("optim.lr", "a positive number", o.lr)
    if o.grad_clip is not None and o.grad_clip <= 0:
        _fail("optim.grad_clip", "a positive number or null", o.grad_clip)
    if not 0 <= o.warmup_epochs <= max_epochs:
        _fail("optim.warmup_epochs", f"0 to trainer.max_epochs ({max_epochs})", o.warmup_epochs)


def _check_trainer(t: DictConfig) -> None:
    if t.resume not in ("auto", "never") and not str(t.resume).endswith(".pt"):
        _fail("trainer.resume", "'auto', 'never' or a path to a .pt checkpoint", t.resume)
    if t.device not in ("auto", "cpu") and not str(t.device).startswith("cuda"):
        _fail("trainer.device", "'auto', 'cpu' or 'cuda[:N]'", t.device)
    if t.val_overlays < 0:
        _fail("trainer.val_overlays", "an integer >= 0", t.val_overlays)


def _check_inference(i: DictConfig) -> None:
    if not 0.0 <= i.overlap < 1.0:
        _fail("inference.overlap", "a number in [0, 1)", i.overlap)
    if i.patch_size is not None:
        _positive_ints("inference.patch_size", i.patch_size, 3)


def _check_commands(cfg: DictConfig) -> None:
    """Keys of single subcommands (visualize)."""
    if cfg.slices is not None and (len(cfg.slices) != 3 or min(cfg.slices) < 0):
        _fail("slices", "3 voxel indices [x, y, z], each >= 0", list(cfg.slices))


def _check_parallel(p: DictConfig, o: DictConfig, batch_size: int) -> None:
    if p.dp is not None and p.dp < 1:
        _fail("parallel.dp", "an integer >= 1, or null (WORLD_SIZE / parallel.pp)", p.dp)
    if o.lr_scaling not in LR_SCALING:
        _fail("optim.lr_scaling", "one of " + "|".join(LR_SCALING), o.lr_scaling)
    if p.backend not in BACKENDS:
        _fail("parallel.backend", "one of " + "|".join(BACKENDS), p.backend)
    if p.timeout_s <= 0:
        _fail("parallel.timeout_s", "a positive number of seconds", p.timeout_s)
    if p.microbatches is not None and batch_size % p.microbatches:
        _fail("parallel.microbatches", f"a divisor of data.batch_size ({batch_size}) or null (auto)",
              p.microbatches)
    for key, value in [("optim.beta1", o.beta1), ("optim.beta2", o.beta2)]:
        if not 0.0 <= value < 1.0:
            _fail(key, "a number in [0, 1)", value)


def _check_studies(cfg: DictConfig) -> None:
    """``tune.*`` and ``loo.*``."""
    tu, loo = cfg.tune, cfg.loo
    _at_least([("tune.num_samples", tu.num_samples, 1), ("tune.max_concurrent", tu.max_concurrent, 0),
               ("tune.max_failures", tu.max_failures, 0), ("tune.keep_checkpoints", tu.keep_checkpoints, 1),
               ("tune.asha.grace_period", tu.asha.grace_period, 1),
               ("tune.pbt.perturbation_interval", tu.pbt.perturbation_interval, 1)])
    if tu.resources.cpu < 0 or tu.resources.gpu < 0 or tu.resources.cpu + tu.resources.gpu <= 0:
        _fail("tune.resources", "{cpu: N, gpu: M} with N, M >= 0 and something to run on",
              dict(tu.resources))
    if not (loo.folds == "patients" or (isinstance(loo.folds, int) and not isinstance(loo.folds, bool)
                                        and loo.folds >= 2)):
        _fail("loo.folds", "an integer >= 2 or 'patients'", loo.folds)
    if not 0.5 <= loo.confidence < 1.0:
        _fail("loo.confidence", "a number in [0.5, 1)", loo.confidence)


def _check_choices(cfg: DictConfig) -> None:
    """String choices the schema keeps as plain strings (searched by Ray Tune as such, or not names)."""
    tu, p = cfg.tune, cfg.parallel
    _one_of([("loo.test", cfg.loo.test, ("wilcoxon", "ttest")),
             ("loo.checkpoint", cfg.loo.checkpoint, ("final", "best")),
             ("tune.search", tu.search, ("grid", "random", "optuna")),
             ("tune.scheduler", tu.scheduler, ("fifo", "asha", "pbt")),
             ("tune.mode", tu.mode, ("max", "min")),
             ("tune.verbose", tu.verbose, (0, 1, 2)),
             ("parallel.schedule", p.schedule, ("gpipe", "1f1b"))])  # "1f1b" cannot be an enum name


def _check_budgets(cfg: DictConfig) -> None:
    i, p = cfg.inference, cfg.parallel
    if i.devices is not None and i.devices < 1:
        _fail("inference.devices", "a positive number of devices or null (the visible GPUs)", i.devices)
    if i.memory_gb is not None and i.memory_gb <= 0:
        _fail("inference.memory_gb", "a positive number of GB or null (the device's free memory)",
              i.memory_gb)
    if p.memory_gb is not None and p.memory_gb <= 0:
        _fail("parallel.memory_gb", "a positive number of GB or null", p.memory_gb)


def validate(cfg: DictConfig) -> None:
    """Check value ranges and cross-field rules that the typed schema cannot express.

    Args:
        cfg: the composed config.

    Raises:
        ConfigError: naming the first offending key.
    """
    d, m, t, p = cfg.data, cfg.model, cfg.trainer, cfg.parallel
    patch = patch_size_of(cfg)
    workers = d.num_workers
    if workers != "auto" and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        _fail("data.num_workers", "auto or an integer >= 0", workers)
    _at_least([("data.batch_size", d.batch_size, 1),
               ("data.samples_per_epoch", d.samples_per_epoch, 1), ("data.folds", d.folds, 2),
               ("trainer.max_epochs", t.max_epochs, 1), ("trainer.val_every", t.val_every, 1),
               ("trainer.max_nan_steps", t.max_nan_steps, 1), ("data.synthetic.cases", d.synthetic.cases, 2),
               ("inference.sw_batch_size", cfg.inference.sw_batch_size, 1), ("parallel.dp", p.dp or 1, 1),
               ("parallel.pp", p.pp, 1), ("parallel.sp", p.sp, 1),
               ("parallel.microbatches", p.microbatches or 1, 1)])
    _check_data(d)
    divisor = _check_model(m, p.pp)
    if patch is not None:
        _check_patch("data.patch_size", list(patch), divisor, enum_value(m.norm))
        if p.sp > 1 and patch[0] < divisor * p.sp:
            _fail("data.patch_size", f"a first size of at least {divisor * p.sp} (parallel.sp={p.sp} slabs, "
                  f"each a multiple of the model's size divisor {divisor})", list(patch))
    _check_curriculum(t, divisor, enum_value(m.norm))
    if not 0.0 <= m.dropout < 1.0:
        _fail("model.dropout", "a number in [0, 1)", m.dropout)
    _check_optim(cfg.optim, t.max_epochs)
    _check_trainer(t)
    _check_inference(cfg.inference)
    _check_commands(cfg)
    _check_parallel(p, cfg.optim, d.batch_size)
    _check_studies(cfg)
    _check_choices(cfg)
    _check_budgets(cfg)
