"""``multirun_results.csv``: one row per job of a Hydra multirun (``train -m``), from its ``summary.json``.

    python -m lampseg train -m optim.lr=1e-3,3e-4 model=unet_small,unet32 run_dir=RUN
    python -m lampseg train -m hydra/launcher=ray optim.lr=1e-3,3e-4      # jobs in parallel on Ray

Registered as a Hydra callback in ``conf/config.yaml``; it runs in the launching process once every job has
returned, whichever launcher ran them, and reads the job directories ``RUN/0``, ``RUN/1``, ...
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lampseg.engine.metrics import metric_key
from lampseg.io import atomic_write_csv

FIELDS = ("status", "best_val_dice", "best_epoch", "epochs", "wall_s", "train_samples_per_s",
          "peak_memory_mb", "params", "model", "world_size", "dp", "pp")


def _job_order(path: Path) -> tuple:
    name = path.parent.name
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def gather(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job directory of ``sweep_dir`` that holds a ``summary.json``: the job's number, its
    overrides, the summary's main fields and its per-region validation Dice."""
    rows = []
    for path in sorted(sweep_dir.glob("*/summary.json"), key=_job_order):
        summary = json.loads(path.read_text())
        overrides_file = path.parent / ".hydra" / "overrides.yaml"
        overrides = OmegaConf.to_container(OmegaConf.load(overrides_file)) if overrides_file.is_file() else []
        row = {"job": path.parent.name, "overrides": " ".join(str(o) for o in overrides)}
        row.update({k: summary.get(k) for k in FIELDS})
        dice = summary.get("val_dice") or {}
        row.update({f"val_dice_{metric_key(name)}": value for name, value in dice.items()})
        row["run_dir"] = str(path.parent)
        rows.append(row)
    return rows


def write_multirun_results(sweep_dir: Path) -> Path | None:
    """Write ``sweep_dir/multirun_results.csv`` (None when no job wrote a summary)."""
    rows = gather(sweep_dir)
    if not rows:
        return None
    out = sweep_dir / "multirun_results.csv"
    atomic_write_csv(out, rows)
    return out


class MultirunResults(Callback):
    """Hydra callback: gather the jobs' summaries when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        out = write_multirun_results(Path(config.hydra.sweep.dir))
        if out is not None:
            print(f"multirun: {len(gather(out.parent))} job(s) -> {out}")
