"""Partition a profiled U-Net (``profile.py``) into pipeline stages that fit a memory budget.

    python -m lampseg plan model=unet64 data.patch_size=[240,240,160] parallel.pp=4 parallel.memory_gb=16

Costs per block (per sample) come from ``profile_blocks``: forward+backward time, bytes saved for
backward, input/output state bytes (skips included) and parameter bytes, measured on the device or
estimated on meta tensors (``parallel.profile``).

The partitioner picks contiguous stage boundaries minimising the slowest stage subject to every stage
fitting the budget, then the micro-batch count and activation checkpointing policy with the lowest
estimated step time ``(M + S - 1) * slowest micro-batch stage time``.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lampseg.config import ConfigError, enum_value
from lampseg.model.losses import build_loss
from lampseg.model.unet import build_model, size_divisor
from lampseg.planner.decisions import Plan, Stage
from lampseg.planner.profile import BlockCost, profile_blocks
from lampseg.runtime.device import DTYPES, planned_precision
from lampseg.runtime.memory import GB

OPTIMIZER_STATES = {"adamw": 2, "sgd": 1}  # fp32 tensors of optimiser state per parameter
RECOMPUTE = {"none": 1.0, "block": 4 / 3, "all": 4 / 3}  # forward recomputed once: (1 + 2 + 1) / 3



def through_bytes(costs: list[BlockCost]) -> int:
    """Bytes of the stage's input tensors that leave it unchanged (skips crossing the stage)."""
    positions = list(range(len(costs[0].in_sizes)))
    for c in costs:
        positions = [c.through[p] if p >= 0 and p < len(c.through) else -1 for p in positions]
    return sum(size for size, p in zip(costs[0].in_sizes, positions) if p >= 0)


def _stage_outputs(costs: list[BlockCost]) -> list[tuple[int, int, int]] | None:
    """The stage's output tensors, per sample, as ``(bytes, maker, saver)``: ``maker`` is the index of the
    block that made the tensor (-1: received and passed on unchanged), ``saver`` that of the first block of
    the stage that saves it for backward (``len(costs)``: none does; a ``down`` block's output is the next
    block's saved input and a skip sent on, one tensor). None when the costs do not describe their
    tensors one by one."""
    if not costs[0].in_sizes or any(not c.out_sizes for c in costs):
        return None
    n = len(costs)
    state = [(size, -1, n) for size in costs[0].in_sizes]
    for k, c in enumerate(costs):
        passed: list[tuple[int, int, int] | None] = [None] * len(c.out_sizes)
        for p, (size, maker, saver) in enumerate(state):
            if p < len(c.through) and c.through[p] >= 0:
                saves = p < len(c.in_saved) and c.in_saved[p]
                passed[c.through[p]] = (size, maker, min(saver, k) if saves else saver)
        state = [t if t is not None else (size, k, k if j < len(c.out_saved) and c.out_saved[j] else n)
                 for j, (t, size) in enumerate(zip(passed, c.out_sizes))]
    return state


def stage_cost(costs: list[BlockCost], index: int, stages: int, batch: int, microbatches: int,
               schedule: str, checkpoint: str, opt_states: int, skips: str = "carried") -> Stage:
    """Peak memory and time of one stage (a pipelining rank) holding ``costs``' blocks.

    Always: the weights and the optimiser state; for the whole batch, allocated once per micro-batch and
    reused: the received input state and the received output gradient (not on the first / last stage),
    and the image (first) or the loss target and every micro-batch's output (last: the schedule returns
    them); under autocast a copy of the weights per micro-batch in flight (all M with GPipe, at most
    S - stage with 1F1B). On top, the largest of: the forward's end, every micro-batch in flight ``kept``
    (``_kept_and_backward``: the activations saved for backward and the outputs nothing else holds); the
    backward of the first micro-batch, block by block from the last (the others kept, the block's
    backward working set, the gradients of the weights of the blocks after it, the gradients of the skips
    crossing the stage, copied into the received buffers' ``.grad``, and the kernels' buffers per call);
    the next micro-batches' (every weight gradient there; the input gradients sent back are kept until
    the step ends); and the optimiser's step (the weights' gradients, a temporary as large, the input
    gradients).

    ``skips="direct"`` (torchgpipe's skip API, ``gpipe.py``): a skip tensor goes straight from the stage
    that makes it to the stage that uses it, so skips that merely cross a stage are neither received nor
    sent there (nor their gradients); ``"carried"`` (``torch.distributed.pipelining``): they are.
    """
    micro = batch / microbatches
    in_flight = min(microbatches, stages - index) if schedule == "1f1b" else microbatches
    first, last = index == 0, index == stages - 1
    through = through_bytes(costs)
    crossing = through if skips == "direct" else 0  # received and sent on: not here when sent direct
    recv = 0 if first else costs[0].in_bytes - crossing
    kept, currents = _kept_and_backward(costs, first, last, batch == microbatches, checkpoint)
    carried = through if not first and skips == "carried" else 0
    grads = [c.param_bytes for c in costs]  # each block's backward makes its weights' (fp32) gradients
    workspace = max(c.workspace_bytes for c in costs)  # per call, whatever the micro-batch's size
    forward = in_flight * micro * kept
    backward = (in_flight - 1) * micro * kept + workspace + max(
        micro * (current + carried) + sum(grads[b:]) for b, current in enumerate(currents))
    later = 0
    if microbatches > 1:  # the input gradients sent back (``recv`` of them) are kept until the step ends
        later = (max((in_flight - 2) * micro * kept + micro * recv,
                     max(in_flight - microbatches, 0) * micro * kept + (microbatches - 1) * micro * recv)
                 + micro * (max(currents) + carried) + sum(grads) + workspace)
    optimizer = 2 * sum(grads) + batch * recv
    # The last stage keeps every micro-batch's output (the schedule returns them merged) and the target.
    whole_batch = (recv + (0 if last else costs[-1].out_bytes - crossing)
                   + (costs[0].extra_in_bytes if first else 0)
                   + (costs[-1].extra_out_bytes + costs[-1].out_bytes - through if last else 0))
    params = sum(c.params for c in costs)
    held = sum(c.param_bytes for c in costs) + params * 4 * opt_states  # weights, optimiser state
    memory = (held + batch * whole_batch + in_flight * sum(c.weight_copy_bytes for c in costs)
              + max(forward, backward, later, optimizer)) / GB
    static = (held + sum(grads)) / GB  # weights, gradients, optimiser state
    return Stage([c.name for c in costs], params, static, memory - static, memory,
                 micro * sum(c.time_s for c in costs) * RECOMPUTE[checkpoint])


def _backward_fallback(c: BlockCost, image: bool) -> int:
    """A block's backward working set, per sample, for costs without ``bwd_bytes``: its saved tensors, its
    largest one again (the gradients' buffers), and the gradients of the outputs it makes and of the inputs
    that do not pass through it (none for the image)."""
    made = c.out_bytes - through_bytes([c])
    inputs = (sum(size for i, size in enumerate(c.in_sizes) if i >= len(c.through) or c.through[i] < 0)
              if c.in_sizes else c.in_bytes)
    return c.act_bytes + c.work_bytes + made + (0 if image else inputs)


def _kept_and_backward(costs: list[BlockCost], first: bool, last: bool, single: bool,
                       checkpoint: str) -> tuple[int, list[int]]:
    """Per sample: what a stage keeps of each micro-batch in flight, and during the backward of each of its
    blocks (the saved tensors of the blocks before it, its backward working set ``BlockCost.bwd_bytes``, or
    ``bwd1_bytes`` for micro-batches of one sample, and the stage's outputs not freed yet).

    Without checkpointing it keeps the activations saved for backward and the output tensors nothing else
    holds (a skip that crosses the stage is the received one, a ``down`` block's output saved by the next
    block is one tensor: ``_stage_outputs``); with ``block`` every block's output, one block recomputed
    at a time; with ``all`` only the outputs, the whole stage recomputed for one micro-batch at a time."""
    # What the first block saves of its input is the received buffer (counted for the whole batch) or, on
    # the first stage, the image (kept for the whole batch) or its autocast copies.
    own_input = costs[0].saved_in_bytes - (costs[0].image_copy_bytes if first else 0)
    acts = [c.act_bytes for c in costs]
    acts[0] -= own_input
    backs = [(c.bwd1_bytes if single and c.bwd1_bytes else c.bwd_bytes)
             or _backward_fallback(c, first and b == 0) for b, c in enumerate(costs)]
    backs[0] -= own_input
    if not last:  # the gradients of the last block's outputs are the received buffers (for the batch)
        backs[-1] -= costs[-1].out_bytes - through_bytes(costs[-1:])
    outputs = _stage_outputs(costs)
    if outputs is None:  # costs without their tensors: every output made here is held apart
        outputs = [(costs[-1].out_bytes - through_bytes(costs), len(costs) - 1, len(costs))]
    made = [(size, saver) for size, maker, saver in outputs if maker >= 0 and not last]
    blocks = range(len(costs))
    if checkpoint == "none":
        kept = sum(acts) + sum(size for size, saver in made if saver == len(costs))
        return kept, [sum(acts[:b]) + backs[b] + sum(size for size, saver in made if saver > b)
                      for b in blocks]
    if checkpoint == "block":  # keep the blocks' outputs (each next block's input), recompute one block
        kept = (sum(c.out_bytes - through_bytes([c]) for c in costs[:-1])
                + sum(size for size, maker, _ in outputs if maker == len(costs) - 1 and not last))
        return kept, [kept + backs[b] for b in blocks]
    kept = sum(size for size, _ in made)  # "all": keep only the input and the outputs, recompute the stage
    return kept, [kept + sum(acts[:b]) + backs[b] for b in blocks]


def best_split(costs, stages, batch, microbatches, schedule, checkpoint, opt_states, budget_gb,
               skips="carried"):
    """Contiguous split minimising the slowest stage with every stage within budget (DP), or None."""
    n = len(costs)
    inf = (math.inf, None)
    best = [[inf] * (n + 1) for _ in range(stages + 1)]  # best[s][j]: first j blocks in s stages
    best[0][0] = (0.0, [])
    for s in range(1, stages + 1):
        for j in range(s, n - (stages - s) + 1):
            for i in range(s - 1, j):
                prev_time, prev_stages = best[s - 1][i]
                if prev_stages is None:
                    continue
                stage = stage_cost(costs[i:j], s - 1, stages, batch, microbatches, schedule, checkpoint,
                                   opt_states, skips)
                if budget_gb is not None and stage.memory_gb > budget_gb:
                    continue
                slowest = max(prev_time, stage.time_s)
                if slowest < best[s][j][0]:
                    best[s][j] = (slowest, prev_stages + [stage])
    return best[stages][n][1]


class PlanError(ConfigError):
    """No partition fits; the message says what would."""


def make_plan(costs: list[BlockCost], pp: int, batch_size: int, memory_gb: float | None,
              input_shape: list[int], microbatches: int | None = None, schedule: str = "gpipe",
              checkpoint: str = "auto", optimizer: str = "adamw", source: str = "estimate",
              divisor: int = 1, skips: str = "carried") -> Plan:
    """Choose stage boundaries, micro-batches and checkpointing.

    Args:
        costs: per-block costs from ``profile_blocks``.
        pp: number of stages.
        batch_size: samples per step (split into micro-batches).
        memory_gb: budget per stage, or None for no limit.
        input_shape: (C, X, Y, Z), recorded in the plan.
        microbatches: fixed micro-batch count, or None to choose among the divisors of ``batch_size``.
        schedule: gpipe | 1f1b (1F1B keeps at most S - stage micro-batches in flight).
        checkpoint: none | block | all, or auto (the cheapest that fits).
        optimizer: adamw | sgd (optimiser state per parameter).
        source: where ``costs`` came from (recorded).
        divisor: spatial multiple the network needs (for the "smaller input" hint).
        skips: how skip tensors reach their stage: carried (pipelining) or direct (gpipe; ``stage_cost``).

    Raises:
        PlanError: when ``pp`` exceeds the number of blocks or nothing fits; says what would fit.
    """
    if pp > len(costs):
        raise PlanError(f"config key 'parallel.pp': {pp} stages but the model has only {len(costs)} blocks "
                        f"({', '.join(c.name for c in costs)}); use at most {len(costs)}")
    counts = [microbatches] if microbatches else [m for m in range(1, batch_size + 1) if batch_size % m == 0]
    if schedule == "1f1b" and pp > 1:
        counts = [m for m in counts if m >= pp]
        if not counts:
            got = microbatches if microbatches else f"data.batch_size={batch_size}"
            raise PlanError(f"config key 'parallel.microbatches': parallel.schedule=1f1b needs at least as "
                            f"many micro-batches as stages ({pp}); got {got}")
    policies = [checkpoint] if checkpoint != "auto" else list(RECOMPUTE)
    opt_states = OPTIMIZER_STATES.get(optimizer, 2)
    best = None
    for policy in policies:
        for m in counts:
            stages = best_split(costs, pp, batch_size, m, schedule, policy, opt_states, memory_gb, skips)
            if stages is None:
                continue
            plan = Plan(pp, m, schedule, policy, batch_size, list(input_shape), memory_gb, source, stages,
                        skips=skips)
            if best is None or plan.step_time_s < best.step_time_s - 1e-12:
                best = plan
    if best is None:
        raise PlanError(_nothing_fits(costs, pp, batch_size, memory_gb, input_shape, schedule, opt_states,
                                      divisor, skips))
    return best


def fits(costs: list[BlockCost], pp: int, batch: int, budget: float | None, schedule: str, opt_states: int,
         skips: str = "carried") -> bool:
    """Whether some split into ``pp`` stages, micro-batching and checkpointing fits ``budget`` per stage."""
    return any(best_split(costs, pp, batch, m, schedule, policy, opt_states, budget, skips) is not None
               for policy in RECOMPUTE for m in range(1, batch + 1) if batch % m == 0)


def _nothing_fits(costs, pp, batch, budget, input_shape, schedule, opt_states, divisor, skips) -> str:
    # A stage holds whole blocks: the heaviest block, alone on a stage and recomputed, with the skip tensors
    # it receives and passes on, is the floor of any split.
    def alone(i: int) -> float:
        index = 0 if i == 0 else pp - 1 if i == len(costs) - 1 else min(1, pp - 1)
        return stage_cost([costs[i]], index, pp, batch, batch, schedule, "all", opt_states, skips).memory_gb

    if pp == 1:
        need, name = stage_cost(costs, 0, 1, batch, batch, schedule, "all", opt_states).memory_gb, "the model"
    else:
        need, name = max((alone(i), f"block {c.name}") for i, c in enumerate(costs))
    hints = [f"more stages: parallel.pp={s}" for s in range(pp + 1, len(costs) + 1)
             if fits(costs, s, batch, budget, schedule, opt_states, skips)][:1]
    side = largest_cube(costs, pp, batch, budget, input_shape, schedule, opt_states, divisor, skips=skips)
    if side:
        hints.append(f"a smaller input: about {side}^3 voxels (data.patch_size=[{side},{side},{side}])")
    hints.append("slabs of each volume over several devices: parallel=spatial parallel.sp=N (`lampseg plan "
                 "parallel.memory_gb=...` prints the largest cube per layout)")
    if batch > 1:
        hints.append("a smaller data.batch_size")
    hints.append("a smaller model (fewer channels)")
    why = (f"{name} needs {need:.3g} GB on its stage even checkpointing everything (with the skip tensors "
           f"it receives and passes on; a stage holds whole blocks)" if need > budget else
           f"every block fits on a stage of its own ({name}, the heaviest, needs {need:.3g} GB), but no "
           f"{pp} contiguous stage(s) of them do")
    return (f"no split of the model into {pp} stage(s) fits parallel.memory_gb={budget:g} GB per stage for "
            f"input {list(input_shape)} x batch {batch}: {why}. Would fit: " + "; or ".join(hints))


def largest_fitting_side(fit: Callable[[int], bool], divisor: int, smallest: int = 1,
                         limit: int = 4096) -> int:
    """The largest cube side, a multiple of ``divisor`` from ``smallest`` divisors up to ``limit``, for which
    ``fit(side)`` holds; 0 when none does. Memory grows with the side (for slabs too: side^2 x slab rows,
    and a slab's rows never shrink as the side grows), so ``fit`` holds up to some side and not beyond, and
    bisection finds it."""
    lo, hi = smallest - 1, limit // divisor  # in units of divisor
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fit(mid * divisor):
            lo = mid
        else:
            hi = mid - 1
    return lo * divisor if lo >= smallest else 0


def largest_cube(costs: list[BlockCost], pp: int, batch: int, budget: float, input_shape: list[int],
                 schedule: str = "gpipe", opt_states: int = 2, divisor: int = 1, limit: int = 4096,
                 skips: str = "carried") -> int:
    """Side of the largest cubic input (a multiple of ``divisor``) whose plan fits ``budget`` GB per stage
    with ``pp`` stages; 0 when none does. Activation, state and time costs scale with the number of voxels
    (parameters do not), so the costs profiled at ``input_shape`` are rescaled rather than re-measured.
    """
    voxels = math.prod(input_shape[1:])

    def fit(side: int) -> bool:
        return fits(scale_costs(costs, side**3 / voxels), pp, batch, budget, schedule, opt_states, skips)

    return largest_fitting_side(fit, divisor, limit=limit)


def scale_costs(costs: list[BlockCost], scale: float) -> list[BlockCost]:
    def n(v: float) -> int:
        return int(v * scale)

    return [BlockCost(c.name, c.params, c.param_bytes, c.time_s * scale, c.flops * scale, n(c.act_bytes),
                      n(c.in_bytes), n(c.out_bytes), n(c.saved_in_bytes), n(c.work_bytes),
                      n(c.workspace_bytes), [n(v) for v in c.in_sizes], list(c.through), n(c.extra_in_bytes),
                      n(c.extra_out_bytes), [n(v) for v in c.out_sizes], list(c.in_saved), list(c.out_saved),
                      n(c.image_copy_bytes), c.weight_copy_bytes, n(c.bwd_bytes), n(c.bwd1_bytes))
            for c in costs]


def planned_stages(parallel_cfg) -> tuple[int, bool]:
    """The one source of truth for the pipeline layout the planner plans: ``(parallel.pp, pipelined)``.

    ``plan`` honours ``parallel.pp`` with any ``parallel`` mode (a what-if on any machine); ``train``,
    ``evaluate`` and ``predict`` refuse ``parallel.pp > 1`` outside ``parallel=pipeline`` before they plan
    (``ParallelDims.from_config``). Pipelined runs may checkpoint activations and split batches into
    micro-batches; unsplit ones (single, DDP) do neither.
    """
    pp = int(parallel_cfg.pp)
    return pp, parallel_cfg.name == "pipeline" or pp > 1


def skip_routing(parallel_cfg) -> str:
    """How the configured engine moves skip tensors between stages: ``direct`` with ``engine=gpipe``
    (torchgpipe's skip API), else ``carried`` (``torch.distributed.pipelining`` stages only talk to their
    neighbours)."""
    return "direct" if enum_value(parallel_cfg.engine) == "gpipe" else "carried"


def profile_for(cfg, in_channels: int, out_channels: int, input_shape: list[int],
                device: torch.device | str = "cpu", targets=None) -> list[BlockCost]:
    """Per-block costs of ``cfg.model`` (a fresh copy: on meta tensors, or on ``device`` with
    ``parallel.profile=measure``) for one sample of ``input_shape`` (C, X, Y, Z). With ``targets``
    (``lampseg.model.losses.Targets``) the training loss's memory counts on the last block."""
    p = cfg.parallel
    source = enum_value(p.profile)
    where = torch.device("meta") if source == "estimate" else torch.device(device)
    with where:
        probe = build_model(cfg.model, in_channels, out_channels)
    loss_fn = target_fn = None
    if targets is not None:
        loss_fn, target_fn = build_loss(cfg.optim, targets), targets.loss_target
    return profile_blocks(probe, input_shape, source, where, p.device_tflops,
                          DTYPES[planned_precision(cfg).name], loss_fn=loss_fn, target_fn=target_fn,
                          plan_device=device)


def plan_for(cfg, in_channels: int, out_channels: int, input_shape: list[int],
             device: torch.device | str = "cpu", targets=None) -> tuple[Plan, list[BlockCost]]:
    """Profile ``cfg.model`` (``profile_for``) and plan its pipeline split under ``cfg.parallel``.

    Returns:
        The plan and the per-block costs it was made from.
    """
    p = cfg.parallel
    costs = profile_for(cfg, in_channels, out_channels, input_shape, device, targets)
    plan = make_plan(costs, p.pp, cfg.data.batch_size, p.memory_gb, input_shape, p.microbatches, p.schedule,
                     enum_value(p.checkpoint), enum_value(cfg.optim.name), enum_value(p.profile),
                     size_divisor(cfg.model), skip_routing(p))
    return plan, costs
