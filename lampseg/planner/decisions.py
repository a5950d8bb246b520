"""What the planner decides, as the engines receive it: the stages of a pipeline (``Plan``) and the
per-rank plan of a spatial split (``SpatialPlan``). Plain data with readable tables; the engines in
``lampseg.parallel`` import these and nothing else of the planner.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Stage:
    blocks: list[str]
    params: int
    static_gb: float  # parameters, gradients, optimiser state
    activation_gb: float  # stashed activations and inputs at the peak
    memory_gb: float
    time_s: float  # per micro-batch, forward + backward (recompute included)


@dataclass
class Plan:
    pp: int
    microbatches: int
    schedule: str
    checkpoint: str
    batch_size: int
    input_shape: list[int]
    memory_gb: float | None
    source: str
    stages: list[Stage] = field(default_factory=list)
    sp: int = 1  # spatial slabs per stage (``capacity.hybrid_plan``): the stages' costs are per slab
    skips: str = "carried"  # skip tensors carried through the stages in between, or sent "direct"

    @property
    def bubble(self) -> float:
        """Idle fraction of an ideal pipeline: (S - 1) / (M + S - 1)."""
        return (self.pp - 1) / (self.microbatches + self.pp - 1)

    @property
    def balance(self) -> float:
        """Mean stage time / slowest stage time (1 = perfectly balanced)."""
        times = [s.time_s for s in self.stages]
        return sum(times) / len(times) / max(max(times), 1e-12)

    @property
    def step_time_s(self) -> float:
        return (self.microbatches + self.pp - 1) * max(s.time_s for s in self.stages)

    def to_dict(self) -> dict:
        derived = {"bubble": self.bubble, "balance": self.balance, "step_time_s": self.step_time_s}
        return {**asdict(self), **derived}

    def table(self) -> str:
        """A readable stage table."""
        lines = [f"{'stage':>5}  {'blocks':<28} {'params':>11} {'static GB':>9} {'activ. GB':>9} "
                 f"{'total GB':>8} {'ms/mb':>8}"]
        for i, s in enumerate(self.stages):
            lines.append(f"{i:>5}  {','.join(s.blocks):<28} {s.params:>11,} {s.static_gb:>9.3f} "
                         f"{s.activation_gb:>9.3f} {s.memory_gb:>8.3f} {1000 * s.time_s:>8.2f}")
        budget = f"{self.memory_gb:g} GB" if self.memory_gb else "none"
        slabs = f"sp={self.sp} slabs (costs per slab) x " if self.sp > 1 else ""
        lines.append(f"{slabs}pp={self.pp} microbatches={self.microbatches} schedule={self.schedule} "
                     f"checkpoint={self.checkpoint} skips={self.skips} budget/stage={budget} "
                     f"balance={self.balance:.2f} "
                     f"bubble={self.bubble:.2f} est. step={self.step_time_s:.3f}s ({self.source})")
        return "\n".join(lines)


@dataclass
class SpatialPlan:
    """The per-rank plan of a spatial split: slabs, checkpointing and the largest slab's costs."""

    sp: int
    checkpoint: str
    batch_size: int
    input_shape: list[int]
    memory_gb: float | None  # budget per rank
    stage: Stage

    def to_dict(self) -> dict:
        return {**asdict(self), "step_time_s": self.stage.time_s}

    def table(self) -> str:
        s, budget = self.stage, f"{self.memory_gb:g} GB" if self.memory_gb else "none"
        return (f"sp={self.sp} slabs of input {self.input_shape} x batch {self.batch_size}: per rank "
                f"{s.memory_gb:.3f} GB (static {s.static_gb:.3f}, activations {s.activation_gb:.3f}) "
                f"checkpoint={self.checkpoint} budget/rank={budget} est. step={s.time_s:.3f}s")
