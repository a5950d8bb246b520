"""``python -m lampseg plan``: the pipeline split (or the spatial split) for ``model``, ``data.*`` and
``parallel.*`` without the target hardware; prints the stage table and the capacity table, writes
``plan.json``.

    python -m lampseg plan model=unet64 data.patch_size=[240,240,160] parallel.pp=4 parallel.memory_gb=16
    python -m lampseg plan model=unet64 data.patch_size=[480,480,480] data.batch_size=1 parallel.sp=2 \
        parallel.memory_gb=16
    python -m lampseg plan model=unet32 data.patch_size=auto parallel.pp=2 parallel.memory_gb=0.4

``parallel.pp`` is honoured with any ``parallel`` mode here (``planner.plan.planned_stages``), also by
``data.patch_size=auto``, which shows the patch ``train parallel=pipeline`` would choose.
"""
from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import nibabel as nib
from omegaconf import DictConfig

from lampseg.config import derive, enum_value, is_auto_patch, patch_size_of, to_container
from lampseg.data.msd import load_dataset
from lampseg.data.prepare import dataset_root, resolve_channels, resolve_targets
from lampseg.data.sampling import whole_volume_shape
from lampseg.engine.setup import layout_changes, load_data
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
from lampseg.planner.inference import InferenceMemory, largest_inference_cube
from lampseg.planner.plan import (
    OPTIMIZER_STATES,
    PlanError,
    largest_cube,
    make_plan,
    profile_for,
    skip_routing,
)
from lampseg.runtime.device import resolve_device, resolve_precision


def run_plan(cfg: DictConfig, log=print) -> Plan | SpatialPlan:
    """``python -m lampseg plan``: plan the split for ``model``, ``data.*`` and ``parallel.*``; print the
    stage table (or, with ``parallel.sp > 1``, the per-rank plan of the slabs), the largest cube and, with
    ``parallel.memory_gb``, the capacity table; write ``plan.json`` in ``run_dir``. When nothing fits, the
    capacity table comes before the error."""
    cfg = derive(cfg, layout_changes(cfg, log), check=False)  # parallel=auto: the layout train would take
    channels, targets, patch, decision = _input(cfg, log)
    input_shape = [len(channels), *patch]
    p, batch, budget = cfg.parallel, cfg.data.batch_size, cfg.parallel.memory_gb
    device = resolve_device(cfg.trainer.device)
    costs = profile_for(cfg, len(channels), targets.out_channels, input_shape, device, targets)
    precision = resolve_precision(cfg.trainer.precision, device)  # what the costs assumed (planned_precision)
    if precision.setting == "auto":
        precision = replace(precision, reason=f"{precision.reason}, on this machine's {device.type}; set "
                            "trainer.precision to plan for another device")
    log(f"model {cfg.model.name}: {sum(c.params for c in costs):,} parameters in {len(costs)} blocks; "
        f"input {input_shape} x batch {batch}, {precision.line()}")
    opt_states = OPTIMIZER_STATES.get(enum_value(cfg.optim.name), 2)
    capacity = capacity_table(costs, batch, budget, input_shape, p.schedule, opt_states,
                              size_divisor(cfg.model), skips=skip_routing(p)) if budget is not None else None
    for row in capacity or []:  # beside training's capacity: what whole-volume inference handles
        memory = InferenceMemory.from_config(cfg.model, len(channels), targets.out_channels, precision.name,
                                             slabs=row.devices)
        row.predict_side = largest_inference_cube(memory, budget, size_divisor(cfg.model))
    try:
        plan, spatial = _split(cfg, costs, input_shape, log)
    except PlanError:
        for line in capacity_lines(capacity, budget) if capacity else []:  # what would fit, before the error
            log(line)
        raise
    cube = None
    if budget is not None:
        cube = _largest_cube(cfg, costs, input_shape, plan, spatial, capacity, log)
    out = Path(cfg.run_dir) / "plan.json"
    write_json(out, {"plan": plan.to_dict() if plan else None, "largest_cube": cube,
                     "blocks": [asdict(c) for c in costs],
                     "model": to_container(cfg.model), "patch_size_auto": decision,
                     "precision": precision.name, "precision_reason": precision.reason,
                     "spatial": spatial.to_dict() if spatial else None,
                     "capacity": [asdict(r) for r in capacity] if capacity else None})
    log(f"wrote {out}")
    return plan or spatial


def _input(cfg: DictConfig, log) -> tuple[list[int], object, list[int], dict | None]:
    """The channels, targets and patch to plan for, and ``data.patch_size=auto``'s decision: the same choice
    train makes (from the preprocessed training cases, cached), a fixed patch, or for whole volumes the
    largest training image, uncropped (an upper bound)."""
    if is_auto_patch(cfg):
        bundle = load_data(cfg, Path(cfg.run_dir), log)
        return bundle.channels, bundle.targets, bundle.patch_size, bundle.patch_decision
    dataset = load_dataset(dataset_root(cfg.data, log))
    channels, targets = resolve_channels(dataset, cfg.data), resolve_targets(dataset, cfg.data)
    patch = patch_size_of(cfg)
    if patch is None:
        patch = whole_volume_shape([nib.load(c.image).shape[:3] for c in dataset.cases],
                                   size_divisor(cfg.model))
    return channels, targets, patch, None


def _split(cfg: DictConfig, costs: list, input_shape: list[int], log
           ) -> tuple[Plan | None, SpatialPlan | None]:
    """The pipeline plan (of whole volumes, or of one slab's ranks under SP x PP) or the per-rank spatial
    plan, printed as a table.

    Raises:
        PlanError: nothing fits; the message says what would.
    """
    p, batch, budget = cfg.parallel, cfg.data.batch_size, cfg.parallel.memory_gb
    divisor, optimizer = size_divisor(cfg.model), enum_value(cfg.optim.name)
    checkpoint, profile = enum_value(p.checkpoint), enum_value(p.profile)
    if p.sp > 1 and p.pp > 1:  # stages of slabs: the pipeline plan of one slab's ranks
        plan = hybrid_plan(costs, p.sp, p.pp, batch, budget, input_shape, p.microbatches, p.schedule,
                           checkpoint, optimizer, profile, divisor)
    elif p.sp > 1:  # slabs of each volume: the per-rank plan
        spatial = spatial_plan(costs, p.sp, batch, budget, input_shape, OPTIMIZER_STATES.get(optimizer, 2),
                               divisor, checkpoint)
        log(spatial.table())
        return None, spatial
    else:
        plan = make_plan(costs, p.pp, batch, budget, input_shape, p.microbatches, p.schedule, checkpoint,
                         optimizer, profile, divisor, skip_routing(p))
    log(plan.table())
    return plan, None


def _largest_cube(cfg: DictConfig, costs: list, input_shape: list[int], plan: Plan | None,
                  spatial: SpatialPlan | None, capacity, log) -> int:
    """The largest cubic input that fits ``parallel.memory_gb`` per device in this layout, printed with the
    capacity table."""
    batch, budget, divisor = cfg.data.batch_size, cfg.parallel.memory_gb, size_divisor(cfg.model)
    opt_states = OPTIMIZER_STATES.get(enum_value(cfg.optim.name), 2)
    if spatial:
        layout = f"sp={spatial.sp}"
        cube = largest_spatial_cube(costs, spatial.sp, batch, budget, input_shape, opt_states, divisor)
    elif plan.sp > 1:
        layout = f"sp={plan.sp} x pp={plan.pp}"
        cube = largest_hybrid_cube(costs, plan.sp, plan.pp, batch, budget, input_shape, plan.schedule,
                                   opt_states, divisor)
    else:
        layout = f"pp={plan.pp}"
        cube = largest_cube(costs, plan.pp, batch, budget, input_shape, plan.schedule, opt_states, divisor,
                            skips=plan.skips)
    log(f"largest cubic input that fits {budget:g} GB per device with {layout}: {cube}^3 (batch {batch})")
    for line in capacity_lines(capacity, budget):
        log(line)
    return cube
