"""The ``pipelining`` engine: one pipeline stage per process with ``torch.distributed.pipelining``.

    torchrun --nproc_per_node 2 -m lampseg train parallel=pipeline parallel.pp=2 data.batch_size=4

Every rank builds the same unsplit U-Net (same seed), keeps the plan's blocks for its stage on its device
and trains them with a GPipe or 1F1B schedule over the plan's micro-batches. Tensors between stages are
the blocks' states (activation plus pending skips), contiguous, in the autocast dtype. Inference is SPMD:
every rank calls ``forward(x)`` with the same input, the stages pass it along point to point, and the last
stage broadcasts the logits so validation, ``evaluate`` and ``predict`` run unchanged on every rank.
Checkpoints are gathered on rank 0 under the unsplit parameter names. Data parallelism over the replicas of
a stage (DP x PP) is applied by ``parallelize``, which wraps the stage in DDP (``wrap_stage``).
"""
from __future__ import annotations

import gc
import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from lampseg.config import ConfigError
from lampseg.model.blocks import BlockSequence, unet_blocks
from lampseg.parallel.kernels import steer_convolutions
from lampseg.planner.decisions import Plan
from lampseg.runtime.device import DTYPES, autocast, resolve_precision
from lampseg.runtime.memory import GB, PeakMemory, tensor_bytes

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


class StageModule(BlockSequence):
    """The blocks of one stage under autocast, with the plan's activation checkpointing.

    Takes the received state tensors as separate arguments and returns contiguous tensors in the wire
    dtype (communication backends send and receive dense buffers of one agreed dtype).
    """

    def __init__(self, blocks: list[nn.Module], checkpoint: str, precision: str, device: torch.device):
        super().__init__(blocks, checkpoint)
        self.precision, self.device = precision, device
        # the weights' dtype: fp32, or float64 for a double model (the exactness tests)
        self.param_dtype = next((p.dtype for p in self.parameters()), torch.float32)
        self.wire_dtype = wire_dtype(precision, device, self.param_dtype)

    def forward(self, *tensors: torch.Tensor):
        state = tensors[0] if len(tensors) == 1 else tensors
        with autocast(self.device, self.precision):
            out = super().forward(state)
        outs = tuple(t.to(self.wire_dtype).contiguous() for t in (out if isinstance(out, tuple) else (out,)))
        return outs[0] if len(outs) == 1 else outs


def wire_dtype(precision: str, device: torch.device, param_dtype: torch.dtype = torch.float32) -> torch.dtype:
    """dtype of the tensors sent between stages: the autocast dtype (halves traffic), or without autocast
    the weights' dtype (fp32)."""
    precision = resolve_precision(precision, device).name
    if precision == "fp32" or (precision == "fp16" and device.type != "cuda"):
        return param_dtype
    return DTYPES[precision]


class PipelinedUNet(nn.Module):
    """This rank's stage of a U-Net split by ``plan``.

    Args:
        model: the unsplit MONAI UNet (identical on every rank); this rank's blocks move to ``device``.
        probe: the same architecture on the meta device, for the shapes that cross stage boundaries.
        plan: the partition (stage blocks, micro-batches, schedule, checkpointing), the same on all ranks.
        device: this rank's device.
        precision: ``trainer.precision``.
        group: the pipeline's process group (None: the whole job).

    Attributes:
        trained: what the schedule trains: the stage's module, or (``wrap_stage``, by ``parallelize`` for
            DP x PP) that module in ``DistributedDataParallel`` over the stage's replicas; ``PipelineStage``
            syncs its gradients on the last micro-batch's backward only.
    """

    def __init__(self, model: nn.Module, probe: nn.Module, plan: Plan, device: torch.device, precision: str,
                 group: dist.ProcessGroup | None = None):
        super().__init__()
        self.plan, self.device, self.group = plan, device, group
        self.pp_rank, self.pp = dist.get_rank(group), dist.get_world_size(group)
        if self.pp != plan.pp:
            raise ConfigError(f"config key 'parallel.pp': the plan has {plan.pp} stages but the pipeline "
                              f"group has {self.pp} processes")
        if plan.schedule == "1f1b" and plan.microbatches < plan.pp:
            raise ConfigError(f"config key 'parallel.microbatches': parallel.schedule=1f1b needs at least as "
                              f"many micro-batches as stages ({plan.pp}), got {plan.microbatches}")
        blocks, specs = unet_blocks(model)
        names = [s.name for s in specs]
        bounds, start = [], 0
        for stage in plan.stages:
            if names[start:start + len(stage.blocks)] != list(stage.blocks):
                raise ConfigError(f"the plan's stages {[s.blocks for s in plan.stages]} do not match the "
                                  f"model's blocks {names}")
            bounds.append((start, start + len(stage.blocks)))
            start += len(stage.blocks)
        self.bounds = bounds
        lo, hi = bounds[self.pp_rank]
        self.prefixes = [s.prefix for s in specs[lo:hi]]
        for block in blocks[lo:hi]:
            block.to(device)
            if device.type == "cpu":  # micro-batches of one sample off PyTorch's im2col kernels (kernels.py)
                steer_convolutions(block, transposed=True)
        self.stage_module = StageModule(blocks[lo:hi], plan.checkpoint, precision, device)
        self._trained = [self.stage_module]  # a list: not a second registration of the same parameters
        self._probe_blocks = unet_blocks(probe)[0]
        self._model = [model]  # a list: not a submodule, so parameters() are this stage's only
        self._shapes: dict[tuple, list[list[torch.Size]]] = {}
        self._schedules: dict[tuple, object] = {}
        self.out_channels = int(model.out_channels)

    @property
    def trained(self) -> nn.Module:
        return self._trained[0]

    def wrap_stage(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Train the stage through ``wrap(stage_module)`` (``parallelize``: DDP over the stage's replicas)."""
        self.release_buffers()  # schedules hold the module they were built for
        self._trained = [wrap(self.stage_module)]

    # ---- ranks and shapes ------------------------------------------------------------------------
    def _global(self, pp_rank: int) -> int:
        return pp_rank if self.group is None else dist.get_global_rank(self.group, pp_rank)

    @property
    def is_first(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last(self) -> bool:
        return self.pp_rank == self.pp - 1

    def owns(self, name: str) -> bool:
        """Whether a state-dict entry of the unsplit model belongs to this stage."""
        return any(name == p or name.startswith(p + ".") for p in self.prefixes)

    @torch.no_grad()
    def boundary_shapes(self, input_shape: tuple[int, ...]) -> list[list[torch.Size]]:
        """Shapes of the state entering each stage, and (last entry) of the output, for one input shape."""
        key = tuple(input_shape)
        if key not in self._shapes:
            state = torch.empty(key, device="meta")
            shapes = []
            for lo, hi in self.bounds:
                shapes.append([t.shape for t in (state if isinstance(state, tuple) else (state,))])
                for block in self._probe_blocks[lo:hi]:
                    state = block(state)
            shapes.append([state.shape])
            self._shapes[key] = shapes
        return self._shapes[key]

    def _examples(self, shapes: list[torch.Size], first: bool) -> tuple[torch.Tensor, ...]:
        dtype = self.stage_module.param_dtype if first else self.stage_module.wire_dtype
        return tuple(torch.empty(s, dtype=dtype, device=self.device).requires_grad_(not first)
                     for s in shapes)

    # ---- training --------------------------------------------------------------------------------
    def _schedule(self, batch_shape: tuple[int, ...], loss_fn):
        key = tuple(batch_shape)
        if key not in self._schedules:
            self.release_buffers()  # a new input size (curriculum phase): the old buffers are dead weight
            micro = list(batch_shape)
            if micro[0] % self.plan.microbatches:
                raise ConfigError(f"config key 'data.batch_size': {micro[0]} is not divisible by the plan's "
                                  f"{self.plan.microbatches} micro-batches")
            micro[0] //= self.plan.microbatches
            shapes = self.boundary_shapes(tuple(micro))
            inputs = self._examples(shapes[self.pp_rank], self.is_first)
            # Outputs that require grad: the stage derives "receive a gradient for it" from these examples.
            outputs = tuple(torch.empty(s, dtype=self.stage_module.wire_dtype, device=self.device
                                        ).requires_grad_() for s in shapes[self.pp_rank + 1])
            stage = PipelineStage(self.trained, self.pp_rank, self.pp, self.device, input_args=inputs,
                                  output_args=outputs[0] if len(outputs) == 1 else outputs, group=self.group)
            self._schedules[key] = SCHEDULES[self.plan.schedule](
                stage, self.plan.microbatches,
                loss_fn=lambda out, target: loss_fn(out.to(torch.promote_types(out.dtype, torch.float32)),
                                                    target))
        return self._schedules[key]

    def release_buffers(self) -> None:
        """Drop the schedule and its per-micro-batch communication buffers (rebuilt on the next step)."""
        self._schedules.clear()

    def train_step(self, image: torch.Tensor, target: torch.Tensor, loss_fn) -> float:
        """Forward and backward of one batch through the pipeline (gradients land in this stage's
        parameters, averaged over micro-batches); every rank passes the same batch.

        Returns:
            The batch's loss (mean over micro-batches), on every rank.
        """
        schedule = self._schedule(tuple(image.shape), loss_fn)
        losses: list[torch.Tensor] = []
        inputs = (image.to(self.device),) if self.is_first else ()
        kwargs = {"target": target.to(self.device), "losses": losses} if self.is_last else {}
        schedule.step(*inputs, **kwargs)
        value = torch.zeros(1, dtype=torch.float64, device=self.device)
        if self.is_last:
            value += sum(float(v.detach()) for v in losses) / len(losses)
        dist.broadcast(value, src=self._global(self.pp - 1), group=self.group)
        return float(value)

    def measure_step(self, step, optimizer: torch.optim.Optimizer, image: torch.Tensor, target: torch.Tensor
                     ) -> tuple[float, dict]:
        """Run ``step(image, target)`` (one optimiser step, on every rank) and measure this stage's peak
        memory: on CUDA the peak allocated; on CPU what the stage holds at entry (weights, optimiser state,
        its share of the batch) plus the peak the step allocates (``PeakMemory``). Gradients and the
        schedule's buffers are released first so that they are allocated, and seen, inside the step.

        Returns:
            The step's loss and ``{"stage", "blocks", "planned_gb", "measured_gb", "static_gb"}``.
        """
        optimizer.zero_grad(set_to_none=True)
        self.release_buffers()
        gc.collect()
        params = tensor_bytes(self.parameters())
        opt_state = tensor_bytes(v for state in optimizer.state.values() for v in state.values()
                                 if torch.is_tensor(v))
        if self.device.type == "cuda":
            held = torch.cuda.memory_allocated(self.device)
        else:  # the profiler sees allocations only: add what is already there
            held = (params + opt_state + (tensor_bytes([image]) if self.is_first else 0)
                    + (tensor_bytes([target]) if self.is_last else 0))
        with PeakMemory(self.device) as peak:
            loss = step(image, target)
        grads = tensor_bytes(p.grad for p in self.parameters())
        stage = self.plan.stages[self.pp_rank]
        return loss, {"stage": self.pp_rank, "blocks": list(stage.blocks), "planned_gb": stage.memory_gb,
                      "measured_gb": (held + peak.bytes) / GB, "planned_static_gb": stage.static_gb,
                      "static_gb": (params + grads + opt_state) / GB}

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip by the global gradient norm over all stages (what the unsplit model would clip by)."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        squares = torch.zeros(1, dtype=torch.float64, device=self.device)
        for g in grads:
            squares += g.detach().double().pow(2).sum()
        dist.all_reduce(squares, group=self.group)
        total = math.sqrt(float(squares))
        scale = min(1.0, max_norm / (total + 1e-6))
        for g in grads:
            g.mul_(scale)
        return total

    # ---- inference -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for ``x`` (the same on every rank), returned on every rank. Inference only."""
        if torch.is_grad_enabled() and self.training:
            raise RuntimeError("PipelinedUNet trains through train_step(); forward() is for inference")
        shapes = self.boundary_shapes(tuple(x.shape))
        if self.is_first:
            state = (x.to(self.device),)
        else:
            state = tuple(torch.empty(s, dtype=self.stage_module.wire_dtype, device=self.device)
                          for s in shapes[self.pp_rank])
            for t in state:
                dist.recv(t, src=self._global(self.pp_rank - 1), group=self.group)
        out = self.stage_module(*state)
        if not self.is_last:
            for t in out if isinstance(out, tuple) else (out,):
                dist.send(t, dst=self._global(self.pp_rank + 1), group=self.group)
            out = torch.empty(shapes[-1][0], dtype=self.stage_module.wire_dtype, device=self.device)
        dist.broadcast(out, src=self._global(self.pp - 1), group=self.group)
        return out

    # ---- checkpoints -----------------------------------------------------------------------------
    def gather_on_first(self, local: dict) -> list[dict] | None:
        """Every stage's ``local`` dict, on the first stage (None elsewhere)."""
        parts = [None] * self.pp if self.is_first else None
        dist.gather_object(local, parts, dst=self._global(0), group=self.group)
        return parts

    def full_state_dict(self) -> dict | None:
        """The unsplit model's state dict (CPU tensors, unsplit names) on the first stage, None elsewhere."""
        model = self._model[0]
        local = {k: v.detach().cpu() for k, v in model.state_dict().items() if self.owns(k)}
        parts = self.gather_on_first(local)
        if parts is None:
            return None
        merged = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        for part in parts:
            merged.update(part)
        return merged
