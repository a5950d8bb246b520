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
from functools import partial

import torch
from torch.utils.flop_counter import FlopCounterMode

from lampseg.model.blocks import unet_blocks
from lampseg.planner.backward import backward_bytes, backward_trace, onednn_buffer_ratios
from lampseg.runtime.memory import PeakMemory, tensor_bytes


@dataclass
class BlockCost:
    """Per-sample costs of one block (batch 1)."""

    name: str
    params: int
    param_bytes: int
    time_s: float  # forward + backward
    flops: float  # forward
    act_bytes: int  # activations saved for backward (the loss's included for the last block; no weights)
    in_bytes: int  # the block's input state (current activation and pending skips)
    out_bytes: int
    saved_in_bytes: int = 0  # part of act_bytes that is the block's own input (a stage's received buffer)
    work_bytes: int = 0  # largest saved tensor (~ the backward's gradient buffers, per sample)
    workspace_bytes: int = 0  # kernels' buffers per call that do not grow with the micro-batch
    in_sizes: list[int] = field(default_factory=list)  # bytes of each input state tensor
    through: list[int] = field(default_factory=list)  # per input tensor: its position in the output, or -1
    extra_in_bytes: int = 0  # first block: the fp32 image the pipeline keeps for the whole batch
    extra_out_bytes: int = 0  # last block: the loss target kept for the whole batch
    out_sizes: list[int] = field(default_factory=list)  # bytes of each output state tensor
    in_saved: list[bool] = field(default_factory=list)  # per input tensor: saved for backward by this block
    out_saved: list[bool] = field(default_factory=list)  # per output tensor: saved by this block itself
    image_copy_bytes: int = 0  # first block: its saved copies of the fp32 image (the image itself: 0)
    weight_copy_bytes: int = 0  # per micro-batch, not per sample: autocast's saved copies of the weights
    bwd_bytes: int = 0  # the block's backward working set, per sample (``backward.py``); 0: unknown
    bwd1_bytes: int = 0  # the same for micro-batches of one sample (CPU fp32: oneDNN's copies of them)


def _state_bytes(state) -> int:
    tensors = (state,) if isinstance(state, torch.Tensor) else state
    return sum(t.numel() * t.element_size() for t in tensors)


def profile_blocks(model: torch.nn.Module, input_shape: list[int], source: str = "estimate",
                   device: torch.device | str = "cpu", device_tflops: float = 10.0,
                   dtype: torch.dtype = torch.float32, repeats: int = 2, loss_fn=None,
                   target_fn=None, plan_device: torch.device | str | None = None) -> list[BlockCost]:
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
        plan_device: the device the costs are for. On a CPU with oneDNN, what its convolutions' backward
            allocates besides their gradients is measured there once per kind of convolution
            (``backward.onednn_buffer_ratios``); elsewhere it is taken as the larger of a convolution's
            input and incoming gradient.

    Returns:
        One ``BlockCost`` per block in execution order.
    """
    blocks, specs = unet_blocks(model)
    device = torch.device("meta" if source == "estimate" else device)
    state = torch.zeros([1, *input_shape], device=device, dtype=dtype)
    costs, states = [], []
    for block, spec in zip(blocks, specs):
        states.append(state)
        cost, state = _block_cost(block, spec.name, state, not costs, source, device_tflops, dtype, repeats)
        costs.append(cost)
    costs[0].extra_in_bytes = math.prod(input_shape) * 4  # the fp32 image batch stays on stage 0
    loss = None
    if loss_fn is not None:
        target = target_fn(torch.zeros([1, 1, *input_shape[1:]], dtype=torch.long, device=device))
        _add_loss(costs[-1], state, loss_fn, target)
        loss = partial(loss_fn, target=target)
    if source == "estimate":
        onednn = (plan_device is not None and torch.device(plan_device).type == "cpu"
                  and dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available())
        traces = [backward_trace(block, inputs, i > 0, loss if i == len(blocks) - 1 else None)
                  for i, (block, inputs) in enumerate(zip(blocks, states))]
        ratios = onednn_buffer_ratios({conv[1] for trace in traces for conv in trace[1]}) if onednn else None
        for cost, trace in zip(costs, traces):
            cost.bwd_bytes, cost.bwd1_bytes, cost.workspace_bytes = backward_bytes(
                trace, cost.saved_in_bytes, ratios)
    return costs


def _block_cost(block, name: str, state, first: bool, source: str, device_tflops: float, dtype: torch.dtype,
                repeats: int) -> tuple[BlockCost, object]:
    """One block's ``BlockCost`` for the input ``state`` (its backward working set only when measured:
    ``profile_blocks`` replays estimated ones), and its output state."""
    # Mixed precision keeps fp32 master weights: count parameters before casting for activation sizes.
    params = list(block.parameters())
    param_count, param_bytes = sum(p.numel() for p in params), sum(p.numel() * 4 for p in params)
    block.to(device=state[0].device if isinstance(state, tuple) else state.device, dtype=dtype)
    weight_keys = {_storage_key(p) for p in block.parameters()}
    inputs = tuple(t.detach().requires_grad_() for t in ((state,) if torch.is_tensor(state) else state))
    saved: dict[int, int] = {}
    uses: dict[int, int] = {}
    with FlopCounterMode(display=False) as counter, _counting_saved(saved, uses):
        out = block(inputs[0] if len(inputs) == 1 else inputs)
    work = max(saved.values(), default=0)  # the largest saved tensor (inference.py's intermediate)
    # Weights saved for backward are the weights themselves (counted with the parameters), or under
    # autocast their cast copies: one set per micro-batch, whatever its size.
    weights = sum(saved.pop(key) for key in weight_keys & saved.keys())
    flops = float(counter.get_total_flops())
    outs = out if isinstance(out, tuple) else (out,)
    out_ids = [id(t) for t in outs]
    through = [out_ids.index(id(t)) if id(t) in out_ids else -1 for t in inputs]
    cost = BlockCost(
        name, param_count, param_bytes, 3 * flops / (device_tflops * 1e12), flops, sum(saved.values()),
        _state_bytes(inputs), _state_bytes(out),
        saved_in_bytes=sum(saved.get(_storage_key(t), 0) for t in inputs), work_bytes=work,
        in_sizes=[_state_bytes(t) for t in inputs], through=through,
        out_sizes=[_state_bytes(t) for t in outs], in_saved=[_storage_key(t) in saved for t in inputs],
        out_saved=[_storage_key(t) in saved for t in outs],
        weight_copy_bytes=0 if dtype == torch.float32 else weights)
    if first:
        # The first stage's input is its micro-batch of the fp32 image (a view of the batch it keeps).
        # Computing in fp32, what the block saves of it is that view; under autocast every operation that
        # saves it saves a cast copy of its own (autocast caches casts only of leaves that require grad,
        # and the image does not).
        image_uses = sum(uses.get(_storage_key(t), 0) for t in inputs)
        cost.image_copy_bytes = 0 if dtype == torch.float32 else image_uses * cost.saved_in_bytes
    if source == "measure":  # its saved tensors, gradients, largest saved tensor and measured workspace
        cost.time_s = _time_block(block, inputs, repeats)
        cost.workspace_bytes = _measured_workspace_bytes(block, inputs, sum(saved.values()), work)
        grads = (sum(_state_bytes(t) for t, q in zip(inputs, through) if q < 0 and not first)
                 + sum(_state_bytes(t) for j, t in enumerate(outs) if j not in through))
        cost.bwd_bytes = cost.bwd1_bytes = cost.act_bytes + grads + work
    return cost, tuple(t.detach() for t in out) if isinstance(out, tuple) else out.detach()


def _add_loss(last: BlockCost, logits, loss_fn, target) -> None:
    """What the loss saves for backward, on the last block (the logits and the target aside: the stage
    keeps them for the whole batch anyway), and the target's size."""
    logits = logits.float().requires_grad_()
    saved: dict[int, int] = {}
    with _counting_saved(saved):
        loss_fn(logits, target)
    saved.pop(_storage_key(logits), None)
    saved.pop(_storage_key(target), None)
    last.act_bytes += sum(saved.values())
    last.work_bytes = max(last.work_bytes, *saved.values())
    last.extra_out_bytes = _state_bytes(target)


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata  # the storage, not the tensor: views of one buffer count once


def _counting_saved(saved: dict[int, int], uses: dict[int, int] | None = None):
    """Record the bytes of every storage autograd saves for backward (each storage once), and in ``uses``
    how many times each is saved."""
    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        saved[key] = t.untyped_storage().nbytes()
        if uses is not None:
            uses[key] = uses.get(key, 0) + 1
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
