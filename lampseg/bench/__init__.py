"""Benchmarks behind ``python -m lampseg bench NAME [overrides]``.

Each benchmark is a function ``run(cfg) -> dict`` that writes ``bench_<name>.json`` and ``bench_<name>.png``
under ``cfg.run_dir``, prints where it wrote them, and returns the JSON's content. See docs/BENCHMARKS.md.
"""
from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig

from lampseg.config import ConfigError


def _overhead(cfg: DictConfig, overrides: list[str]) -> dict:
    from lampseg.bench.overhead import run

    return run(cfg)


def _pipeline(cfg: DictConfig, overrides: list[str]) -> dict:
    from lampseg.bench.pipeline import run

    return run(cfg)


def _inference(cfg: DictConfig, overrides: list[str]) -> dict:
    from lampseg.bench.inference import run

    return run(cfg, overrides)


def _context(cfg: DictConfig, overrides: list[str]) -> dict:
    from lampseg.bench.context import run

    return run(cfg)


BENCHMARKS: dict[str, Callable[[DictConfig, list[str]], dict]] = {
    "overhead": _overhead, "pipeline": _pipeline, "inference": _inference, "context": _context}


def run_bench(cfg: DictConfig, overrides: list[str] | None = None) -> dict:
    """Run the benchmark named ``cfg.bench.name``.

    Args:
        cfg: the composed config; ``cfg.bench`` holds the benchmark name and its step counts.
        overrides: the command line's overrides (``bench inference`` keeps the checkpoint's config
            except for these).

    Returns:
        The benchmark's result (what it wrote as JSON).

    Raises:
        ConfigError: the name is not a known benchmark.
    """
    name = cfg.bench.name
    if name not in BENCHMARKS:
        raise ConfigError(f"config key 'bench.name': expected one of {', '.join(sorted(BENCHMARKS))}, "
                          f"got {name!r}")
    return BENCHMARKS[name](cfg, list(overrides or []))
