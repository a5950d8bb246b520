"""``python -m lampseg bench NAME [overrides]``: run the benchmark module ``lampseg.bench.NAME``.

Each benchmark module has ``run(cfg[, overrides]) -> dict`` that writes ``bench_<name>.json`` and
``bench_<name>.png`` under ``cfg.run_dir``, prints where it wrote them, and returns the JSON's content.
See docs/BENCHMARKS.md.
"""
from __future__ import annotations

import importlib

from omegaconf import DictConfig

from lampseg.config import ConfigError, derive
from lampseg.runtime.device import planned_precision

# name -> whether its run() also takes the command line's overrides (it keeps a checkpoint's config but them)
BENCHMARKS = {"overhead": False, "pipeline": False, "inference": True, "context": False,
              "data_parallel": False, "experiment_parallel": True, "spatial": False}


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
    # trainer.precision=auto resolved once, as train resolves it, so that every arm and worker runs (and the
    # JSON records) the same precision.
    precision = planned_precision(cfg)
    cfg = derive(cfg, {"trainer.precision": precision.name}, check=False)
    print(f"bench {name}: {precision.line()}")
    # Imported by name: each benchmark pulls in what only it needs (Ray, torchrun workers).
    run = importlib.import_module(f"lampseg.bench.{name}").run
    return run(cfg, list(overrides or [])) if BENCHMARKS[name] else run(cfg)
