"""What ``lampseg doctor`` reports of the machine: versions, CPU features, devices and their free memory.

Each function returns plain JSON-ready data; nothing here starts a process or allocates device memory
beyond CUDA's context (``torch.cuda.mem_get_info``).
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path

import torch
import torch.distributed as dist

from lampseg.runtime.device import native_bf16_cpu_flags, onednn_isa_cap, resolve_precision
from lampseg.runtime.memory import free_memory_gb

PACKAGES = ("lampseg", "torch", "monai", "ray", "hydra-core", "numpy", "nibabel", "torchgpipe")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    """Python, the platform, lampseg's main dependencies (None: not installed) and torch's CUDA stack."""
    nccl = None
    if torch.cuda.is_available() and torch.distributed.is_nccl_available():
        try:
            nccl = ".".join(str(v) for v in torch.cuda.nccl.version())
        except (AttributeError, RuntimeError):  # a build without NCCL's version symbol
            nccl = "available"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"python": platform.python_version(), "platform": platform.platform(),
            **{name: _version(name) for name in PACKAGES},
            "cuda": torch.version.cuda, "cudnn": cudnn, "nccl": nccl,
            "distributed": {"available": dist.is_available(),
                            "gloo": dist.is_available() and dist.is_gloo_available(),
                            "nccl": dist.is_available() and dist.is_nccl_available()}}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu() -> dict:
    """The CPU: name, cores this process may use, torch's kernel level and whether bf16 runs natively.

    Without AVX-512 BF16 or AMX, PyTorch emulates bf16 on the CPU (several times slower than fp32 there);
    with them bf16 is the fast choice; ``precision_auto`` is what ``trainer.precision=auto`` resolves to.
    """
    native = native_bf16_cpu_flags()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"name": _cpu_name(), "cores_available": cores, "cores": os.cpu_count(),
            "torch_capability": torch.backends.cpu.get_cpu_capability(),
            "bf16_native": bool(native), "bf16_flags": native, "onednn_isa_cap": onednn_isa_cap(),
            "precision_auto": resolve_precision("auto", "cpu").name,
            "onednn": torch.backends.mkldnn.is_available(), "threads": torch.get_num_threads(),
            "memory_available_gb": round(free_memory_gb(torch.device("cpu")), 2)}


def devices() -> list[dict]:
    """The visible CUDA devices with their total and free memory (empty without CUDA)."""
    out = []
    for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        out.append({"index": index, "name": props.name, "capability": f"{props.major}.{props.minor}",
                    "total_gb": round(total / 1024**3, 2), "free_gb": round(free / 1024**3, 2),
                    "bf16": torch.cuda.is_bf16_supported(including_emulation=False),
                    "precision_auto": resolve_precision("auto", torch.device("cuda", index)).name})
    return out


def summary_lines(report: dict) -> list[str]:
    """The machine part of the console report."""
    v, c, d = report["versions"], report["cpu"], report["devices"]
    cuda = f"CUDA {v['cuda']}, cuDNN {v['cudnn']}, NCCL {v['nccl']}" if v["cuda"] else "CPU build"
    bf16 = f"native ({', '.join(c['bf16_flags'])})" if c["bf16_native"] else "emulated (slower than fp32)"
    if c.get("onednn_isa_cap"):
        bf16 += f", ONEDNN_MAX_CPU_ISA={c['onednn_isa_cap']}"
    lines = [f"versions: lampseg {v['lampseg']}, torch {v['torch']} ({cuda}), MONAI {v['monai']}, "
             f"Ray {v['ray'] or 'not installed'}, Hydra {v['hydra-core']}; Python {v['python']} on "
             f"{v['platform']}",
             f"cpu: {c['name']}, {c['cores_available']} of {c['cores']} cores available, kernels "
             f"{c['torch_capability']}, bf16 {bf16}; {c['memory_available_gb']:.1f} GB memory available; "
             f"trainer.precision=auto -> {c['precision_auto']}"]
    if d:
        lines += [f"cuda:{g['index']}: {g['name']} (sm {g['capability']}), {g['free_gb']:.1f} of "
                  f"{g['total_gb']:.1f} GB free, bf16 {'yes' if g['bf16'] else 'no'}; "
                  f"trainer.precision=auto -> {g['precision_auto']}" for g in d]
    else:
        lines.append("devices: no CUDA device visible; lampseg runs on the CPU (pipeline stages and slabs as "
                     "CPU processes with gloo)")
    return lines
