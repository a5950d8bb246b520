"""The memory-aware inference planner (``inference.mode=auto``): estimate a forward pass's peak memory from
the planner's per-block costs and choose, per volume, what fits a budget.

    python -m lampseg evaluate ckpt=RUN/checkpoints/best.pt inference.mode=auto inference.memory_gb=2

(The training patch, ``data.patch_size=auto``, is the planner's: ``parallel.patch.auto_patch_size``.)
Inference: whole volume on one device when its estimated peak fits ``inference.memory_gb`` (default:
the device's free memory), split into the run's slabs (``parallel=spatial``: each rank holds its slab's
activations) or over its pipeline stages, else the largest sliding window that fits. If the device still
runs out of memory, ``infer`` releases it, falls back to the next smaller choice, warns once, and
finishes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lampseg.config import enum_value
from lampseg.data.sampling import whole_volume_shape
from lampseg.model.unet import build_model, size_divisor
from lampseg.planner.plan import planned_stages
from lampseg.planner.profile import profile_blocks
from lampseg.runtime.device import DTYPES, resolve_precision
from lampseg.runtime.memory import GB, free_memory_gb


@dataclass(frozen=True)
class InferenceMemory:
    """Estimated peak memory of one forward pass (no gradients), linear in the voxels it sees.

    Attributes:
        param_bytes: weights (fp32 masters plus, under autocast, their low-precision copies).
        act_bytes_per_voxel: the largest block's input + output + biggest intermediate, per input voxel.
        in_channels: image channels (the fp32 image is held whole).
        out_channels: logit channels (the fp32 logits are held whole; sliding windows add a count map).
        stages: pipeline stages the model is split over (activations and weights divide among them).
        budget_gb: what ``inference.mode=auto`` may use per device (``inference.memory_gb`` or the free
            memory when the estimate was made).
        devices: devices an unsplit model may be pipelined over for a whole volume that does not fit one
            (``inference.devices``; default: the visible GPUs, 1 on CPU).
        slabs: spatial slabs each volume is split into (``parallel.sp`` under ``parallel=spatial``): every
            rank keeps the weights, its slab of the image and of the logits, and its slab's activations
            (plus a halo row on each side; ``engine.slab_inference``).
        slab_act_bytes_per_voxel: a split block's peak per voxel of its slab: the unsplit one's plus a
            second copy of its input (the input with its halo rows, which the convolution reads).
    """

    param_bytes: int
    act_bytes_per_voxel: float
    in_channels: int
    out_channels: int
    stages: int = 1
    budget_gb: float = math.inf
    devices: int = 1
    slabs: int = 1
    slab_act_bytes_per_voxel: float = 0.0

    @classmethod
    def from_config(cls, model_cfg, in_channels: int, out_channels: int, precision: str = "fp32",
                    stages: int = 1, budget_gb: float = math.inf, devices: int = 1,
                    slabs: int = 1) -> InferenceMemory:
        """Profile ``model_cfg``'s U-Net on meta tensors (no memory, milliseconds)."""
        side = 4 * size_divisor(model_cfg)
        with torch.device("meta"):
            probe = build_model(model_cfg, in_channels, out_channels)
        dtype = DTYPES[enum_value(precision)]
        costs = profile_blocks(probe, [in_channels, side, side, side], "estimate", "meta", dtype=dtype)
        params = sum(c.param_bytes for c in costs)
        if dtype != torch.float32:
            params += sum(c.params for c in costs) * torch.finfo(dtype).bits // 8  # autocast's weight cache
        # A residual unit holds two intermediates at once (convolution and normalisation outputs): 2x the
        # largest. Checked against bench inference's measured peaks (whole and 64-128^3 windows: within 10 %).
        act = max(c.in_bytes + c.out_bytes + 2 * c.work_bytes for c in costs)
        # Measured with bench spatial (128^3, 2 and 4 slabs): the haloed copy is the extra (within 15 %).
        slab_act = max(2 * c.in_bytes + c.out_bytes + 2 * c.work_bytes for c in costs)
        return cls(params, act / side**3, in_channels, out_channels, stages, budget_gb, devices, slabs,
                   slab_act / side**3)

    def whole_gb(self, shape: list[int], split: int | None = None) -> float:
        """Peak GB per device for the whole (padded) volume ``shape`` in one pass, over ``split`` devices
        (default: the model's stages), each stage split into ``slabs`` (each rank holding its slab of the
        fp32 image and logits, never the whole volume's)."""
        stages = split or self.stages
        if self.slabs == 1:
            voxels, act = math.prod(shape), self.act_bytes_per_voxel
        else:
            voxels = math.prod(shape) / self.slabs * (1 + 2 * self.slabs / shape[0])  # + halo rows
            act = self.slab_act_bytes_per_voxel
        held = 4 * voxels * (self.in_channels + self.out_channels)  # fp32 image and logits
        return (held + self.param_bytes / stages + act * voxels / stages) / GB

    def sliding_gb(self, volume: list[int], window: list[int], sw_batch_size: int) -> float:
        """Peak GB for sliding windows of ``window`` over ``volume`` (MONAI keeps the fp32 output sum
        and a count map of the whole volume)."""
        voxels = math.prod(volume)
        held = 4 * voxels * (self.in_channels + self.out_channels + 1)
        windows = sw_batch_size * math.prod(window)
        return (held + self.param_bytes + self.act_bytes_per_voxel * windows
                + 4 * windows * (self.in_channels + self.out_channels)) / GB


def largest_inference_cube(memory: InferenceMemory, budget_gb: float, divisor: int, limit: int = 4096) -> int:
    """The largest whole cube (a multiple of ``divisor``, at least one ``divisor`` per slab) whose one-pass
    inference fits ``budget_gb`` per device with ``memory.slabs`` slabs (0: none)."""
    best, side = 0, divisor * memory.slabs
    while side <= limit and memory.whole_gb([side] * 3) <= budget_gb:
        best, side = side, side + divisor
    return best


@dataclass
class ModeChoice:
    """What ``inference.mode=auto`` chose for one volume, and why."""

    mode: str  # whole | sliding
    window: list[int] | None
    estimate_gb: float
    budget_gb: float
    reason: str
    fallbacks: list[str] = field(default_factory=list)  # out-of-memory errors that moved it down
    split: int = 1  # > 1: an unsplit model pipelined over this many devices for the whole volume

    def to_dict(self) -> dict:
        return {"mode": self.mode, "window": self.window, "split_over_devices": self.split,
                "estimate_gb": round(self.estimate_gb, 4), "budget_gb": round(self.budget_gb, 4),
                "reason": self.reason, "fallbacks": self.fallbacks}


def windows_to_try(volume: list[int], divisor: int, below: int | None = None) -> list[list[int]]:
    """Sliding windows from the padded volume's largest side down, one ``divisor`` step at a time
    (each axis capped at the padded volume), strictly smaller than a side of ``below`` when given."""
    padded = whole_volume_shape([volume], divisor)
    top = max(padded) if below is None else below - divisor
    return [[min(side, p) for p in padded] for side in range(top, 2 * divisor - 1, -divisor)]


def largest_fitting_window(memory: InferenceMemory, volume: list[int], windows: list[list[int]],
                           sw_batch_size: int) -> tuple[list[int], float] | None:
    """The first of ``windows`` (largest first) whose sliding estimate fits ``memory.budget_gb``, with that
    estimate; None when none does."""
    for window in windows:
        need = memory.sliding_gb(volume, window, sw_batch_size)
        if need <= memory.budget_gb:
            return window, need
    return None


def choose_mode(memory: InferenceMemory, volume: list[int], divisor: int, sw_batch_size: int) -> ModeChoice:
    """Whole volume if it fits ``memory.budget_gb`` (split over the model's stages when pipelined, or over
    ``memory.devices`` devices), else the largest sliding window that fits, else the smallest window (with
    the reason saying it may not fit)."""
    budget_gb = memory.budget_gb
    padded = whole_volume_shape([volume], divisor)
    whole = memory.whole_gb(padded)
    if whole <= budget_gb:
        where = "one device" if memory.stages == 1 else f"{memory.stages} pipeline stages"
        if memory.slabs > 1:
            where = f"each of {memory.slabs} slabs" + ("" if memory.stages == 1 else f" of {where}")
        return ModeChoice("whole", None, whole, budget_gb,
                          f"the whole volume needs ~{whole:.3g} GB on {where}, within {budget_gb:.3g} GB")
    if memory.stages == 1 and memory.slabs == 1 and memory.devices > 1:
        split = memory.whole_gb(padded, memory.devices)
        if split <= budget_gb:
            return ModeChoice("whole", None, split, budget_gb,
                              f"the whole volume needs ~{whole:.3g} GB on one device > {budget_gb:.3g} GB; "
                              f"pipelined over {memory.devices} devices ~{split:.3g} GB each",
                              split=memory.devices)
    candidates = windows_to_try(volume, divisor)
    fitting = largest_fitting_window(memory, volume, candidates, sw_batch_size)
    if fitting is not None:
        window, need = fitting
        return ModeChoice("sliding", window, need, budget_gb,
                          f"the whole volume needs ~{whole:.3g} GB > {budget_gb:.3g} GB; the largest "
                          f"window that fits is {window} (~{need:.3g} GB)")
    window = candidates[-1] if candidates else padded
    need = memory.sliding_gb(volume, window, sw_batch_size)
    return ModeChoice("sliding", window, need, budget_gb,
                      f"nothing is estimated to fit {budget_gb:.3g} GB (whole ~{whole:.3g} GB); trying the "
                      f"smallest window {window} (~{need:.3g} GB)")


def inference_memory(cfg, in_channels: int, out_channels: int,
                     device: torch.device) -> InferenceMemory | None:
    """The model's estimate and this process's budget for ``inference.mode=auto`` (None for other modes).

    The budget is ``inference.memory_gb`` or the device's free memory now; in a torchrun job, the smallest
    over its processes, so that every pipeline stage and replica makes the same choice.
    """
    if enum_value(cfg.inference.mode) != "auto":
        return None
    budget = cfg.inference.memory_gb if cfg.inference.memory_gb is not None else free_memory_gb(device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        smallest = torch.tensor([budget], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(smallest, op=torch.distributed.ReduceOp.MIN)
        budget = float(smallest.item())
    stages = planned_stages(cfg.parallel)[0]
    devices = cfg.inference.devices
    if devices is None:
        devices = torch.cuda.device_count() if device.type == "cuda" else 1
    slabs = int(cfg.parallel.sp) if cfg.parallel.name == "spatial" else 1
    precision = resolve_precision(cfg.trainer.precision, device).name
    return InferenceMemory.from_config(cfg.model, in_channels, out_channels, precision, stages,
                                       budget, devices, slabs)
