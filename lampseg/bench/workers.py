"""Multi-process benchmarks' launcher: ``torchrun`` jobs on 127.0.0.1 whose rank 0 writes a JSON result, and
the start every rank of such a job shares."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from lampseg.config import Config
from lampseg.model.losses import Targets
from lampseg.runtime import distributed
from lampseg.runtime.device import resolve_device
from lampseg.runtime.launcher import run_job


def launch_workers(module: str, nproc: int, spec_path: Path, out_path: Path, timeout_s: float,
                   threads: int | None = None) -> list[dict]:
    """``torchrun --nproc_per_node NPROC -m MODULE SPEC OUT`` on 127.0.0.1 (``runtime.launcher.run_job``:
    loopback only, every process ended on a timeout) with ``threads`` per process (default
    ``$OMP_NUM_THREADS``, else 1); returns the JSON list the job's rank 0 wrote to ``out_path``.

    Raises:
        JobError: the job failed, or outlived ``timeout_s`` (``bench.timeout_s``), with the end of its output.
    """
    threads = str(threads or os.environ.get("OMP_NUM_THREADS", "1"))
    run_job(["-m", module, spec_path, out_path], nproc, timeout_s=timeout_s,
            name=f"bench: the {nproc}-process job of {module}", timeout_key="bench.timeout_s",
            env={"OMP_NUM_THREADS": threads})
    return json.loads(Path(out_path).read_text())


def start_worker(config_path: str) -> tuple[dict, DictConfig, torch.device]:
    """A benchmark rank's start: its job spec and config (``spec["config"]`` over the schema), one thread
    (or ``trainer.num_threads``), the torchrun job joined, and this rank's device."""
    spec = json.loads(Path(config_path).read_text())
    cfg = OmegaConf.merge(OmegaConf.structured(Config), spec["config"])
    torch.set_num_threads(cfg.trainer.num_threads or 1)
    distributed.init_from_env(alone=True)
    return spec, cfg, distributed.local_device(resolve_device(cfg.trainer.device))


def random_batch(spec: dict, cfg: DictConfig, batch: int
                 ) -> tuple[Targets, torch.Tensor, torch.Tensor]:
    """The job's random batch: ``(targets, image, loss target)`` of ``batch`` samples of ``spec["patch"]``
    with ``spec["in_channels"]`` channels, labels drawn from ``spec["labels"]``, seeded by ``cfg.seed``."""
    labels, patch = spec["labels"], spec["patch"]
    targets = Targets.from_config({int(k): v for k, v in labels.items()}, cfg.data.regions)
    generator = torch.Generator().manual_seed(cfg.seed)
    image = torch.randn(batch, spec["in_channels"], *patch, generator=generator)
    values = torch.tensor(sorted(int(k) for k in labels))
    label = values[torch.randint(len(values), (batch, 1, *patch), generator=generator)]
    return targets, image, targets.loss_target(label)


def timed_steps(fn, steps: int, device: torch.device) -> list[float]:
    """Seconds of each of ``steps`` calls of ``fn`` on every rank at once: a barrier before and after each
    (so a step's time is the slowest rank's), CUDA synchronised."""
    times = []
    for _ in range(steps):
        dist.barrier()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()
        times.append(time.perf_counter() - start)
    return times
