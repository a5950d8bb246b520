"""``data.patch_size=auto``: the largest training patch whose pipeline plan fits the memory budget.

    python -m lampseg train data.patch_size=auto parallel.memory_gb=8
    python -m lampseg plan model=unet32 data.patch_size=auto parallel.pp=2 parallel.memory_gb=0.4
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from lampseg.config import enum_value
from lampseg.data.prepare import DataBundle
from lampseg.data.sampling import whole_volume_shape
from lampseg.model.losses import build_loss
from lampseg.model.unet import build_model, size_divisor
from lampseg.planner.plan import (
    OPTIMIZER_STATES,
    RECOMPUTE,
    PlanError,
    best_split,
    planned_stages,
    scale_costs,
    skip_routing,
)
from lampseg.planner.profile import profile_blocks
from lampseg.runtime.device import DTYPES, planned_precision
from lampseg.runtime.memory import free_memory_gb


def auto_patch_size(cfg, shapes: list[list[int]], in_channels: int, targets, budget_gb: float,
                    log=print, device: torch.device | str | None = None) -> tuple[list[int], dict]:
    """``data.patch_size=auto``: the largest training patch whose plan fits ``budget_gb`` per stage.

    Candidates run from the dataset's median shape padded to the network's divisibility (the whole volume
    of a typical case) down in steps of the divisor, each axis capped at that shape, so a dataset of
    flat volumes gets flat patches. Each is planned for the current model, ``data.batch_size``,
    ``parallel.pp``, schedule, micro-batches and checkpointing policy (single-device and DDP runs do not
    checkpoint); costs are profiled once on meta tensors at the largest candidate and scaled by voxels.

    Args:
        cfg: the full config.
        shapes: spatial shapes of the training cases (preprocessed).
        in_channels: image channels.
        targets: the loss targets (the loss's memory counts on the last stage).
        budget_gb: memory per stage (``parallel.memory_gb``, or the device's free memory).
        log: where the decision is printed.
        device: the training device, whose kernels' buffers the plan counts (``profile_blocks``'s
            ``plan_device``), as the stage planner does for the same run.

    Returns:
        The patch and the decision (``summary.json``'s ``patch_size_auto``).

    Raises:
        PlanError: not even the smallest patch fits; the message says what would.
    """
    divisor = size_divisor(cfg.model)
    median = [int(sorted(s[k] for s in shapes)[len(shapes) // 2]) for k in range(3)]
    cap = whole_volume_shape([median], divisor)
    p, batch = cfg.parallel, cfg.data.batch_size
    pp, pipelined = planned_stages(p)
    policy = enum_value(p.checkpoint)
    policies = ([policy] if policy != "auto" else list(RECOMPUTE)) if pipelined else ["none"]
    counts = ([p.microbatches] if p.microbatches else [m for m in range(1, batch + 1) if batch % m == 0]) \
        if pipelined else [batch]
    opt_states = OPTIMIZER_STATES.get(enum_value(cfg.optim.name), 2)
    with torch.device("meta"):
        probe = build_model(cfg.model, in_channels, targets.out_channels)
    costs = profile_blocks(probe, [in_channels, *cap], "estimate", "meta",
                           dtype=DTYPES[planned_precision(cfg).name],
                           loss_fn=build_loss(cfg.optim, targets), target_fn=targets.loss_target,
                           plan_device=device)

    def peak_gb(shape: list[int]) -> float | None:
        scaled = scale_costs(costs, math.prod(shape) / math.prod(cap))
        peaks = [max(s.memory_gb for s in split) for policy in policies for m in counts
                 if (split := best_split(scaled, pp, batch, m, p.schedule, policy, opt_states, budget_gb,
                                          skip_routing(p)))]
        return min(peaks) if peaks else None

    tried = []
    for side in range(max(cap), divisor - 1, -divisor):
        shape = [min(side, c) for c in cap]
        if enum_value(cfg.model.norm) == "instance" and all(v == divisor for v in shape):
            break  # a 1x1x1 bottleneck: instance norm cannot train on it
        need = peak_gb(shape)
        if need is not None:
            decision = {"patch_size": shape, "median_shape": median, "largest_candidate": cap,
                        "budget_gb": budget_gb, "estimate_gb": round(need, 4), "pp": pp, "batch_size": batch,
                        "candidates_too_large": tried}
            why = ("the whole median volume fits" if shape == cap else
                   f"the median volume padded to {cap} does not fit; {len(tried)} larger candidate(s) "
                   f"tried")
            log(f"data.patch_size=auto: {shape} (~{need:.3g} GB per stage of {budget_gb:.3g} GB with "
                f"pp={pp}, batch {batch}; {why})")
            return shape, decision
        tried.append(shape)
    raise PlanError(f"data.patch_size=auto: no patch down to {divisor * 2}^3 fits {budget_gb:.3g} GB per "
                    f"stage with pp={pp} and batch {batch}; use more stages (parallel=pipeline "
                    f"parallel.pp=...), a smaller data.batch_size or a smaller model, or raise "
                    f"parallel.memory_gb")


def choose_patch_size(cfg, bundle: DataBundle, device: torch.device, log=print) -> DataBundle:
    """``bundle`` with its patch size decided: unchanged when ``data.patch_size`` is fixed or whole, else
    ``auto_patch_size`` over the training cases' shapes, for ``parallel.memory_gb`` per stage (default: the
    training device's free memory), with the decision kept for ``summary.json``."""
    if bundle.patch_size is not None:
        return bundle
    budget = cfg.parallel.memory_gb
    if budget is None:
        budget = free_memory_gb(device)
    shapes, channels = bundle.train_shapes(), len(bundle.channels)
    patch, decision = auto_patch_size(cfg, shapes, channels, bundle.targets, budget, log, device)
    return replace(bundle, patch_size=patch, patch_decision=decision)
