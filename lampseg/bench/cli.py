"""``python -m lampseg bench NAME [overrides]``: run the benchmark ``BENCHMARKS[NAME]``.

Each benchmark module has ``run(cfg[, overrides]) -> dict`` that writes ``bench_<name>.json`` and
``bench_<name>.png`` under ``cfg.run_dir``, prints where it wrote them, and returns the JSON's content.
See docs/BENCHMARKS.md.
"""
from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig

from lampseg.bench import context, data_parallel, experiment_parallel, inference, overhead, pipeline, spatial
from lampseg.config import ConfigError, derive
from lampseg.runtime.device import planned_precision

# name -> the benchmark, called with the config and the command line's overrides (bench inference keeps its
# checkpoint's config but the settings they change; bench experiment_parallel passes them to its trials)
BENCHMARKS: dict[str, Callable[[DictConfig, list[str]], dict]] = {
    "overhead": lambda cfg, overrides: overhead.run(cfg),
    "pipeline": lambda cfg, overrides: pipeline.run(cfg),
    "inference": inference.run,
    "context": lambda cfg, overrides: context.run(cfg),
    "data_parallel": lambda cfg, overrides: data_parallel.run(cfg),
    "experiment_parallel": experiment_parallel.run,
    "spatial": lambda cfg, overrides: spatial.run(cfg),
}


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
    return BENCHMARKS[name](cfg, list(overrides or []))
