"""``python -m lampseg plan``: the pipeline split (or the spatial split) for ``model``, ``data.*`` and
``parallel.*`` without the target hardware; prints the stage table and the capacity table, writes
``plan.json``.

    python -m lampseg plan model=unet64 data.patch_size=[240,240,160] parallel.pp=4 parallel.memory_gb=16
    python -m lampseg plan model=unet64 data.patch_size=[480,480,480] data.batch_size=1 parallel.sp=2 \
        parallel.memory_gb=16
    python -m lampseg plan model=unet32 data.patch_size=auto parallel.pp=2 parallel.memory_gb=0.4

``parallel.pp`` is honoured with any ``parallel`` mode here (``parallel.plan.planned_stages``), also by
``data.patch_size=auto``, which shows the patch ``train parallel=pipeline`` would choose.
"""
from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import nibabel as nib

from lampseg.config import enum_value, is_auto_patch, patch_size_of, to_container
from lampseg.data.msd import load_dataset
from lampseg.data.prepare import dataset_root, resolve_channels, resolve_targets
from lampseg.data.sampling import whole_volume_shape
from lampseg.engine.setup import load_data, resolve_auto_layout
from lampseg.io import write_json
from lampseg.model.unet import size_divisor
from lampseg.planner.capacity import (
    capacity_lines,
    capacity_table,
    hybrid_plan,
    largest_hybrid_cube,
    largest_spatial_cube,
    spatial_plan,
)
from lampseg.planner.decisions import Plan, SpatialPlan
from lampseg.planner.plan import (
    OPTIMIZER_STATES,
    PlanError,
    largest_cube,
    make_plan,
    profile_for,
    skip_routing,
)
from lampseg.runtime.device import resolve_device, resolve_precision


def run_plan(cfg, log=print) -> Plan | SpatialPlan:
    """``python -m lampseg plan``: plan the split for ``model``, ``data.*`` and ``parallel.*``; print the
    stage table (or, with ``parallel.sp > 1``, the per-rank plan of the slabs), the largest cube and, with
    ``parallel.memory_gb``, the capacity table; write ``plan.json`` in ``run_dir``. When nothing fits, the
    capacity table comes before the error."""
    decision = None
    resolve_auto_layout(cfg, log)  # parallel=auto: the layout train would take, then its plan
    if is_auto_patch(cfg):  # the same choice train makes: from the preprocessed training cases (cached)
        bundle = load_data(cfg, Path(cfg.run_dir), log)
        dataset, channels, targets = bundle.dataset, bundle.channels, bundle.targets
        patch, decision = bundle.patch_size, bundle.patch_decision
    else:
        dataset = load_dataset(dataset_root(cfg.data, log))
        channels, targets = resolve_channels(dataset, cfg.data), resolve_targets(dataset, cfg.data)
        patch = patch_size_of(cfg)
    if patch is None:  # whole volumes: the largest training image, uncropped (an upper bound)
        patch = whole_volume_shape([nib.load(c.image).shape[:3] for c in dataset.cases],
                                   size_divisor(cfg.model))
    input_shape = [len(channels), *patch]
    p, batch, divisor = cfg.parallel, cfg.data.batch_size, size_divisor(cfg.model)
    opt_states, budget = OPTIMIZER_STATES.get(enum_value(cfg.optim.name), 2), cfg.parallel.memory_gb
    device = resolve_device(cfg.trainer.device)
    costs = profile_for(cfg, len(channels), targets.out_channels, input_shape, device, targets)
    precision = resolve_precision(cfg.trainer.precision, device)  # what the costs assumed (planned_precision)
    if precision.setting == "auto":
        precision = replace(precision, reason=f"{precision.reason}, on this machine's {device.type}; set "
                            "trainer.precision to plan for another device")
    log(f"model {cfg.model.name}: {sum(c.params for c in costs):,} parameters in {len(costs)} blocks; "
        f"input {input_shape} x batch {batch}, {precision.line()}")
    capacity = capacity_table(costs, batch, budget, input_shape, p.schedule, opt_states, divisor,
                              skips=skip_routing(p)) \
        if budget is not None else None
    plan = spatial = cube = None
    try:
        if p.sp > 1 and p.pp > 1:  # stages of slabs: the pipeline plan of one slab's ranks
            plan = hybrid_plan(costs, p.sp, p.pp, batch, budget, input_shape, p.microbatches, p.schedule,
                               enum_value(p.checkpoint), enum_value(cfg.optim.name), enum_value(p.profile),
                               divisor)
            log(plan.table())
        elif p.sp > 1:  # slabs of each volume: the per-rank plan
            spatial = spatial_plan(costs, p.sp, batch, budget, input_shape, opt_states, divisor,
                                   enum_value(p.checkpoint))
            log(spatial.table())
        else:
            plan = make_plan(costs, p.pp, batch, budget, input_shape, p.microbatches, p.schedule,
                             enum_value(p.checkpoint), enum_value(cfg.optim.name), enum_value(p.profile),
                             divisor, skip_routing(p))
            log(plan.table())
    except PlanError:
        for line in capacity_lines(capacity, budget) if capacity else []:  # what would fit, before the error
            log(line)
        raise
    if budget is not None:
        if spatial:
            layout = f"sp={p.sp}"
            cube = largest_spatial_cube(costs, p.sp, batch, budget, input_shape, opt_states, divisor)
        elif plan.sp > 1:
            layout = f"sp={plan.sp} x pp={plan.pp}"
            cube = largest_hybrid_cube(costs, plan.sp, plan.pp, batch, budget, input_shape, plan.schedule,
                                       opt_states, divisor)
        else:
            layout = f"pp={plan.pp}"
            cube = largest_cube(costs, plan.pp, batch, budget, input_shape, plan.schedule, opt_states,
                                divisor, skips=plan.skips)
        log(f"largest cubic input that fits {budget:g} GB per device with {layout}: {cube}^3 (batch {batch})")
        for line in capacity_lines(capacity, budget):
            log(line)
    out = Path(cfg.run_dir) / "plan.json"
    write_json(out, {"plan": plan.to_dict() if plan else None, "largest_cube": cube,
                     "blocks": [asdict(c) for c in costs],
                     "model": to_container(cfg.model), "patch_size_auto": decision,
                     "precision": precision.name, "precision_reason": precision.reason,
                     "spatial": spatial.to_dict() if spatial else None,
                     "capacity": [asdict(r) for r in capacity] if capacity else None})
    log(f"wrote {out}")
    return plan or spatial
