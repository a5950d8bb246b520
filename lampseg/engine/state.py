"""What a run has done so far (``TrainState``): saved in every checkpoint and restored on resume."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields


@dataclass
class TrainState:
    """What a run has done so far; saved in every checkpoint (``train_state``) and restored on resume."""

    epoch: int = 0
    step: int = 0
    best_val_dice: float = -math.inf
    best_epoch: int | None = None
    best_metrics: dict = field(default_factory=dict)
    history: list = field(default_factory=list)  # metrics.csv's rows
    train_time_s: float = 0.0
    train_samples: int = 0
    wall_s: float = 0.0
    skipped_steps: int = 0

    @classmethod
    def from_dict(cls, saved: dict) -> TrainState:
        """The state a checkpoint saved (keys it lacks keep their defaults)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)
