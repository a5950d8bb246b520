"""Memory accounting: exact storage bytes with sharing counted once, and CPU/CUDA peaks of a block above
what it held at entry."""
from __future__ import annotations

import sys

import pytest
import torch

from lampseg.runtime.memory import GB, PeakMemory, tensor_bytes

MB = 2**20


def test_tensor_bytes_counts_each_storage_once():
    a = torch.zeros(10)  # 40 bytes
    b = torch.zeros(7, dtype=torch.bfloat16)  # 14 bytes
    c = torch.zeros(3, 5, dtype=torch.float64)  # 120 bytes
    assert tensor_bytes([a, b, c]) == 40 + 14 + 120
    assert tensor_bytes([a, a[2:5], a.view(2, 5), None, b, c.t(), c]) == 40 + 14 + 120
    assert tensor_bytes([a[2:5]]) == 40  # a view holds its whole storage
    assert tensor_bytes([]) == tensor_bytes([None]) == 0
    with torch.device("meta"):
        m1, m2 = torch.empty(4), torch.empty(6, dtype=torch.float16)
    assert tensor_bytes([m1, m2, m1[1:], m2.view(2, 3)]) == 16 + 12


def test_tensor_bytes_params_grads_and_adam_state():
    lin = torch.nn.Linear(5, 3)
    lin2 = torch.nn.Linear(5, 3)
    lin2.weight = lin.weight  # tied: one storage
    model = torch.nn.ModuleList([lin, lin2])
    opt = torch.optim.AdamW(model.parameters())
    model[0](torch.ones(2, 5)).sum().backward()
    opt.step()
    params = list(model.parameters())  # de-duplicated by nn.Module: weight, bias, bias2
    n = 15 + 3 + 3
    assert tensor_bytes(params) == tensor_bytes([*params, lin2.weight]) == 4 * n
    assert tensor_bytes(p.grad for p in params) == 4 * (15 + 3)  # lin2.bias never got a gradient
    state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    assert tensor_bytes(state) == 2 * 4 * (15 + 3) + 2 * 4  # exp_avg, exp_avg_sq + a fp32 step each


def test_cpu_peak_sees_a_known_allocation():
    with PeakMemory("cpu") as peak:
        x = torch.ones(40 * MB // 4)
    assert 40 * MB <= peak.bytes <= 40 * MB * 1.02
    assert peak.gb == pytest.approx(peak.bytes / GB)
    del x


def test_cpu_peak_of_an_empty_block_is_zero():
    held = torch.ones(MB)
    for _ in range(2):
        with PeakMemory() as peak:
            pass
        assert peak.bytes < 4096
        with PeakMemory() as peak:
            _ = held.sum()  # reads a pre-existing tensor: only a 4-byte result is new
        assert peak.bytes < 4096


def test_cpu_peak_keeps_the_larger_of_free_then_smaller_alloc():
    with PeakMemory("cpu") as peak:
        big = torch.empty(64 * MB, dtype=torch.uint8)
        del big
        small = torch.empty(16 * MB, dtype=torch.uint8)
        also_small = torch.empty(16 * MB, dtype=torch.uint8)
    assert 64 * MB <= peak.bytes <= 64 * MB * 1.02
    del small, also_small
    with PeakMemory("cpu") as peak2:  # the same allocations, small ones first: all live at once
        small = torch.empty(16 * MB, dtype=torch.uint8)
        also_small = torch.empty(16 * MB, dtype=torch.uint8)
        big = torch.empty(64 * MB, dtype=torch.uint8)
        del big, small, also_small
    assert 96 * MB <= peak2.bytes <= 96 * MB * 1.02


def test_cpu_peak_counts_above_entry_only():
    x = torch.ones(8 * MB // 4)
    with torch.no_grad(), PeakMemory("cpu") as peak:
        y = x * 2
    assert 8 * MB <= peak.bytes <= 8 * MB * 1.02
    # Freeing memory that existed at entry (here y, allocated by the previous block) makes no room on CPU.
    with PeakMemory("cpu") as peak:
        del y
        y = torch.ones(8 * MB // 4)
    assert 8 * MB <= peak.bytes <= 8 * MB * 1.02
    del y


def test_cpu_peak_of_conv_backward_covers_saved_activations():
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(4, 8, 3, padding=1)
    saved: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[id(t)] = t
        return t

    peaks = []
    for _ in range(2):
        saved.clear()
        with PeakMemory("cpu") as peak:
            x = torch.randn(2, 4, 24, 24, 24, requires_grad=True)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                y = torch.relu(conv(x))
            y.sum().backward()
        peaks.append(peak.bytes)
    acts = tensor_bytes(t for t in saved.values() if t.data_ptr() != conv.weight.data_ptr())
    assert acts >= x.nbytes + y.nbytes  # conv input and relu output
    assert peaks[1] >= acts + x.nbytes  # activations live together with the input gradient
    assert peaks[0] == pytest.approx(peaks[1], abs=64 * 1024)  # repeatable (1st call adds the weight grads)


def test_cpu_peak_stops_the_profiler_on_errors_and_does_not_nest():
    with pytest.raises(ValueError, match="boom"), PeakMemory("cpu"):
        raise ValueError("boom")
    with pytest.raises(RuntimeError, match="already running"), PeakMemory("cpu"), PeakMemory("cpu"):
        pass
    with PeakMemory("cpu") as peak:  # the profiler is usable again
        x = torch.ones(MB)
    assert peak.bytes >= 4 * MB
    del x
    with pytest.raises(ValueError, match="cpu and cuda"):
        PeakMemory("meta")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_counts_above_entry():
    held = torch.ones(16 * MB // 4, device="cuda")
    with PeakMemory("cuda") as peak:
        big = torch.empty(32 * MB, dtype=torch.uint8, device="cuda")
        del big
        small = torch.empty(8 * MB, dtype=torch.uint8, device="cuda")
    assert peak.bytes == 32 * MB
    del held, small


_REFAULTS = """
import resource, sys, torch
from lampseg.runtime.memory import keep_freed_cpu_memory
applied = keep_freed_cpu_memory() if sys.argv[1] == "keep" else False
faults = []
for _ in range(8):  # allocate, touch and free 128 MB again and again
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(2**25).sum()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, min(faults))  # glibc's heap settles after a few rounds; the best round shows reuse
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_cpu_memory_reuses_large_blocks_instead_of_faulting_them_in_again():
    import subprocess

    def faults(mode: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", _REFAULTS, mode], capture_output=True, text=True,
                             check=True)
        applied, count = out.stdout.split()
        return applied, int(count)

    (_, default), (applied, kept) = faults("default"), faults("keep")
    assert applied == "True"
    assert default > 1000  # glibc maps 128 MB afresh: one fault per page (or huge page) touched
    assert kept < default / 10, (kept, default)


