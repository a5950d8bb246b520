"""How large a volume fits: per-rank memory and time of spatial parallelism, and the capacity table that
``python -m lampseg plan`` prints (largest whole cube and step time per device count, for the pipeline alone
and the spatial split alone).

    python -m lampseg plan model=unet64 data.patch_size=[128,128,128] data.batch_size=1 \
        parallel.memory_gb=16 trainer.precision=bf16

Under ``parallel.sp=S`` (``spatial.py``) every rank keeps the full weights, gradients and optimiser state, and
its slab's share of the input, the target and every activation (it reads only its slab of each sample). The
largest slab has ``ceil(X / divisor / S) * divisor`` rows; at level ``l`` of the U-Net its tensors have
``rows / 2^l`` rows plus one halo row on each side, so deep levels of thin slabs pay relatively more, and one
haloed copy of the largest tensor is in flight while a convolution runs or is differentiated. Time is
the slab's share of the compute plus the halo traffic (both directions, forward and backward) at
``LINK_GB_S`` and a latency per collective: rough, and labelled as an estimate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from lampseg.config import enum_value
from lampseg.model.unet import size_divisor
from lampseg.planner.decisions import Plan, SpatialPlan, Stage
from lampseg.planner.plan import (
    OPTIMIZER_STATES,
    RECOMPUTE,
    PlanError,
    fits,
    largest_cube,
    largest_fitting_side,
    make_plan,
    profile_for,
    scale_costs,
    through_bytes,
)
from lampseg.planner.profile import BlockCost
from lampseg.runtime.memory import GB

LINK_GB_S = 25.0  # device-to-device bandwidth assumed for halo exchange (PCIe 4 x16 class; NVLink is faster)
COLLECTIVE_S = 20e-6  # latency per halo exchange or all-reduce
COLLECTIVES_PER_BLOCK = 16  # ~3 convolutions x (halo + norm statistics x 2), forward and backward
DEVICE_COUNTS = (1, 2, 4, 8)


def largest_slab(rows: int, sp: int, divisor: int) -> int:
    """Rows of the largest of ``sp`` slabs of ``rows`` (``data.sampling.split_rows``); 0 when too few rows."""
    units = rows // divisor
    return 0 if units < sp else math.ceil(units / sp) * divisor


def _level(name: str, depth: int) -> int:
    """Resolution level (0: full) of a U-Net block's largest tensors: ``down<i>``/``up<i>``: i, bottom."""
    return depth if name == "bottom" else int(name.lstrip("downup"))


def slab_costs(costs: list[BlockCost], sp: int, rows: int, divisor: int) -> list[BlockCost] | None:
    """Per-rank costs of each block for the largest of ``sp`` slabs of an input with ``rows`` rows along
    the split axis; None when the input has fewer than ``sp`` units of ``divisor`` rows.

    A block's tensors shrink to the slab's share plus one halo row on each side at its level; its working
    buffers double (the haloed copy of a convolution's input, built in the forward and again in the
    backward); its time is the slab's share of the compute plus the halo traffic (two sides, forward and
    backward) at ``LINK_GB_S`` and ``COLLECTIVES_PER_BLOCK`` latencies. Pipeline stages of slabs
    (``hybrid_plan``) are planned from these costs as ``plan.make_plan`` plans whole blocks."""
    slab = largest_slab(rows, sp, divisor)
    if not slab:
        return None
    if sp == 1:
        return list(costs)
    depth = sum(c.name.startswith("down") for c in costs)
    per_rank = []
    for c in costs:
        level_rows = slab / 2 ** _level(c.name, depth)
        scaled = scale_costs([c], slab / rows * (1 + 2 / level_rows))[0]
        halo_bytes = 2 * 2 * c.act_bytes * slab / rows / level_rows
        scaled.time_s = (c.time_s * slab / rows + halo_bytes / (LINK_GB_S * GB)
                         + COLLECTIVE_S * COLLECTIVES_PER_BLOCK)
        scaled.work_bytes *= 2
        per_rank.append(_without_kernel_buffers(scaled))
    return per_rank


def _without_kernel_buffers(c: BlockCost) -> BlockCost:
    """``c`` without the backward working set ``profile_blocks`` replays for a pipeline stage
    (``BlockCost.bwd_bytes``: oneDNN's buffers calibrated on contiguous tensors). A model split into slabs
    trains in ``channels_last_3d`` on ``parallel.kernels``' permuted views, where those buffers are not
    allocated (measured at 128^3, batch 1: the calibrated working set planned sp=1 and sp=2 33 % and 45 %
    over): ``plan.stage_cost`` then takes the saved tensors, the largest again and the gradients."""
    return replace(c, bwd_bytes=0, bwd1_bytes=0)


def spatial_stage(costs: list[BlockCost], sp: int, batch: int, opt_states: int, rows: int,
                  divisor: int, checkpoint: str = "none") -> Stage | None:
    """Per-rank memory and time of the largest slab when the costs' input (``rows`` along the split axis)
    is split over ``sp`` ranks, with activation checkpointing ``checkpoint`` (none|block|all); None when the
    input has fewer than ``sp`` units of ``divisor`` rows."""
    per_rank = slab_costs(costs, sp, rows, divisor)
    return None if per_rank is None else _slab_stage(per_rank, batch, opt_states, checkpoint)


def _slab_stage(costs: list[BlockCost], batch: int, opt_states: int, checkpoint: str) -> Stage:
    """One rank's slab of every block: the weights, their gradients and the optimiser state; the tensors
    saved for backward (or, checkpointing, the blocks' outputs kept and one block or the whole model
    recomputed), the image, the target and the output, and the largest saved tensor (doubled by
    ``slab_costs``: the haloed copy).

    Not ``plan.stage_cost``'s pipeline model (oneDNN's backward buffers, calibrated on contiguous tensors):
    slabs train in ``channels_last_3d`` on ``parallel.kernels``' permuted views. Measured (``bench
    spatial``, ``+exp=smoke``, 128^3, batch 1, fp32): sp=1 0.426 GB against 0.442 planned, sp=2 0.225
    against 0.246 (checkpoint=block: 0.193 against 0.197); the pipeline model planned 0.567 and 0.326."""
    act = sum(c.act_bytes for c in costs)
    if checkpoint == "none":
        kept, recomputed = act, 0
    elif checkpoint == "block":  # the blocks' outputs kept, one block recomputed at a time
        kept = sum(c.out_bytes - through_bytes([c]) for c in costs[:-1])
        recomputed = max(c.act_bytes for c in costs)
    else:  # "all": the whole model recomputed
        kept, recomputed = 0, act
    whole = costs[0].extra_in_bytes + costs[-1].extra_out_bytes + costs[-1].out_bytes - through_bytes(costs)
    # Without the kernels' workspace per call that ``profile_blocks`` calibrates for pipeline stages (bf16:
    # oneDNN's, on contiguous tensors): the slab model never counted it for estimated costs.
    activation = batch * (kept + whole + max(c.work_bytes for c in costs) + recomputed) / GB
    params = sum(c.params for c in costs)
    static = (2 * sum(c.param_bytes for c in costs) + params * 4 * opt_states) / GB
    return Stage([c.name for c in costs], params, static, activation, static + activation,
                 batch * sum(c.time_s for c in costs) * RECOMPUTE[checkpoint])


def hybrid_plan(costs: list[BlockCost], sp: int, pp: int, batch: int, budget: float | None,
                input_shape: list[int], microbatches: int | None = None, schedule: str = "gpipe",
                checkpoint: str = "auto", optimizer: str = "adamw", source: str = "estimate",
                divisor: int = 1) -> Plan:
    """Pipeline stages of slabs (``parallel=spatial parallel.pp=P``): ``plan.make_plan`` on the per-slab
    costs (``slab_costs``), so each stage's memory and time are one rank's, for its slab.

    Raises:
        PlanError: the input is too short for ``sp`` slabs, or no split into ``pp`` stages fits.
    """
    per_rank = slab_costs(costs, sp, input_shape[1], divisor)
    if per_rank is None:
        raise PlanError(_too_short(input_shape[1], sp, divisor))
    try:
        plan = make_plan(per_rank, pp, batch, budget, input_shape, microbatches, schedule, checkpoint,
                         optimizer, source, divisor)
    except PlanError as e:
        raise PlanError(f"parallel.sp={sp} slabs, each: {e}") from e
    plan.sp = sp
    return plan


def _too_short(rows: int, sp: int, divisor: int) -> str:
    return (f"config key 'parallel.sp': {rows} rows along the first axis make no {sp} slabs of a multiple of "
            f"the model's size divisor {divisor}; use parallel.sp <= {rows // divisor} or a larger input")


def largest_hybrid_cube(costs: list[BlockCost], sp: int, pp: int, batch: int, budget: float,
                        input_shape: list[int], schedule: str = "gpipe", opt_states: int = 2,
                        divisor: int = 1, limit: int = 4096) -> int:
    """Side of the largest cubic input whose ``sp`` slabs fit ``budget`` GB per rank in ``pp`` stages; 0
    when none does (``plan.largest_fitting_side``)."""
    voxels = math.prod(input_shape[1:])

    def fit(side: int) -> bool:
        per_rank = slab_costs(scale_costs(costs, side**3 / voxels), sp, side, divisor)
        return per_rank is not None and fits(per_rank, pp, batch, budget, schedule, opt_states)

    return largest_fitting_side(fit, divisor, smallest=sp, limit=limit)


def largest_spatial_cube(costs: list[BlockCost], sp: int, batch: int, budget: float, input_shape: list[int],
                         opt_states: int = 2, divisor: int = 1, limit: int = 4096) -> int:
    """Side of the largest cubic input (a multiple of ``divisor``) whose largest slab fits ``budget`` GB per
    rank with ``sp`` slabs; 0 when none does. Costs profiled at ``input_shape`` are rescaled by voxels
    (``plan.largest_fitting_side``)."""
    voxels = math.prod(input_shape[1:])

    def fit(side: int) -> bool:
        scaled = scale_costs(costs, side**3 / voxels)
        return any((stage := spatial_stage(scaled, sp, batch, opt_states, side, divisor, policy)) is not None
                   and stage.memory_gb <= budget for policy in RECOMPUTE)

    return largest_fitting_side(fit, divisor, smallest=sp, limit=limit)


@dataclass
class Capacity:
    """One row of the capacity table: ``devices`` processes used as a pipeline, as spatial slabs, or as the
    best combination of both (``sp x pp = devices``, each at least 2)."""

    devices: int
    pipeline_side: int  # largest cube with pp=devices (0: none fits or more stages than blocks)
    pipeline_step_s: float | None
    spatial_side: int  # largest cube with sp=devices
    spatial_step_s: float | None
    hybrid_side: int = 0  # largest cube of the best sp x pp = devices (0: none, or no such layout)
    hybrid_step_s: float | None = None
    hybrid_layout: tuple[int, int] | None = None  # (sp, pp)
    predict_side: int = 0  # largest cube whole-volume inference (predict, evaluate) handles with sp=devices

    @property
    def best(self) -> str:
        sides = {"pipeline": self.pipeline_side, "spatial": self.spatial_side}
        if self.hybrid_layout is not None:
            sides[f"sp={self.hybrid_layout[0]} x pp={self.hybrid_layout[1]}"] = self.hybrid_side
        return max(sides, key=lambda k: (sides[k], k == "spatial"))


def capacity_table(costs: list[BlockCost], batch: int, budget: float, input_shape: list[int],
                   schedule: str = "gpipe", opt_states: int = 2, divisor: int = 1,
                   devices: tuple[int, ...] = DEVICE_COUNTS, skips: str = "carried") -> list[Capacity]:
    """The largest whole cube and its estimated step time for each device count: pipeline (its skip tensors
    ``skips``: carried or direct, ``plan.stage_cost``), spatial split, and the best combination of both
    (stages of slabs, pipelining: carried) (``python -m lampseg plan`` prints it with ``capacity_lines``)."""
    voxels = math.prod(input_shape[1:])
    optimizer = "adamw" if opt_states == 2 else "sgd"

    def cube(side: int) -> tuple[list[BlockCost], list[int]]:
        return scale_costs(costs, side**3 / voxels), [input_shape[0], side, side, side]

    rows = []
    for n in devices:
        row = Capacity(n, 0, None, 0, None)
        if n <= len(costs):
            row.pipeline_side = largest_cube(costs, n, batch, budget, input_shape, schedule, opt_states,
                                             divisor, skips=skips)
        if row.pipeline_side:
            scaled, shape = cube(row.pipeline_side)
            row.pipeline_step_s = make_plan(scaled, n, batch, budget, shape, None, schedule, "auto",
                                            optimizer, skips=skips).step_time_s
        row.spatial_side = largest_spatial_cube(costs, n, batch, budget, input_shape, opt_states, divisor)
        if row.spatial_side:
            scaled, shape = cube(row.spatial_side)
            row.spatial_step_s = spatial_plan(scaled, n, batch, budget, shape, opt_states,
                                              divisor).stage.time_s
        for sp in (s for s in range(2, n // 2 + 1) if n % s == 0 and n // s <= len(costs)):
            side = largest_hybrid_cube(costs, sp, n // sp, batch, budget, input_shape, schedule, opt_states,
                                       divisor)
            if side > row.hybrid_side or row.hybrid_layout is None:
                row.hybrid_side, row.hybrid_layout = side, (sp, n // sp)
        if row.hybrid_side:
            sp, pp = row.hybrid_layout
            scaled, shape = cube(row.hybrid_side)
            row.hybrid_step_s = hybrid_plan(scaled, sp, pp, batch, budget, shape, None, schedule, "auto",
                                            optimizer, divisor=divisor).step_time_s
        rows.append(row)
    return rows


def capacity_lines(rows: list[Capacity], budget: float) -> list[str]:
    """The capacity table as text: side, voxels relative to one device, estimated step time."""
    base = max(rows[0].pipeline_side, rows[0].spatial_side) ** 3 or 1

    def cell(side: int, step: float | None, width: int = 24) -> str:
        if not side:
            return f"{'-':>{width}}"
        return f"{side:>5}^3 {side**3 / base:>6.2f}x {step:>8.3f}s".rjust(width)

    def hybrid(r: Capacity) -> str:
        if r.hybrid_layout is None:
            return f"{'-':>34}"
        sp, pp = r.hybrid_layout
        return f"{f'sp={sp} x pp={pp}':>10}{cell(r.hybrid_side, r.hybrid_step_s)}"

    predict = any(r.predict_side for r in rows)
    lines = [f"capacity at {budget:g} GB per device (largest whole cube, voxels vs 1 device, est. step):",
             f"{'devices':>7}  {'pipeline (pp=N)':>24}  {'spatial (sp=N)':>24}  "
             f"{'best sp x pp = N':>34}  best" + (f"  {'predict (sp=N)':>14}" if predict else "")]
    for r in rows:
        lines.append(f"{r.devices:>7}  {cell(r.pipeline_side, r.pipeline_step_s)}  "
                     f"{cell(r.spatial_side, r.spatial_step_s)}  {hybrid(r)}  {r.best}"
                     + (f"  {f'{r.predict_side}^3' if r.predict_side else '-':>14}" if predict else ""))
    if predict:
        lines.append("predict (sp=N): the largest whole volume one inference pass handles over N slabs "
                     "(each rank: its slab of the image, logits and activations)")
    return lines


def spatial_plan(costs: list[BlockCost], sp: int, batch: int, budget: float | None, input_shape: list[int],
                 opt_states: int = 2, divisor: int = 1, checkpoint: str = "auto") -> SpatialPlan:
    """The fastest checkpointing policy whose largest slab fits ``budget`` GB per rank (auto; or the given
    one).

    Raises:
        PlanError: the input is too short to split into ``sp`` slabs, or nothing fits; the message names
            what needs the memory and what would fit.
    """
    rows = input_shape[1]
    policies = [checkpoint] if checkpoint != "auto" else (list(RECOMPUTE) if budget is not None else ["none"])
    stages = {p: spatial_stage(costs, sp, batch, opt_states, rows, divisor, p) for p in policies}
    if any(stage is None for stage in stages.values()):
        raise PlanError(_too_short(rows, sp, divisor))
    fitting = {p: s for p, s in stages.items() if budget is None or s.memory_gb <= budget}
    if not fitting:
        lightest = min(stages, key=lambda p: stages[p].memory_gb)
        need = stages[lightest]
        hints = [f"parallel.sp={n}" for n in (2 * sp, 4 * sp, 8 * sp)
                 if (other := spatial_stage(costs, n, batch, opt_states, rows, divisor, lightest)) is not None
                 and other.memory_gb <= budget][:1]
        side = largest_spatial_cube(costs, sp, batch, budget, input_shape, opt_states, divisor)
        if side:
            hints.append(f"a smaller input: about {side}^3 voxels")
        raise PlanError(f"parallel.sp={sp}: the largest slab needs {need.memory_gb:.3g} GB per rank even "
                        f"with checkpoint={lightest} (weights, gradients and optimiser state "
                        f"{need.static_gb:.3g} GB, activations {need.activation_gb:.3g} GB) but "
                        f"parallel.memory_gb={budget:g}. "
                        f"Would fit: " + "; or ".join(hints + ["a smaller model"]))
    best = min(fitting, key=lambda p: fitting[p].time_s)
    return SpatialPlan(sp, best, batch, list(input_shape), budget, fitting[best])


def spatial_plan_for(cfg, in_channels: int, out_channels: int, input_shape: list[int], device="cpu",
                     targets=None) -> SpatialPlan:
    """Profile ``cfg.model`` (``plan.profile_for``) and plan its spatial split under ``cfg.parallel``."""
    p = cfg.parallel
    costs = profile_for(cfg, in_channels, out_channels, input_shape, device, targets)
    return spatial_plan(costs, p.sp, cfg.data.batch_size, p.memory_gb, input_shape,
                        OPTIMIZER_STATES.get(enum_value(cfg.optim.name), 2), size_divisor(cfg.model),
                        enum_value(p.checkpoint))


def hybrid_plan_for(cfg, in_channels: int, out_channels: int, input_shape: list[int], device="cpu",
                    targets=None) -> Plan:
    """Profile ``cfg.model`` (``plan.profile_for``) and plan its stages of slabs under ``cfg.parallel``."""
    p = cfg.parallel
    costs = profile_for(cfg, in_channels, out_channels, input_shape, device, targets)
    return hybrid_plan(costs, p.sp, p.pp, cfg.data.batch_size, p.memory_gb, input_shape, p.microbatches,
                       p.schedule, enum_value(p.checkpoint), enum_value(cfg.optim.name),
                       enum_value(p.profile), size_divisor(cfg.model))


def choose_layout(costs: list[BlockCost], devices: int, batch: int, budget: float | None,
                  input_shape: list[int], opt_states: int = 2, divisor: int = 1, schedule: str = "gpipe",
                  optimizer: str = "adamw") -> tuple[dict, str]:
    """``parallel=auto``: the layout of ``devices`` processes for this input, and why.

    The smallest split that fits ``budget`` per device wins, so that as many processes as possible are
    data-parallel replicas (the fastest way to use devices that each hold a whole sample): one device per
    replica (DDP), else ``s`` devices per replica for s = 2, 3, ... dividing ``devices``, as slabs
    (``parallel=spatial``), pipeline stages, or stages of slabs (``parallel=spatial parallel.pp=P``),
    whichever has the shortest estimated step.

    Returns:
        (``parallel.*`` keys to set, a sentence saying why).

    Raises:
        PlanError: no layout of ``devices`` processes fits; names the largest cube that would.
    """
    for split in [s for s in range(1, devices + 1) if devices % s == 0]:
        dp = devices // split
        if split == 1:
            stage = spatial_stage(costs, 1, batch, opt_states, input_shape[1], divisor, "none")
            if budget is None or stage.memory_gb <= budget:
                of = f" of {budget:g}" if budget is not None else ""
                return ({"name": "ddp", "dp": dp, "pp": 1, "sp": 1},
                        f"one sample fits one device ({stage.memory_gb:.3g} GB{of}): {dp} data-parallel "
                        f"replica(s)")
            continue
        options = []
        try:
            slabs = spatial_plan(costs, split, batch, budget, input_shape, opt_states, divisor)
            keys = {"sp": split, "pp": 1, "checkpoint": slabs.checkpoint}
            options.append((slabs.stage.time_s, "spatial", keys,
                            f"{split} slabs of {slabs.stage.memory_gb:.3g} GB per device"))
        except PlanError:
            pass
        for sp in range(1, split // 2 + 1):  # pp = split / sp stages (of sp slabs each, if sp > 1)
            pp = split // sp
            if split % sp or pp > len(costs):
                continue
            try:
                stages = hybrid_plan(costs, sp, pp, batch, budget, input_shape, None, schedule, "auto",
                                     optimizer, divisor=divisor)
            except PlanError:
                continue
            what = f"{pp} pipeline stages" + (f" of {sp} slabs each" if sp > 1 else "")
            options.append((stages.step_time_s, "pipeline" if sp == 1 else "spatial",
                            {"pp": pp, "sp": sp, "checkpoint": stages.checkpoint},
                            f"{what}, at most {max(s.memory_gb for s in stages.stages):.3g} GB per device"))
        if options:
            time_s, name, keys, what = min(options, key=lambda o: o[0])
            others = "; ".join(f"{w}: est. {t:.3g}s" for t, _, k, w in options if k != keys)
            return ({"name": name, "dp": dp, **keys},
                    f"one sample needs more than {budget:g} GB on one device; {what} (est. step "
                    f"{time_s:.3g}s" + (f"; {others}" if others else "")
                    + f"), x {dp} data-parallel replica(s)")
    side = max(largest_spatial_cube(costs, devices, batch, budget, input_shape, opt_states, divisor),
               largest_cube(costs, min(devices, len(costs)), batch, budget, input_shape, schedule,
                            opt_states, divisor))
    raise PlanError(f"config key 'parallel.devices': no layout of {devices} device(s) fits "
                    f"parallel.memory_gb={budget:g} GB per device for input {list(input_shape)} x batch "
                    f"{batch}; the largest cube that would: {side}^3; or more devices")
