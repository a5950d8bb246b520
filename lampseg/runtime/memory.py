"""Memory probes: free and peak memory of a device, exact byte counts of tensors, the peak memory a block
of code allocates (CUDA or CPU), out-of-memory errors, and glibc's handling of freed large blocks.

    with PeakMemory("cpu") as peak:
        loss = model(x).mean()
        loss.backward()
    print(peak.gb)

CUDA reads the caching allocator's peak counter. CPU has no such counter, so the block runs under the
PyTorch profiler with ``profile_memory=True`` and the peak is the largest prefix sum of its allocation
and free events. Caveats on CPU: only frees of memory allocated inside the block count (the profiler does
not reliably know the size of older blocks), so freeing a tensor that existed at entry does not make room
the way it does on CUDA, and the result is the peak of what the block itself allocated; memory that
bypasses the c10 CPU allocator is not seen (oneDNN/ideep buffers go through it and are); the profiler
adds about 1 s the first time in a process and a few ms per block after, and prints two kineto log lines
to stderr per block; CPU blocks do not nest (one profiler at a time).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
import resource
import sys
from collections.abc import Iterable, Iterator
from types import TracebackType

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

GB = 1024**3  # lampseg's unit of memory everywhere (GiB)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>


def free_memory_gb(device: torch.device) -> float:
    """Free memory of ``device``: CUDA's free bytes, or the host's available memory for CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / GB
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / GB
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GB
    except (ValueError, OSError, AttributeError):
        return 16.0  # unknown platform: a laptop-sized guess; set inference.memory_gb to be exact


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on ``device``, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's and the CPU allocator's out-of-memory errors (PyTorch raises RuntimeError on CPU)."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                                or "Cannot allocate memory" in text)


def release_memory(device: torch.device) -> None:
    """Free what garbage collection can, and hand CUDA's cached blocks back."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@functools.cache
def keep_freed_cpu_memory() -> bool:
    """Ask glibc's malloc to keep freed large blocks in the process for reuse (``trainer.cache_cpu_memory``).

    By default glibc maps every block over 32 MB afresh and unmaps it on free, so each forward pass over a
    whole volume page-faults (and the kernel zeroes) all its activations again: on a 2-core CPU that was a
    quarter of whole-volume inference time (docs/BENCHMARKS.md). Keeping freed blocks is what PyTorch's
    caching allocator does on CUDA; the price is the same, the process keeps its peak memory. Process-wide,
    applied once.

    Returns:
        Whether it applied (glibc's ``mallopt`` found; not on macOS, Windows or musl).
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30) and mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1))


def tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes held by ``tensors``, counting every storage once.

    Views, tied weights and tensors sharing a storage count once, with the storage's full size; ``None``
    entries (e.g. missing gradients) are skipped. Distributed tensors count their local shard.

    Args:
        tensors: Tensors such as parameters, gradients and optimiser state values.

    Returns:
        The total size in bytes of the distinct storages.
    """
    sizes: dict[tuple[str, int], int] = {}
    for tensor in tensors:
        if tensor is None:
            continue
        to_local = getattr(tensor, "to_local", None)  # DTensor: count the shard this rank holds
        storage = (to_local() if callable(to_local) else tensor).untyped_storage()
        ptr = storage.data_ptr()
        # Meta storages all have data_ptr 0: tell them apart by the storage object instead.
        key = (str(storage.device), ptr) if ptr else ("storage", storage._cdata)
        sizes[key] = max(sizes.get(key, 0), storage.nbytes())
    return sum(sizes.values())


def _allocations(nodes: Iterable, device_type: str) -> Iterator[tuple[int, int, int]]:
    """(start time ns, pointer, signed bytes) of the allocation/free events on ``device_type`` in a tree."""
    stack = list(nodes)
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == device_type:
            yield node.start_time_ns, node.extra_fields.ptr, node.extra_fields.alloc_size


def _peak(events: Iterable[tuple[int, int, int]]) -> int:
    """Largest running total of the blocks allocated in ``events``; frees of other blocks are ignored."""
    live: dict[int, int] = {}
    total = peak = 0
    for _, ptr, nbytes in sorted(events, key=lambda event: event[0]):
        if nbytes > 0:
            live[ptr] = nbytes
            total += nbytes
            peak = max(peak, total)
        elif ptr in live:
            total -= live.pop(ptr)
    return peak


def section_peaks(sections: dict, device: torch.device | str = "cpu") -> dict:
    """Peak bytes each of ``sections``' calls allocates (above what is held when it starts, as ``PeakMemory``
    measures a block), all in one profiler session: one profiler start, however many calls (on CPU each
    start costs time and prints its log lines). CPU only.

    Args:
        sections: key -> a call without arguments; they run in order.
        device: ``cpu``.

    Returns:
        key -> peak bytes.
    """
    if torch.device(device).type != "cpu":
        raise ValueError(f"section_peaks measures cpu allocations, not {device}")
    if torch._C._autograd._profiler_enabled():
        raise RuntimeError("section_peaks needs the PyTorch profiler, which is already running")
    labels = {f"lampseg.section.{i}": key for i, key in enumerate(sections)}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for label, key in labels.items():
            with torch.profiler.record_function(label):
                sections[key]()
    spans, stack = {}, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.name in labels:
            spans[labels[node.name]] = (node.start_time_ns, node.end_time_ns)
    events = list(_allocations(prof.profiler.kineto_results.experimental_event_tree(), "cpu"))
    return {key: _peak(e for e in events if start <= e[0] <= end) for key, (start, end) in spans.items()}


class PeakMemory:
    """Context manager measuring the peak memory allocated during a block, above what was held at entry.

    Args:
        device: The device to watch (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a ``torch.device`` or an index).

    Attributes:
        bytes: Peak bytes allocated during the last completed block, above the amount at entry (>= 0).
    """

    def __init__(self, device: torch.device | str | int = "cpu") -> None:
        self.device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"PeakMemory supports cpu and cuda devices, not {self.device}")
        self.bytes = 0
        self._start = 0
        self._profiler: profile | None = None

    @property
    def gb(self) -> float:
        """Peak in GiB (1024**3 bytes)."""
        return self.bytes / GB

    def __enter__(self) -> PeakMemory:
        self.bytes = 0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        if torch._C._autograd._profiler_enabled():
            raise RuntimeError("PeakMemory on CPU needs the PyTorch profiler, which is already running")
        self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profiler.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = max(0, torch.cuda.max_memory_allocated(self.device) - self._start)
            return
        assert self._profiler is not None
        prof, self._profiler = self._profiler, None
        prof.__exit__(exc_type, exc, tb)
        if exc_type is not None:
            return
        self.bytes = _peak(_allocations(prof.profiler.kineto_results.experimental_event_tree(), "cpu"))


class CasePeakMemory:
    """Peak memory of one case for ``eval.json``: CUDA's peak allocated bytes (measured per case); on CPU
    the process's peak resident memory so far (the allocator keeps no per-case counter, and the profiler
    that ``PeakMemory`` uses is too slow to run on every case)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mb: float | None = None

    def __enter__(self) -> CasePeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        self.peak_mb = peak_memory_mb(self.device)

    def report(self) -> dict:
        key = "peak_memory_mb" if self.device.type == "cuda" else "process_peak_rss_mb"
        return {key: None if self.peak_mb is None else round(self.peak_mb, 1)}
