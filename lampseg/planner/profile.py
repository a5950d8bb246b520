"""Profile a U-Net block by block: per-sample time, memory saved for backward, state and parameter sizes.

    costs = profile_blocks(model, [4, 128, 128, 128], "estimate")   # meta tensors + FLOPs, no memory used

Two sources: ``measure`` runs each block on the real device (and measures kernel workspace);
``estimate`` runs it on meta tensors (sizes without memory) and converts FLOPs to time with an
assumed device throughput, so users can plan for hardware they do not have. ``plan.py`` turns the
costs into pipeline stages.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

from lampseg.model.blocks import unet_blocks
from lampseg.runtime.memory import PeakMemory, tensor_bytes


@dataclass
class BlockCost:
    """Per-sample costs of one block (batch 1)."""

    name: str
    params: int
    param_bytes: int
    time_s: float  # forward + backward
    flops: float  # forward
    act_bytes: int  # saved for backward (the loss's saved tensors included for the last block)
    in_bytes: int  # the block's input state (current activation and pending skips)
    out_bytes: int
    saved_in_bytes: int = 0  # part of act_bytes that is the block's own input (a stage's received buffer)
    work_bytes: int = 0  # largest saved tensor (~ the backward's gradient buffers, per sample)
    workspace_bytes: int = 0  # measured only: kernel workspace beyond that (e.g. CPU fp32 im2col), per call
    in_sizes: list[int] = field(default_factory=list)  # bytes of each input state tensor
    through: list[int] = field(default_factory=list)  # per input tensor: its position in the output, or -1
    extra_in_bytes: int = 0  # first block: the fp32 image the pipeline keeps for the whole batch
    extra_out_bytes: int = 0  # last block: the loss target kept for the whole batch


def _state_bytes(state) -> int:
    tensors = (state,) if isinstance(state, torch.Tensor) else state
    return sum(t.numel() * t.element_size() for t in tensors)


def profile_blocks(model: torch.nn.Module, input_shape: list[int], source: str = "estimate",
                   device: torch.device | str = "cpu", device_tflops: float = 10.0,
                   dtype: torch.dtype = torch.float32, repeats: int = 2, loss_fn=None,
                   target_fn=None) -> list[BlockCost]:
    """Per-sample costs of each block of a MONAI UNet.

    Args:
        model: the UNet (on the meta device for ``estimate``; any device for ``measure``).
        input_shape: (C, X, Y, Z) of one sample.
        source: ``estimate`` (meta tensors + FLOPs) or ``measure`` (timed on ``device``).
        device: where to measure.
        device_tflops: assumed sustained throughput for estimates.
        dtype: activation dtype (autocast precision is approximated by the element size).
        repeats: timed repetitions per block when measuring (after one warm-up).
        loss_fn: the training loss; what it saves for backward is added to the last block's.
        target_fn: ``(B, 1, X, Y, Z)`` label map on a device -> the loss target (with ``loss_fn``).

    Returns:
        One ``BlockCost`` per block in execution order.
    """
    blocks, specs = unet_blocks(model)
    device = torch.device("meta" if source == "estimate" else device)
    state = torch.zeros([1, *input_shape], device=device, dtype=dtype)
    costs = []
    for block, spec in zip(blocks, specs):
        # Mixed precision keeps fp32 master weights: count parameters before casting for activation sizes.
        params = list(block.parameters())
        param_count, param_bytes = sum(p.numel() for p in params), sum(p.numel() * 4 for p in params)
        block.to(device=device, dtype=dtype)
        inputs = tuple(t.detach().requires_grad_() for t in ((state,) if torch.is_tensor(state) else state))
        saved: dict[int, int] = {}
        with FlopCounterMode(display=False) as counter, _counting_saved(saved):
            out = block(inputs[0] if len(inputs) == 1 else inputs)
        flops = float(counter.get_total_flops())
        elapsed = 3 * flops / (device_tflops * 1e12)
        workspace = 0
        if source == "measure":
            elapsed = _time_block(block, inputs, repeats)
            workspace = _measured_workspace_bytes(block, inputs, sum(saved.values()),
                                                  max(saved.values(), default=0))
        outs = out if isinstance(out, tuple) else (out,)
        out_ids = [id(t) for t in outs]
        costs.append(BlockCost(
            spec.name, param_count, param_bytes, elapsed, flops, sum(saved.values()), _state_bytes(inputs),
            _state_bytes(out), saved_in_bytes=sum(saved.get(_storage_key(t), 0) for t in inputs),
            work_bytes=max(saved.values(), default=0), workspace_bytes=workspace,
            in_sizes=[_state_bytes(t) for t in inputs],
            through=[out_ids.index(id(t)) if id(t) in out_ids else -1 for t in inputs]))
        state = tuple(t.detach() for t in out) if isinstance(out, tuple) else out.detach()
    costs[0].extra_in_bytes = math.prod(input_shape) * 4  # the fp32 image batch stays on stage 0
    if loss_fn is not None:
        logits = state.float().requires_grad_()
        target = target_fn(torch.zeros([1, 1, *input_shape[1:]], dtype=torch.long, device=device))
        saved = {}
        with _counting_saved(saved):
            loss_fn(logits, target)
        last = costs[-1]
        last.act_bytes += sum(saved.values())
        last.work_bytes = max(last.work_bytes, *saved.values())
        last.extra_out_bytes = _state_bytes(target)
    return costs


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata  # the storage, not the tensor: views of one buffer count once


def _counting_saved(saved: dict[int, int]):
    """Record the bytes of every storage autograd saves for backward (each storage once)."""
    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[_storage_key(t)] = t.untyped_storage().nbytes()
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


def _measured_workspace_bytes(block, inputs, saved_bytes: int, largest_saved: int) -> int:
    """What a block's forward + backward allocates beyond its saved tensors, output, output and input
    gradients and parameter gradients: convolution workspaces (e.g. CPU fp32 im2col buffers)."""
    block.zero_grad(set_to_none=True)
    for t in inputs:
        t.grad = None
    with PeakMemory(inputs[0].device) as peak:
        out = block(inputs[0] if len(inputs) == 1 else inputs)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    accounted = (saved_bytes + 2 * _state_bytes(outs) + _state_bytes(inputs)
                 + tensor_bytes(p.grad for p in block.parameters()))
    return max(0, peak.bytes - accounted - largest_saved)  # largest_saved: counted as work_bytes


def _time_block(block, inputs, repeats: int) -> float:
    def step():
        out = block(inputs[0] if len(inputs) == 1 else inputs)
        outs = out if isinstance(out, tuple) else (out,)
        sum(o.float().sum() for o in outs).backward()

    step()
    sync = torch.cuda.synchronize if inputs[0].is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    sync()
    return (time.perf_counter() - start) / repeats
