"""Benchmarks behind ``python -m lampseg bench NAME [overrides]``.

Each benchmark is a function ``run(cfg) -> dict`` that writes ``bench_<name>.json`` and ``bench_<name>.png``
under ``cfg.run_dir``, prints where it wrote them, and returns the JSON's content. See docs/BENCHMARKS.md.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from lampseg.config import ConfigError


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a torchrun rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_workers(module: str, nproc: int, spec_path: Path, out_path: Path, timeout_s: float,
                   threads: int | None = None) -> list[dict]:
    """``torchrun --nproc_per_node NPROC -m MODULE SPEC OUT`` on 127.0.0.1 with ``threads`` per process
    (default ``$OMP_NUM_THREADS``, else 1); returns the JSON list the job's rank 0 wrote to ``out_path``.

    Raises:
        RuntimeError: the job failed (with the end of its error output).
    """
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads or os.environ.get("OMP_NUM_THREADS", "1"))}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={port}", "-m", module, str(spec_path),
               str(out_path)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"bench: the {nproc}-process job of {module} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-4000:]}")
    return json.loads(Path(out_path).read_text())


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


def _data_parallel(cfg: DictConfig, overrides: list[str]) -> dict:
    from lampseg.bench.data_parallel import run

    return run(cfg)


def _experiment_parallel(cfg: DictConfig, overrides: list[str]) -> dict:
    from lampseg.bench.experiment_parallel import run

    return run(cfg, overrides)


BENCHMARKS: dict[str, Callable[[DictConfig, list[str]], dict]] = {
    "overhead": _overhead, "pipeline": _pipeline, "inference": _inference, "context": _context,
    "data_parallel": _data_parallel, "experiment_parallel": _experiment_parallel}


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
