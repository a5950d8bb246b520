"""Typed config schema (Hydra structured configs).

The dataclasses here are registered in Hydra's ConfigStore as ``lampseg_schema``; ``conf/config.yaml``
lists it first in its defaults, so every YAML group file and every command-line override is type-checked
against it (unknown keys, wrong types and bad enum values fail before any work starts).
``checks.validate(cfg)`` then checks what types cannot express (ranges, shapes, cross-field rules).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from lampseg.config.choice import Choice
from lampseg.config.commands import EvaluateArgs, ExportArgs, PredictArgs, SynthArgs, VisualizeArgs
from lampseg.errors import LampsegError


class ConfigError(LampsegError, ValueError):
    """A config value is invalid; the message names the key and what was expected."""


class ParallelMode(Choice):
    single = "single"
    ddp = "ddp"
    pipeline = "pipeline"
    spatial = "spatial"
    auto = "auto"  # the planner chooses among ddp, spatial and pipeline for parallel.devices


class PipelineEngine(Choice):
    pipelining = "pipelining"  # one stage per process (torch.distributed.pipelining)
    gpipe = "gpipe"  # every stage in this process (torchgpipe)


class Recompute(Choice):
    auto = "auto"
    none = "none"
    block = "block"
    all = "all"


class CostSource(Choice):
    estimate = "estimate"
    measure = "measure"


class ProgressMode(Choice):
    auto = "auto"
    bar = "bar"
    line = "line"
    none = "none"


class Precision(Choice):
    auto = "auto"  # bf16 where native, fp16 + gradient scaler on CUDA without bf16, else fp32
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Norm(Choice):
    instance = "instance"
    batch = "batch"
    group = "group"


class OptimizerName(Choice):
    adamw = "adamw"
    sgd = "sgd"


class Schedule(Choice):
    poly = "poly"
    cosine = "cosine"
    constant = "constant"


class LossName(Choice):
    dice_ce = "dice_ce"
    dice_focal = "dice_focal"


class InferenceMode(Choice):
    auto = "auto"
    whole = "whole"
    sliding = "sliding"


class Blend(Choice):
    gaussian = "gaussian"
    constant = "constant"


LR_SCALING = ("none", "linear", "sqrt")
BACKENDS = ("auto", "gloo", "nccl", "cpu:gloo,cuda:nccl")


@dataclass
class SynthConfig:
    """The default synthetic dataset, generated on first use when ``data.root`` is null."""

    cases: int = 24
    shape: list[int] = field(default_factory=lambda: [64, 64, 48])
    seed: int = 0
    layout: str = "4d"
    context: str = "none"  # or laterality: the core's label depends on the side of the head
    kind: str = "brats"  # or known_importance: modalities A > B > C by construction


@dataclass
class AugmentConfig:
    flip_prob: float = 0.5
    intensity_prob: float = 0.15
    rotate_prob: float = 0.0
    rotate_degrees: float = 15.0


@dataclass
class DataConfig:
    root: str | None = None
    synthetic: SynthConfig = field(default_factory=SynthConfig)
    cache_dir: str | None = None
    patch_size: Any = field(default_factory=lambda: [64, 64, 48])
    batch_size: int = 2
    num_workers: Any = "auto"  # loader workers per process, or auto (runtime.device.loader_workers)
    samples_per_epoch: int = 100
    modalities: list[Any] | None = None
    folds: int = 5
    fold: int = 0
    foreground_ratio: float = 0.33
    target_spacing: list[float] | None = None
    regions: dict[str, list[int]] | None = None
    nonfinite: str = "error"  # NaN/Inf image voxels: error, or zero (set to 0 with a warning)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ModelConfig:
    name: str = "unet_small"
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    strides: list[int] = field(default_factory=lambda: [2, 2, 2])
    num_res_units: int = 1
    kernel_size: int = 3
    norm: Norm = Norm.instance
    dropout: float = 0.0


@dataclass
class OptimConfig:
    name: OptimizerName = OptimizerName.adamw
    lr: float = 3e-3
    weight_decay: float = 1e-5
    momentum: float = 0.99
    nesterov: bool = True
    schedule: Schedule = Schedule.cosine
    poly_power: float = 0.9
    warmup_epochs: int = 0
    grad_clip: float | None = 12.0
    lr_scaling: str = "none"  # data parallelism: lr x dp (linear), x sqrt(dp) (sqrt) or unchanged (none)
    beta1: float = 0.9  # AdamW
    beta2: float = 0.999  # AdamW (Berral et al. searched 0.999 and 0.99)
    amsgrad: bool = False  # AdamW
    loss: LossName = LossName.dice_ce
    focal_weight: float = 0.5


@dataclass
class TrainerConfig:
    max_epochs: int = 20
    val_every: int = 2
    resume: str = "auto"
    precision: Precision = Precision.auto  # runtime.device.resolve_precision
    device: str = "auto"
    channels_last: bool = True
    cache_cpu_memory: bool = True  # CPU: keep freed large blocks (runtime.memory.keep_freed_cpu_memory)
    deterministic: bool = False
    num_threads: int | None = None
    progress: ProgressMode = ProgressMode.auto
    val_max_cases: int | None = None
    hd95: bool = True
    stop_after_epochs: int | None = None
    fail_at_epoch: int | None = None  # fault drill: raise once after this epoch's checkpoint
    max_nan_steps: int = 50  # abort after this many consecutive steps skipped for a non-finite loss
    val_overlays: int = 2  # validation cases drawn to TensorBoard each validation (the first also as PNG)
    curriculum: list[Any] | None = None
    curriculum_epochs: list[int] | None = None


@dataclass
class InferenceConfig:
    mode: InferenceMode = InferenceMode.auto
    memory_gb: float | None = None  # auto: budget per device (None: the device's free memory)
    devices: int | None = None  # auto: devices to pipeline an unsplit model over (None: visible GPUs; CPU 1)
    patch_size: list[int] | None = None
    overlap: float = 0.5
    blend: Blend = Blend.gaussian
    sw_batch_size: int = 2
    tta: bool = False


@dataclass
class ParallelConfig:
    name: ParallelMode = ParallelMode.single
    dp: int | None = 1  # null: WORLD_SIZE / pp
    pp: int = 1
    sp: int = 1  # spatial slabs per volume (parallel=spatial)
    devices: int | None = None  # parallel=auto: processes to lay out (null: WORLD_SIZE)
    engine: PipelineEngine = PipelineEngine.pipelining
    backend: str = "auto"  # auto: nccl for CUDA tensors, gloo for CPU tensors
    timeout_s: float = 600.0  # collective timeout
    schedule: str = "gpipe"
    microbatches: int | None = None
    memory_gb: float | None = None
    checkpoint: Recompute = Recompute.auto
    profile: CostSource = CostSource.estimate
    device_tflops: float = 10.0


@dataclass
class BenchConfig:
    """``python -m lampseg bench NAME``: what to run and how long."""

    name: str | None = None
    steps: int = 50  # timed steps per phase (50 = one default synthetic epoch: 100 samples / batch 2)
    warmup: int = 5  # untimed steps before each timed phase
    repeats: int = 7  # interleaved rounds (A B A B ...); medians over these
    pp: list[int] = field(default_factory=lambda: [1, 2, 4])  # bench pipeline: stages
    microbatches: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # bench pipeline
    memory_gb: float = 16.0  # bench pipeline: per-stage budget for the largest-cube column
    timeout_s: float = 1800.0  # bench pipeline: per torchrun job
    windows: list[int] = field(default_factory=lambda: [64, 96, 128])  # bench inference: sliding windows
    overlaps: list[float] = field(default_factory=lambda: [0.25, 0.5])  # bench inference
    cases: int = 0  # bench inference: validation cases (0: all)
    ckpt: str | None = None  # bench inference: the checkpoint (`bench inference ckpt=PATH`)
    auto_budgets_gb: list[float] | None = None  # bench inference auto rows (None: 2x, 0.75x whole's estimate)
    patch_sizes: list[Any] = field(default_factory=lambda: [16, 32, "whole"])  # bench context: cube sides
    widths: list[int] = field(default_factory=lambda: [8, 16, 32])  # bench context: first-level channels
    processes: list[int] = field(default_factory=lambda: [1, 2])  # bench data_parallel: DDP process counts
    all_threads: bool = True  # bench data_parallel: also one process with every core as a thread
    trials: int = 4  # bench experiment_parallel: N trials (learning rates)
    workers: int = 2  # bench experiment_parallel: W trials at a time in the Tune study
    sp: list[int] = field(default_factory=lambda: [1, 2])  # bench spatial: slabs per volume (processes)
    profile: bool = False  # bench overhead: also profile one phase of each loop (torch.profiler, per op)


@dataclass
class DoctorConfig:
    """``python -m lampseg doctor``: which checks to run and where else to write the report."""

    checks: list[str] = field(default_factory=lambda: ["single", "ddp", "pipeline", "spatial", "inference"])
    json: str | None = None  # also write the report here (``--json PATH``); it is always in run_dir
    timeout_s: float = 60.0  # the two-process checks' torchrun job, start-up included


@dataclass
class TuneResources:
    cpu: float = 1.0  # per pipeline stage (a trial with parallel.pp=K reserves K x cpu and K x gpu)
    gpu: float = 0.0


@dataclass
class AshaConfig:
    grace_period: int = 2  # epochs every trial runs before it can be stopped
    reduction_factor: float = 2.0  # keep the best 1/reduction_factor at each rung
    max_t: int | None = None  # null: trainer.max_epochs


@dataclass
class PbtConfig:
    perturbation_interval: int = 2  # epochs between exploit/explore steps
    quantile_fraction: float = 0.25  # the bottom quantile copies the top one
    resample_probability: float = 0.25


@dataclass
class TuneConfig:
    """``python -m lampseg tune``: a Ray Tune study over any config keys (``conf/tune/*.yaml``)."""

    name: str = "default"
    space: list[Any] = field(default_factory=list)  # [{key: optim.lr, loguniform: [1e-4, 1e-2]}, ...]
    search: str = "grid"  # grid|random|optuna
    scheduler: str = "fifo"  # fifo|asha|pbt
    metric: str = "val_dice"
    mode: str = "max"  # max|min
    num_samples: int = 1  # samples of the space (grid: repeats of the whole grid)
    max_concurrent: int = 0  # 0: as many trials at once as the resources allow
    max_failures: int = 1  # a failed trial restarts from its last checkpoint this many times
    resources: TuneResources = field(default_factory=TuneResources)
    resume: bool = False  # continue the study in run_dir/tune (finished trials are not rerun)
    address: str | None = None  # null: a local Ray started here; auto or HOST:PORT: join a cluster
    num_cpus: int | None = None  # local Ray: CPUs to offer (null: all of this machine's)
    num_gpus: int | None = None  # local Ray: GPUs to offer (null: all)
    dashboard: bool = False  # Ray's dashboard (loopback only)
    keep_checkpoints: int = 2  # Tune checkpoints kept per trial
    verbose: int = 1  # 0: progress and errors; 1: a line per trial event; 2: Ray's tables, trials' output
    time_budget_s: float | None = None  # stop starting/continuing trials after this many seconds
    asha: AshaConfig = field(default_factory=AshaConfig)
    pbt: PbtConfig = field(default_factory=PbtConfig)


@dataclass
class LooConfig:
    """``python -m lampseg loo``: which modality matters (leave one modality out, per fold of patients)."""

    folds: Any = 5  # K: k-fold over patients; "patients": leave one patient out
    modalities: list[str] | None = None  # the modalities to leave out, one at a time (null: every one)
    test: str = "wilcoxon"  # paired test of each left-out condition against the baseline: wilcoxon|ttest
    confidence: float = 0.95  # level of the confidence intervals
    checkpoint: str = "final"  # evaluated on the held-out cases: final (no selection on them) or best



@dataclass
class Config:
    run_dir: str = "outputs/run"
    seed: int = 0
    debug: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    doctor: DoctorConfig = field(default_factory=DoctorConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    loo: LooConfig = field(default_factory=LooConfig)
    evaluate: EvaluateArgs = field(default_factory=EvaluateArgs)
    predict: PredictArgs = field(default_factory=PredictArgs)
    visualize: VisualizeArgs = field(default_factory=VisualizeArgs)
    synth: SynthArgs = field(default_factory=SynthArgs)
    export: ExportArgs = field(default_factory=ExportArgs)




def register_schema() -> None:
    """Register the schema so ``conf/config.yaml`` can list ``lampseg_schema`` first in its defaults."""
    ConfigStore.instance().store(name="lampseg_schema", node=Config)


def enum_value(value: Any) -> str:
    """A config value as a plain ``str``: an enum member of the schema (every one is a ``Choice``, whose
    ``str`` is its value) or a string from a plain dict, for where the type matters (YAML, pickles)."""
    return str(value)


def to_container(cfg: DictConfig) -> dict:
    """Plain resolved dict (enums as strings), for JSON, checkpoints and hashing."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]
