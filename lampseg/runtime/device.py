"""Devices, dtypes, autocast and random state: what every layer that runs tensors needs."""
from __future__ import annotations

import contextlib
import functools
import os
import platform
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lampseg.config import enum_value

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # trainer.precision


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


MAX_LOADER_WORKERS = 8  # beyond this a 3D patch loader rarely gains (nnU-Net's default is 12 per GPU)


def loader_workers(setting: int | str, processes: int | None = None) -> int:
    """``data.num_workers``: a number, or ``auto``: the cores this process may use, shared by the
    ``processes`` training processes on this node (default ``$LOCAL_WORLD_SIZE``, else 1), less one core
    each for the training loop itself; at most ``MAX_LOADER_WORKERS``. A 2-core machine gets 1; a 16-core
    node with one GPU 8; with 8 GPUs 1 per process."""
    if setting != "auto":
        return int(setting)
    processes = processes or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(cores // max(processes, 1) - 1, MAX_LOADER_WORKERS))


# x86 /proc/cpuinfo flags of bf16 in hardware. Arm's BF16 feature is left out until measured: whether
# PyTorch's CPU Conv3d kernels use it there is unknown, and an emulated bf16 step costs 27x an fp32 one.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (x86 ``flags``, Arm ``Features``); empty where there
    is no such file (macOS, Windows)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key = line.split(":", 1)[0].strip()
        if key in ("flags", "Features"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


# oneDNN instruction sets (``ONEDNN_MAX_CPU_ISA``, oneDNN's CPU dispatcher control) that leave out bf16
# arithmetic: capped there, PyTorch's CPU convolutions emulate bf16 whatever the CPU has (measured on a
# 2-core Xeon with AMX, a unet_small training step: bf16 202 ms against fp32 93 ms capped at AVX512_CORE;
# a Conv3d 30x slower than fp32 capped at AVX2).
ONEDNN_ISAS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
                            "AVX512_CORE_VNNI")


def onednn_isa_cap() -> str | None:
    """The instruction-set cap set for oneDNN in this process's environment (``ONEDNN_MAX_CPU_ISA``, or
    its older name ``DNNL_MAX_CPU_ISA``), upper-case; None when neither is set."""
    value = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return value.strip().upper() if value and value.strip() else None


def bf16_cpu_flags() -> list[str]:
    """This x86 CPU's flags of bf16 in hardware (AMX, AVX-512 BF16); empty where it has none (measured on a
    2-core AVX2 EPYC: an emulated Conv3d step 27x slower than fp32) or is not measured (Arm)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    flags = cpu_flags()
    return [f for f in NATIVE_BF16_FLAGS if f in flags]


def native_bf16_cpu_flags() -> list[str]:
    """``bf16_cpu_flags`` where PyTorch uses them: empty where oneDNN is capped below bf16
    (``onednn_isa_cap``)."""
    return [] if onednn_isa_cap() in ONEDNN_ISAS_WITHOUT_BF16 else bf16_cpu_flags()


@dataclass(frozen=True)
class PrecisionChoice:
    """What ``trainer.precision`` resolved to on a device, and why (printed first in a run, in
    ``summary.json``)."""

    name: str  # fp32 | bf16 | fp16
    reason: str
    setting: str = "auto"  # what trainer.precision asked for (kept in saved configs: auto resolves anew)

    def line(self) -> str:
        return f"precision {self.name} ({self.reason})"


def resolve_precision(setting: str, device: torch.device | str) -> PrecisionChoice:
    """``trainer.precision`` for ``device``: an explicit value as is; ``auto`` -> bf16 autocast where bf16
    is native (CUDA devices that support it; CPUs with AMX or AVX-512 BF16), fp16 autocast with a gradient
    scaler on CUDA devices without bf16 (V100, T4), fp32 elsewhere.

    Args:
        setting: ``trainer.precision`` (auto, fp32, bf16 or fp16).
        device: the device that will run the model.

    Returns:
        The resolved precision and the reason, in words.
    """
    setting = enum_value(setting)
    if setting != "auto":
        return PrecisionChoice(setting, "trainer.precision", setting)
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        with torch.cuda.device(device):  # is_bf16_supported asks the current device
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        if native:
            return PrecisionChoice("bf16", f"auto: {name} computes bf16 natively")
        return PrecisionChoice("fp16", f"auto: {name} has no native bf16; fp16 with a gradient scaler")
    if device.type == "cpu":
        native = native_bf16_cpu_flags()
        if native:
            return PrecisionChoice("bf16", f"auto: this CPU computes bf16 natively ({', '.join(native)})")
        if bf16_cpu_flags():  # the CPU has them, and oneDNN is capped below them
            cap = onednn_isa_cap()
            return PrecisionChoice("fp32", f"auto: ONEDNN_MAX_CPU_ISA={cap} leaves out this CPU's bf16 "
                                           "instructions, so bf16 is emulated and slower than fp32")
        return PrecisionChoice("fp32", "auto: this CPU has no AMX or AVX-512 BF16, where bf16 is emulated "
                                       "and slower than fp32")
    return PrecisionChoice("fp32", f"auto: fp32 on {device.type}")


def planned_precision(cfg) -> PrecisionChoice:
    """``trainer.precision`` for ``trainer.device`` as resolved on this machine: what the planners assume
    (set ``trainer.precision`` to plan for a device that is not here)."""
    return resolve_precision(cfg.trainer.precision, resolve_device(cfg.trainer.device))


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast context for ``trainer.precision`` on ``device`` (``auto`` resolved by
    ``resolve_precision``; fp32: no autocast; fp16 only on CUDA)."""
    precision = resolve_precision(precision, device).name
    if precision == "fp32" or (precision == "fp16" and device.type != "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; ``deterministic`` also asks torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def rng_state() -> dict:
    """Python's, NumPy's, torch's (and CUDA's) random state, as plain values a checkpoint can hold."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": keys.tolist(),
             "numpy_pos": [int(pos), int(has_gauss), float(gauss)], "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` returned, so every random stream continues where it was."""
    torch.set_rng_state(state["torch"])
    pos, has_gauss, gauss = state.get("numpy_pos", [624, 0, 0.0])  # position, so the stream continues
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), int(pos), int(has_gauss),
                         float(gauss)))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
