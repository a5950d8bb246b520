"""``python -m lampseg plan``: the pipeline split for ``model``, ``data.*`` and ``parallel.*`` without the
target hardware; prints the stage table and writes ``plan.json``.

    python -m lampseg plan model=unet64 data.patch_size=[240,240,160] parallel.pp=4 parallel.memory_gb=16
    python -m lampseg plan model=unet32 data.patch_size=auto parallel.pp=2 parallel.memory_gb=0.4

``parallel.pp`` is honoured with any ``parallel`` mode here (``parallel.plan.planned_stages``), also by
``data.patch_size=auto``, which shows the patch ``train parallel=pipeline`` would choose.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import nibabel as nib

from lampseg.config import enum_value, is_auto_patch, patch_size_of, to_container
from lampseg.data.msd import load_dataset
from lampseg.data.prepare import dataset_root, resolve_channels, resolve_targets
from lampseg.data.sampling import whole_volume_shape
from lampseg.engine.setup import load_data
from lampseg.io import write_json
from lampseg.model.unet import size_divisor
from lampseg.parallel.capacity import capacity_lines, capacity_table, spatial_plan
from lampseg.parallel.plan import OPTIMIZER_STATES, Plan, largest_cube, plan_for
from lampseg.runtime.device import resolve_device


def run_plan(cfg, log=print) -> Plan:
    """``python -m lampseg plan``: plan the split for ``model``, ``data.*`` and ``parallel.*``; print the
    stage table and write ``plan.json`` in ``run_dir``."""
    decision = None
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
    plan, costs = plan_for(cfg, len(channels), targets.out_channels, input_shape,
                           resolve_device(cfg.trainer.device), targets)
    log(f"model {cfg.model.name}: {sum(c.params for c in costs):,} parameters in {len(costs)} blocks; "
        f"input {input_shape} x batch {cfg.data.batch_size}, {enum_value(cfg.trainer.precision)}")
    log(plan.table())
    opt_states = OPTIMIZER_STATES.get(enum_value(cfg.optim.name), 2)
    divisor, batch = size_divisor(cfg.model), cfg.data.batch_size
    spatial = None
    if cfg.parallel.sp > 1:
        spatial = spatial_plan(costs, cfg.parallel.sp, batch, cfg.parallel.memory_gb, input_shape, opt_states,
                               divisor, enum_value(cfg.parallel.checkpoint))
        log(spatial.table())
    cube, capacity = None, None
    if cfg.parallel.memory_gb is not None:
        budget = cfg.parallel.memory_gb
        cube = largest_cube(costs, plan.pp, batch, budget, input_shape, plan.schedule, opt_states, divisor)
        log(f"largest cubic input that fits {budget:g} GB per stage with pp={plan.pp}: {cube}^3 "
            f"(batch {batch})")
        capacity = capacity_table(costs, batch, budget, input_shape, plan.schedule, opt_states, divisor)
        for line in capacity_lines(capacity, budget):
            log(line)
    out = Path(cfg.run_dir) / "plan.json"
    write_json(out, {"plan": plan.to_dict(), "largest_cube": cube, "blocks": [asdict(c) for c in costs],
                     "model": to_container(cfg.model), "patch_size_auto": decision,
                     "spatial": asdict(spatial) if spatial else None,
                     "capacity": [asdict(r) for r in capacity] if capacity else None})
    log(f"wrote {out}")
    return plan
