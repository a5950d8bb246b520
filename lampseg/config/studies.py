"""Checks of the tools' sections: ``bench``, ``doctor``, ``tune`` and ``loo`` (``checks.validate`` runs them).

The names of the benchmarks and of doctor's checks live here, in the lowest layer, so that a typo fails
before any work; ``bench/cli.py`` and ``doctor/checks.py`` keep the same names (tests/test_config.py checks).
"""
from __future__ import annotations

from omegaconf import DictConfig

from lampseg.config.rules import (
    as_list,
    at_least,
    fail,
    in_range,
    is_int,
    numbers_in,
    one_of,
    positive_ints,
    seconds,
)
from lampseg.config.schema import enum_value

BENCH_NAMES = ("overhead", "pipeline", "inference", "context", "data_parallel", "experiment_parallel",
               "spatial")
DOCTOR_CHECKS = ("single", "ddp", "pipeline", "spatial", "inference")


def _check_bench_lists(b: DictConfig) -> None:
    for key in ("pp", "microbatches", "windows", "widths", "processes", "sp"):
        positive_ints(f"bench.{key}", b[key])
    numbers_in("bench.overlaps", b.overlaps, 0, 1, open_high=True)
    if b.auto_budgets_gb is not None:
        numbers_in("bench.auto_budgets_gb", b.auto_budgets_gb, 0, open_low=True)
    sizes = as_list(b.patch_sizes)
    if not sizes or not all(s == "whole" or (is_int(s) and s > 0) for s in sizes):
        fail("bench.patch_sizes", "a non-empty list of positive cube sides or 'whole'", b.patch_sizes)


def _check_bench_name(cfg: DictConfig, divisor: int) -> None:
    """What only the named benchmark uses, against the model and the patch it runs."""
    b, norm = cfg.bench, enum_value(cfg.model.norm)
    blocks = 2 * len(cfg.model.strides) + 1
    patch = cfg.data.patch_size
    if b.name == "pipeline" and max(b.pp) > blocks:
        fail("bench.pp", f"at most {blocks} stages (the model's blocks)", b.pp)
    if b.name == "spatial" and not isinstance(patch, str) and patch[0] < divisor * max(b.sp):
        fail("bench.sp", f"slabs of at least {divisor} rows each (data.patch_size[0]={patch[0]} rows, the "
             f"model's size divisor {divisor}): at most {patch[0] // divisor}", b.sp)
    if b.name == "context":
        for size in (s for s in b.patch_sizes if s != "whole"):
            if size % divisor or (norm == "instance" and size == divisor):
                fail("bench.patch_sizes", f"cube sides that are multiples of {divisor} (the product of "
                     f"model.strides), larger than {divisor} under model.norm=instance, or 'whole'",
                     b.patch_sizes)


def check_bench(cfg: DictConfig, divisor: int) -> None:
    """``bench.*``: every key, whichever benchmark runs; the named one's against the model."""
    b = cfg.bench
    if b.name is not None:
        one_of([("bench.name", b.name, BENCH_NAMES)])
    at_least([("bench.steps", b.steps, 1), ("bench.warmup", b.warmup, 0), ("bench.repeats", b.repeats, 1),
              ("bench.cases", b.cases, 0), ("bench.trials", b.trials, 1), ("bench.workers", b.workers, 1)])
    in_range("bench.memory_gb", b.memory_gb, 0, open_low=True)
    seconds("bench.timeout_s", b.timeout_s)
    _check_bench_lists(b)
    _check_bench_name(cfg, divisor)


def check_doctor(d: DictConfig) -> None:
    """``doctor.checks``: a non-empty list of known checks; ``doctor.timeout_s``: positive seconds."""
    checks = as_list(d.checks)
    if not checks or not all(c in DOCTOR_CHECKS for c in checks):
        fail("doctor.checks", "a non-empty list of " + "|".join(DOCTOR_CHECKS), d.checks)
    seconds("doctor.timeout_s", d.timeout_s)


def check_tune(tu: DictConfig) -> None:
    """``tune.*`` but its search space (``tune/space.py`` checks that before any trial starts)."""
    at_least([("tune.num_samples", tu.num_samples, 1), ("tune.max_concurrent", tu.max_concurrent, 0),
              ("tune.max_failures", tu.max_failures, 0), ("tune.keep_checkpoints", tu.keep_checkpoints, 1),
              ("tune.asha.grace_period", tu.asha.grace_period, 1),
              ("tune.pbt.perturbation_interval", tu.pbt.perturbation_interval, 1)])
    at_least([("tune.num_cpus", tu.num_cpus, 1), ("tune.num_gpus", tu.num_gpus, 0),
              ("tune.asha.max_t", tu.asha.max_t, 1)], null=True)
    r = tu.resources
    in_range("tune.resources.cpu", r.cpu, 0)
    in_range("tune.resources.gpu", r.gpu, 0)
    if r.cpu + r.gpu <= 0:
        fail("tune.resources", "{cpu: N, gpu: M} with N, M >= 0 and something to run on", dict(r))
    seconds("tune.time_budget_s", tu.time_budget_s, null=True)
    in_range("tune.asha.reduction_factor", tu.asha.reduction_factor, 1, open_low=True)
    in_range("tune.pbt.quantile_fraction", tu.pbt.quantile_fraction, 0, 0.5)
    in_range("tune.pbt.resample_probability", tu.pbt.resample_probability, 0, 1)
    one_of([("tune.search", tu.search, ("grid", "random", "optuna")),
            ("tune.scheduler", tu.scheduler, ("fifo", "asha", "pbt")),
            ("tune.mode", tu.mode, ("max", "min")),
            ("tune.verbose", tu.verbose, (0, 1, 2))])


def check_loo(loo: DictConfig) -> None:
    """``loo.*``: folds, the paired test, the confidence level, the checkpoint scored."""
    if not (loo.folds == "patients" or (is_int(loo.folds) and loo.folds >= 2)):
        fail("loo.folds", "an integer >= 2 or 'patients'", loo.folds)
    in_range("loo.confidence", loo.confidence, 0.5, 1, open_high=True)
    one_of([("loo.test", loo.test, ("wilcoxon", "ttest")),
            ("loo.checkpoint", loo.checkpoint, ("final", "best"))])


def check_studies(cfg: DictConfig, divisor: int) -> None:
    """The tools' sections (``divisor``: the model's size divisor, for the named benchmark)."""
    check_bench(cfg, divisor)
    check_doctor(cfg.doctor)
    check_tune(cfg.tune)
    check_loo(cfg.loo)
