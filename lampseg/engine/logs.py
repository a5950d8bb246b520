"""Run-directory logs: ``metrics.csv``, ``summary.json``, ``progress.png`` and TensorBoard events."""
from __future__ import annotations

import math
from pathlib import Path

from lampseg.engine.metrics import metric_key
from lampseg.io import atomic_write_bytes, atomic_write_csv
from lampseg.plots import figure_png, pyplot

BASE_COLUMNS = ["epoch", "step", "train_loss", "val_dice", "lr", "epoch_s", "samples_per_s", "data_wait_frac"]


class RunLogger:
    """Writes one ``metrics.csv`` row per epoch (whole file rewritten atomically) and TensorBoard scalars.

    Args:
        run_dir: the run directory.
        names: region or label names for the ``val_dice_<metric_key(name)>`` columns.
        history: rows restored from a checkpoint when resuming.
        write: False keeps the rows without writing anything (ranks other than 0).
    """

    def __init__(self, run_dir: Path, names: list[str], history: list[dict] | None = None,
                 write: bool = True):
        self.run_dir, self.write = Path(run_dir), write
        keys = [metric_key(n) for n in names]
        self.columns = BASE_COLUMNS + [f"val_dice_{k}" for k in keys] + [f"val_hd95_{k}" for k in keys]
        self.rows: list[dict] = list(history or [])
        self._tb = None

    @property
    def tb(self):
        if self._tb is None:  # imported late: TensorBoard costs a second, ranks other than 0 never use it
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tb"))
        return self._tb

    def scalar(self, tag: str, value: float, step: int) -> None:
        if value is not None and math.isfinite(value):
            self.tb.add_scalar(tag, value, step)

    def log_epoch(self, row: dict) -> None:
        """Append a row, rewrite ``metrics.csv`` and ``progress.png``, and log the row to TensorBoard."""
        self.rows.append(row)
        if not self.write:
            return
        cells = [{k: "" if v is None or (isinstance(v, float) and math.isnan(v)) else v for k, v in r.items()}
                 for r in self.rows]
        atomic_write_csv(self.run_dir / "metrics.csv", cells, self.columns)
        for key, value in row.items():
            if key not in ("epoch", "step") and isinstance(value, (int, float)):
                self.scalar(f"epoch/{key}", float(value), row["step"])
        self.tb.flush()
        self.plot()

    def plot(self) -> None:
        """``progress.png``: training loss and validation Dice per epoch."""
        fig, (ax1, ax2) = pyplot().subplots(1, 2, figsize=(10, 4))
        epochs = [r["epoch"] for r in self.rows]
        ax1.plot(epochs, [r["train_loss"] for r in self.rows], marker=".")
        ax1.set(xlabel="epoch", ylabel="train loss", title="Training loss")
        val = [r for r in self.rows if r.get("val_dice") is not None and not math.isnan(r["val_dice"])]
        for column in [c for c in self.columns if c.startswith("val_dice")]:
            ax2.plot([r["epoch"] for r in val], [r.get(column) for r in val], marker=".",
                     label=column.removeprefix("val_dice_") if column != "val_dice" else "mean",
                     linewidth=2.5 if column == "val_dice" else 1)
        ax2.set(xlabel="epoch", ylabel="Dice", title="Validation Dice", ylim=(0, 1))
        if val:
            ax2.legend(fontsize=8)
        fig.tight_layout()
        atomic_write_bytes(self.run_dir / "progress.png", figure_png(fig, 80))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
