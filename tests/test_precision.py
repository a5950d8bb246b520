"""``trainer.precision=auto`` (the default): bf16 where it is native, fp16 with a scaler on CUDA without bf16,
fp32 elsewhere; an explicit value always wins; the run prints and records what it resolved to."""
from __future__ import annotations

import contextlib
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import compose, train_here

import lampseg.engine.setup as engine_setup
from lampseg.config import ConfigError
from lampseg.runtime import device as device_module
from lampseg.runtime.device import PrecisionChoice, autocast, resolve_precision


@pytest.fixture
def cpu_flags(monkeypatch):
    """Pretend this CPU has the given flags (x86), with no oneDNN instruction-set cap in the environment."""
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)

    def pretend(*flags: str) -> None:
        monkeypatch.setattr(device_module, "cpu_flags", lambda: frozenset(flags))
        monkeypatch.setattr(device_module.platform, "machine", lambda: "x86_64")
    return pretend


@pytest.mark.parametrize("flags, expected", [(("avx2", "amx_bf16"), "bf16"),
                                             (("avx2", "avx512_bf16"), "bf16"),
                                             (("avx2", "avx512f"), "fp32"), ((), "fp32")])
def test_auto_on_the_cpu_follows_native_bf16(cpu_flags, flags, expected):
    cpu_flags(*flags)
    choice = resolve_precision("auto", "cpu")
    assert choice.name == expected and choice.reason.startswith("auto: ")
    if expected == "fp32":  # no autocast at all where bf16 would be emulated
        assert isinstance(autocast(torch.device("cpu"), "auto"), contextlib.nullcontext)
        assert "AMX" in choice.reason


@pytest.mark.parametrize("name, cap, expected", [("ONEDNN_MAX_CPU_ISA", "AVX2", "fp32"),
                                                  ("DNNL_MAX_CPU_ISA", "avx512_core", "fp32"),
                                                  ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16", "bf16"),
                                                  ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX", "bf16"),
                                                  ("ONEDNN_MAX_CPU_ISA", "ALL", "bf16")])
def test_auto_honours_a_onednn_instruction_set_cap(cpu_flags, monkeypatch, name, cap, expected):
    """A CPU with AMX whose oneDNN is capped below bf16 (``ONEDNN_MAX_CPU_ISA``) emulates it: fp32, and the
    reason names the cap."""
    cpu_flags("avx2", "avx512_bf16", "amx_bf16")
    monkeypatch.setenv(name, cap)
    choice = resolve_precision("auto", "cpu")
    assert choice.name == expected
    assert (f"ONEDNN_MAX_CPU_ISA={cap.upper()}" in choice.reason) == (expected == "fp32"), choice.reason
    assert bool(device_module.native_bf16_cpu_flags()) == (expected == "bf16")  # what doctor reports


def test_arm_stays_fp32_until_measured(monkeypatch):
    monkeypatch.setattr(device_module.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(device_module, "cpu_flags", lambda: frozenset({"fp", "asimd", "bf16"}))
    assert resolve_precision("auto", "cpu").name == "fp32"


@pytest.mark.parametrize("bf16, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_on_cuda_takes_fp16_without_bf16(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "device", lambda *_: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    choice = resolve_precision("auto", torch.device("cuda", 0))
    assert choice.name == expected and "Tesla T4" in choice.reason


@pytest.mark.parametrize("setting", ["fp32", "bf16", "fp16"])
def test_an_explicit_precision_always_wins(cpu_flags, setting):
    cpu_flags("amx_bf16")
    assert resolve_precision(setting, "cpu") == PrecisionChoice(setting, "trainer.precision", setting)
    cpu_flags()
    assert resolve_precision(setting, "cpu").name == setting


def test_the_default_config_is_auto():
    assert str(compose().trainer.precision.value) == "auto"


def test_staged_pipeline_takes_fp32_for_auto_and_refuses_explicit_fp16(monkeypatch):
    """One stage per process cannot coordinate fp16 loss scaling: ``auto`` falls back to fp32 there."""
    fp16 = PrecisionChoice("fp16", "auto: Tesla T4 has no native bf16")
    monkeypatch.setattr(engine_setup, "resolve_precision", lambda *_: fp16)
    staged, cuda = SimpleNamespace(staged=True), torch.device("cuda", 0)
    cfg = compose("trainer.precision=auto")
    choice = engine_setup.resolve_run_precision(cfg, staged, cuda)
    assert choice.name == "fp32" and "pipeline stages" in choice.reason
    assert str(cfg.trainer.precision.value) == "auto"  # left as asked: build_run derives the resolved config
    explicit = PrecisionChoice("fp16", "trainer.precision", "fp16")
    monkeypatch.setattr(engine_setup, "resolve_precision", lambda *_: explicit)
    with pytest.raises(ConfigError, match="trainer.precision"):
        engine_setup.resolve_run_precision(compose("trainer.precision=fp16"), staged, cuda)
    unstaged = SimpleNamespace(staged=False)
    auto = compose("trainer.precision=auto")
    assert engine_setup.resolve_run_precision(auto, unstaged, cuda).name == "fp16"


@pytest.mark.slow
def test_a_run_prints_and_records_its_resolved_precision(tmp_path, cpu_flags):
    """The run's first line says what ``auto`` became and why; ``summary.json`` keeps both."""
    cpu_flags("avx2")  # an AVX2-only CPU: auto must not pick the emulated bf16
    lines: list[str] = []
    summary = train_here(tmp_path / "run", "+exp=smoke", "trainer.precision=auto", "trainer.max_epochs=1",
                         "data.samples_per_epoch=4", log=lines.append)
    assert lines[0].startswith("device cpu, precision fp32 (auto: this CPU has no AMX"), lines[:2]
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["precision"] == saved["precision"] == "fp32"
    assert saved["precision_reason"].startswith("auto: ")


@pytest.mark.slow
def test_checkpoints_keep_auto_and_a_resume_elsewhere_says_what_changed(tmp_path, cpu_flags):
    """Saved configs keep ``auto`` (an H100's bf16 must not follow a checkpoint to an AVX2 laptop), the
    checkpoint records what ran, and resuming on a machine where ``auto`` picks otherwise says so."""
    from omegaconf import OmegaConf

    from lampseg.engine.checkpoint import load_checkpoint

    cpu_flags("avx2")
    run = tmp_path / "run"
    common = ("+exp=smoke", "trainer.precision=auto", "data.samples_per_epoch=2")
    train_here(run, *common, "trainer.max_epochs=1")
    ckpt = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert ckpt["config"]["trainer"]["precision"] == "auto" and ckpt["precision"] == "fp32"
    assert OmegaConf.load(run / ".hydra" / "config.yaml").trainer.precision == "auto"
    cpu_flags("avx2", "amx_bf16")  # the same command on a CPU with native bf16
    lines: list[str] = []
    summary = train_here(run, *common, "trainer.max_epochs=2", log=lines.append)
    assert any(line.startswith("resuming a fp32 run at bf16 (auto: ") for line in lines), lines
    assert summary["precision"] == "bf16" and summary["epochs"] == 2
