"""The backward of a block replayed on meta tensors, op by op: the peak of what it holds while its gradients
are computed, with the buffers the convolution kernels of the planned device allocate on top (``profile.py``'s
``BlockCost.bwd_bytes``; ``plan.stage_cost`` builds each pipeline stage's peak from them).

On a CPU with oneDNN what a convolution's backward allocates besides its gradients is measured once per kind
of convolution and process (``onednn_buffer_ratios``); elsewhere it is taken as the larger of the
convolution's input and incoming gradient.
"""
from __future__ import annotations

import math
from functools import partial

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lampseg.runtime.memory import section_peaks, tensor_bytes


def _im2col(shape: torch.Size) -> bool:
    """PyTorch's choice of its im2col kernel for an fp32 CPU convolution of an input of ``shape`` at batch 1
    (``use_mkldnn`` in aten/src/ATen/native/Convolution.cpp; ``parallel.kernels`` steers pipeline stages'
    convolutions off it, onto oneDNN's own tensors)."""
    return math.prod(shape[:4]) <= 20480


class _LiveBytes(TorchDispatchMode):
    """Bytes held by the tensors that operations make, op by op (a storage counts from the operation that
    makes it until it is freed; frees are seen at the next operation), their peak since ``reset``, and
    each convolution backward since then: ``(bytes held after it, convolution, the larger of its input
    and incoming gradient, the bytes of both)`` (its kernels' buffers come on top: ``backward_bytes``)."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}
        self.now = self.peak = 0
        self.convs: list[tuple[int, tuple, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                if ref.cdata not in self.storages:
                    self.storages[ref.cdata] = (ref, t.untyped_storage().nbytes())
                    self.now += t.untyped_storage().nbytes()
        for key in [k for k, (ref, _) in self.storages.items() if ref.expired()]:
            self.now -= self.storages.pop(key)[1]
        self.peak = max(self.peak, self.now)
        if func is torch.ops.aten.convolution_backward.default:
            grad, x, weight, _, stride, padding, dilation, transposed, output_padding, groups, mask = (
                args[:11])
            cin, cout = (weight.shape[0], weight.shape[1] * groups) if transposed else (
                weight.shape[1] * groups, weight.shape[0])
            kind = (bool(transposed), cin, cout, tuple(weight.shape[2:]), tuple(stride), tuple(padding),
                    tuple(dilation), tuple(output_padding), groups, x.dtype, bool(mask[0]),
                    tuple(x.shape[2:]))
            sizes = tensor_bytes([x]), tensor_bytes([grad])
            copies = sum(sizes) if x.dtype == torch.float32 and _im2col(x.shape) else 0
            self.convs.append((self.now, kind, max(sizes), copies))
        return out

    def reset(self) -> None:
        self.peak, self.convs = self.now, []


def backward_trace(block, state, grad_in: bool, loss=None) -> tuple[int, list, int]:
    """The block's forward and backward (and the loss's, for the last block) replayed on meta tensors, op by
    op (``_LiveBytes``), its inputs given: the peak during the backward, the convolution backwards, and the
    bytes of the outputs it makes (the stage holds those)."""
    state = (state,) if torch.is_tensor(state) else state
    inputs = tuple(t.detach().requires_grad_(grad_in) for t in state)
    live = _LiveBytes()
    with live:
        out = block(inputs[0] if len(inputs) == 1 else inputs)
        outs = out if isinstance(out, tuple) else (out,)
        made = [o for o in outs if not any(o is t for t in inputs)]
        if loss is not None:
            roots, grads = [loss(made[0].float())], None
        else:
            roots, grads = made, [torch.ones_like(o) for o in made]
        live.reset()
        torch.autograd.backward(roots, grads)
    return live.peak, live.convs, tensor_bytes(made)


def backward_bytes(trace: tuple[int, list, int], saved_in: int, ratios: dict | None) -> tuple[int, int, int]:
    """``BlockCost.bwd_bytes``, ``bwd1_bytes`` and ``workspace_bytes`` from a block's ``backward_trace``:
    the peak during its backward of its saved tensors (its saved input too), the gradients and the
    convolution kernels' buffers while they run, not counting the outputs it makes; the kernels' buffers
    are those measured on this CPU (``ratios``: ``onednn_buffer_ratios``, per sample, the part that does
    not grow with the micro-batch in ``workspace_bytes``; micro-batches of one sample add the copies
    ``parallel.kernels`` gives oneDNN), or elsewhere as much as a convolution's larger operand (a
    workspace allowance)."""
    peak, convs, made = trace
    peak1, fixed = peak, 0
    for held, kind, larger, copies in convs:
        per_call, per_sample = (0.0, 1.0) if ratios is None else ratios[kind]
        buffers = int(per_sample * larger)
        fixed = max(fixed, int(per_call * larger))
        peak = max(peak, held + buffers)
        peak1 = max(peak1, held + buffers + (0 if ratios is None else copies))
    return max(0, peak + saved_in - made), max(0, peak1 + saved_in - made), fixed


_RATIOS: dict[tuple, tuple[float, float]] = {}
_CALIBRATION_BYTES, _CALIBRATION_FLOPS = 16 * 2**20, 1e9  # a convolution's larger operand, its work: at most


def onednn_buffer_ratios(kinds: set[tuple]) -> dict[tuple, tuple[float, float]]:
    """What a convolution's backward allocates on this CPU besides the gradients it returns (oneDNN's
    copies of the input, the incoming gradient and the input's gradient in its blocked layouts, channels
    padded to its vector width, and its scratch buffers): ``(per call, per sample)``, in bytes per byte of
    the larger of its input and incoming gradient for one sample. In fp32 about 0 and 2 for channel counts
    of multiples of 16 on AVX-512, 7 per sample for a 4-channel convolution; in bf16 the part per call is
    large (5 MB for the 4-channel image's convolution at 48^3) and the part per sample smaller.

    Per kind of convolution ``(transposed, in and out channels, kernel, stride, padding, dilation, output
    padding, groups, dtype, input gradient, the input's spatial shape)``, measured once per process at
    batch 2 and 4 (PyTorch's oneDNN kernels at any size), all in one profiler session
    (``runtime.memory.section_peaks``); at the input's shape, or for large ones (more than
    ``_CALIBRATION_BYTES`` or ``_CALIBRATION_FLOPS`` at batch 4) a smaller one, and the channels of wide
    layers halved alike while both stay multiples of 32 (the same layouts in a fraction of the time)."""
    calls = {}
    rng = torch.Generator().manual_seed(0)  # not the global generator: planning leaves training's draws alone
    for kind in kinds - _RATIOS.keys():
        transposed, cin, cout, kernel, stride, padding, dilation, output_padding, groups = kind[:9]
        dtype, grad_x, shape = kind[9:]
        out_per_in = math.prod(stride) if transposed else 1 / math.prod(stride)  # output voxels per input's
        actual = math.prod(shape) * max(cin, cout * out_per_in) * dtype.itemsize  # its larger operand
        while groups == 1 and cin % 32 == 0 and cout % 32 == 0 and max(cin, cout) > 64:
            cin, cout = cin // 2, cout // 2
        unit = max(stride)
        voxels = math.prod(shape)
        larger = 4 * voxels * max(cin, cout * out_per_in) * dtype.itemsize
        work = 4 * voxels * min(1.0, out_per_in) * cin * cout * math.prod(kernel) * 2 / groups
        scale = min(1.0, (_CALIBRATION_BYTES / larger) ** (1 / 3), (_CALIBRATION_FLOPS / work) ** (1 / 3))
        side = [max(2 * unit, round(d * scale / unit) * unit) for d in shape]
        conv = (list(stride), list(padding), list(dilation), transposed, list(output_padding), groups)
        w_shape = (cin, cout // groups) if transposed else (cout, cin // groups)
        w = torch.randn(*w_shape, *kernel, dtype=dtype, generator=rng)
        for batch in (2, 4):
            x = torch.randn(batch, cin, *side, dtype=dtype, generator=rng)
            out = torch.ops.aten.convolution(x, w, None, *conv)
            g = torch.randn(out.shape, dtype=dtype, generator=rng)
            call = partial(torch.ops.aten.convolution_backward, g, x, w, None, *conv, [grad_x, True, False])
            grads = tensor_bytes(call())  # oneDNN builds its kernels on the first call
            calls[kind, batch] = (call, grads, max(tensor_bytes([x]), tensor_bytes([g])) / batch, actual)
    if calls:
        try:
            peaks = section_peaks({key: call for key, (call, *_) in calls.items()})
        except RuntimeError:  # the profiler is busy (a measurement around the planning): the usual 2x
            peaks = {key: 2 * larger * key[1] + grads for key, (_, grads, larger, _) in calls.items()}
        for kind in {key[0] for key in calls}:
            (_, grads2, larger, actual), (_, grads4, _, _) = calls[kind, 2], calls[kind, 4]
            two, four = peaks[kind, 2] - grads2, peaks[kind, 4] - grads4
            per_sample = max(0.0, (four - two) / 2)
            # The part per call does not grow in proportion (bf16: 1.1, 8.0, 32.7 MB for a 4-channel
            # convolution at 24^3, 48^3, 96^3): as measured, not scaled up to a larger input.
            _RATIOS[kind] = (max(0.0, two - 2 * per_sample) / actual, per_sample / larger)
    return {kind: _RATIOS[kind] for kind in kinds}
