"""``lampseg doctor``'s multi-process checks: one torchrun job of two processes (127.0.0.1) runs DDP, a
two-stage pipeline and two spatial slabs of the probe U-Net through ``parallelize``, as training does, and
compares each with the unsplit model in every process. Rank 0 rewrites the JSON result after every check, so
a job that hangs or dies still reports the checks it finished.

    torchrun --nproc_per_node 2 --master_addr 127.0.0.1 --master_port PORT -m lampseg.doctor.worker SPEC OUT
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from lampseg.doctor.probe import (
    SHAPE,
    agree,
    failure_line,
    max_grad_error,
    probe_config,
    probe_problem,
    reference_step,
    relative,
)
from lampseg.io import atomic_write_text
from lampseg.model.unet import size_divisor
from lampseg.parallel.dims import ParallelDims
from lampseg.parallel.parallelize import parallel_loss, parallelize
from lampseg.parallel.slabs import slab
from lampseg.planner.layout import plan_split
from lampseg.runtime import distributed
from lampseg.runtime.device import resolve_device


def check_ddp(device: torch.device, world: int) -> str:
    """Each replica its half of the batch: DDP's averaged gradients are the whole batch's."""
    cfg = probe_config({"name": "ddp", "dp": world})
    model, reference, loss_fn, _, image, target = probe_problem(cfg, device)
    want_loss, _ = reference_step(reference, loss_fn, image, target)
    net = parallelize(model, ParallelDims.from_config(cfg.parallel, world), None, device)  # DDP: no plan
    mine = slice(dist.get_rank() * len(image) // world, (dist.get_rank() + 1) * len(image) // world)
    loss = loss_fn(net(image[mine]), target[mine])
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    return agree(f"{world} DDP replicas", {"loss": relative(float(total) / world, want_loss),
                         "gradients": max_grad_error(model, reference)})


def check_pipeline(device: torch.device, world: int) -> str:
    """The U-Net's blocks as ``world`` stages (``torch.distributed.pipelining``, 2 micro-batches)."""
    cfg = probe_config({"name": "pipeline", "pp": world, "engine": "pipelining", "microbatches": 2})
    model, reference, loss_fn, targets, image, target = probe_problem(cfg, device)
    want_loss, want_norm = reference_step(reference, loss_fn, image, target)
    plan = plan_split(cfg, SHAPE[0], targets.out_channels, SHAPE, device, targets)
    dims = ParallelDims.from_config(cfg.parallel, world)
    net = parallelize(model, dims, plan, device, cfg.trainer.precision, cfg.model)
    loss = net.train_step(image, target, loss_fn)
    norm = net.clip_grad_norm_(float("inf"))  # over all stages: the unsplit model's gradient norm
    errors = {"loss": relative(loss, want_loss), "gradient norm": relative(norm, want_norm)}
    return agree(f"{world} pipeline stages (torch.distributed.pipelining)", errors)


def check_spatial(device: torch.device, world: int) -> str:
    """Each process one slab of every volume (halo exchanges, global norms and loss)."""
    cfg = probe_config({"name": "spatial", "sp": world})
    model, reference, loss_fn, targets, image, target = probe_problem(cfg, device)
    want_loss, _ = reference_step(reference, loss_fn, image, target)
    dims = ParallelDims.from_config(cfg.parallel, world)
    plan = plan_split(cfg, SHAPE[0], targets.out_channels, SHAPE, device, targets)
    net = parallelize(model, dims, plan, device, cfg.trainer.precision, cfg.model)
    divisor = size_divisor(cfg.model)
    loss = parallel_loss(loss_fn, dims)(net(slab(image, dims.sp_group, divisor)),
                                        slab(target, dims.sp_group, divisor))
    loss.backward()
    return agree(f"{world} spatial slabs", {"loss": relative(float(loss), want_loss),
                                    "gradients": max_grad_error(model, reference)})


CHECKS = {"ddp": check_ddp, "pipeline": check_pipeline, "spatial": check_spatial}


def main(spec_path: str, out_path: str) -> None:
    """Run the spec's checks in order; stop at the first failure (its collectives may be left unpaired)."""
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    distributed.init_from_env(timeout_s=spec["timeout_s"], alone=True, backend=spec["backend"])
    world, rank = dist.get_world_size(), dist.get_rank()
    device = distributed.local_device(resolve_device(spec["device"]))
    results: dict[str, dict] = {}
    for name in spec["checks"]:
        started = time.perf_counter()
        try:
            outcome = (True, CHECKS[name](device, world))
        except Exception as error:  # noqa: BLE001 - a check's failure is its result
            outcome = (False, failure_line(error))
        outcomes = [None] * world
        dist.all_gather_object(outcomes, outcome)
        failed = [(r, text) for r, (ok, text) in enumerate(outcomes) if not ok]
        results[name] = {"ok": not failed, "seconds": round(time.perf_counter() - started, 2),
                         "detail": f"rank {failed[0][0]}: {failed[0][1]}" if failed else outcomes[0][1]}
        if rank == 0:
            atomic_write_text(out_path, json.dumps(results))
        if failed:
            break
    distributed.shutdown(failed=not all(r["ok"] for r in results.values()))


if __name__ == "__main__":
    main(*sys.argv[1:])
