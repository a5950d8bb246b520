"""A finished (or stopped) Tune study as files: ``results.csv``, ``best_config.yaml``, ``curves.png``,
``params.png`` and a printed table, all in ``run_dir/tune``.

``best_config.yaml`` is the best trial's complete config as a primary Hydra config; it reruns as-is with

    python -m lampseg train --config-path ABSOLUTE/RUN/tune --config-name best_config
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lampseg.config import to_container
from lampseg.io import atomic_write_bytes, atomic_write_csv, atomic_write_text, portable
from lampseg.plots import figure_png, pyplot
from lampseg.tune.space import apply_params, space_of

DEFAULT_RUN_DIR = "outputs/${now:%Y-%m-%d}/${now:%H-%M-%S}"
HYDRA = {"run": {"dir": "${run_dir}"}, "sweep": {"dir": "${run_dir}", "subdir": "${hydra.job.num}"},
         "job": {"name": "lampseg", "chdir": False}}


def _best(history: list[dict], metric: str, mode: str) -> tuple[float, int | None]:
    """Best validated value of ``metric`` over a trial's reports, and its epoch."""
    rows = [r for r in history if r.get("validated", True) and isinstance(r.get(metric), (int, float))
            and not math.isnan(r[metric])]
    if not rows:
        return math.nan, None
    pick = max if mode == "max" else min
    row = pick(rows, key=lambda r: r[metric])
    return float(row[metric]), int(row["epoch"])


def _best_from_summary(trial_dir: Path, metric: str) -> tuple[float, int | None]:
    """The best value the trial's own ``summary.json`` recorded: for a PBT trial that resumed from another
    trial's checkpoint at its last epoch, Ray's history may hold no validated report of its own."""
    try:
        summary = json.loads((trial_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return math.nan, None
    value = summary.get(f"best_{metric}")
    return (float(value), summary.get("best_epoch")) if isinstance(value, (int, float)) else (math.nan, None)


def trial_rows(grid, cfg: DictConfig) -> list[dict]:
    """One row per trial: its id, status, hyperparameters, best metric, epochs, wall time, directory."""
    metric, mode, max_epochs = cfg.tune.metric, cfg.tune.mode, cfg.trainer.max_epochs
    keys, rows = list(space_of(cfg)), []
    for result in grid:
        frame = result.metrics_dataframe
        history = frame.to_dict("records") if frame is not None else []
        last = result.metrics or {}
        config = result.config or {}  # None for a trial an interrupt stopped before it started
        best, best_epoch = _best(history + [last], metric, mode)
        if math.isnan(best):
            best, best_epoch = _best_from_summary(Path(str(result.path)), metric)
        epochs = int(last.get("epoch", 0) or 0)
        trial_epochs = int(config.get("trainer.max_epochs", max_epochs))  # searched: the trial's own
        status = "error" if result.error else "completed" if epochs >= trial_epochs else "stopped"
        rows.append({"trial_id": last.get("trial_id") or Path(str(result.path)).name.removeprefix("trial_"),
                     "status": status, **{k: config.get(k) for k in keys},
                     f"best_{metric}": best, "best_epoch": best_epoch, "epochs": epochs,
                     "wall_s": round(float(last.get("time_total_s", 0.0) or 0.0), 2),
                     "trial_dir": str(result.path),
                     "error": str(result.error).strip().splitlines()[-1] if result.error else "",
                     "_history": history, "_config": dict(config)})
    key = f"best_{metric}"
    sign = -1 if mode == "max" else 1
    return sorted(rows, key=lambda r: (math.isnan(r[key]), sign * (0 if math.isnan(r[key]) else r[key])))


def best_config_yaml(cfg: DictConfig, params: dict, comment: str) -> str:
    """A primary Hydra config (schema first) with the trial's values, ready for ``--config-name``."""
    best = to_container(apply_params(cfg, params))
    best["run_dir"] = DEFAULT_RUN_DIR
    best["trainer"]["resume"] = "auto"
    document = {"defaults": ["lampseg_schema", "_self_"], **portable(best), "hydra": HYDRA}
    return comment + OmegaConf.to_yaml(OmegaConf.create(document))


def _plots(rows: list[dict], cfg: DictConfig, study_dir: Path) -> None:
    plt, metric = pyplot(), cfg.tune.metric
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        points = [(h["epoch"], h[metric]) for h in row["_history"] if h.get("validated", True)
                  and isinstance(h.get(metric), (int, float)) and not math.isnan(h[metric])]
        if points:
            ax.plot(*zip(*points), marker=".", linewidth=1, label=row["trial_id"])
    ax.set(xlabel="epoch", ylabel=metric, title=f"{cfg.tune.name}: every trial's {metric}")
    if len(rows) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write_bytes(study_dir / "curves.png", figure_png(fig, 90))

    space = space_of(cfg)
    keys = list(space) or ["(no hyperparameters)"]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.4), squeeze=False)
    best = f"best_{metric}"
    for ax, key in zip(axes[0], keys):
        done = [r for r in rows if not math.isnan(r[best])]
        values = [r.get(key) for r in done]
        if key in space and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            ax.scatter(values, [r[best] for r in done])
            wide = values and min(values) > 0 and max(values) / min(values) > 20
            if space[key][0] == "loguniform" or wide:
                ax.set_xscale("log")
        else:
            labels = sorted({str(v) for v in values})
            ax.scatter([labels.index(str(v)) for v in values], [r[best] for r in done])
            ax.set_xticks(range(len(labels)), labels)
        ax.set(xlabel=key, ylabel=best)
    fig.tight_layout()
    atomic_write_bytes(study_dir / "params.png", figure_png(fig, 90))


def table(rows: list[dict], cfg: DictConfig, limit: int = 20) -> str:
    """The study as a fixed-width text table, best trial first."""
    keys = list(space_of(cfg))
    header = ["rank", "trial", *keys, f"best {cfg.tune.metric}", "epoch", "epochs", "wall s", "status"]
    lines = [header]
    for rank, r in enumerate(rows[:limit], 1):
        best = r[f"best_{cfg.tune.metric}"]
        lines.append([str(rank), r["trial_id"], *(f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k])
                                                   for k in keys),
                      "-" if math.isnan(best) else f"{best:.4f}", str(r["best_epoch"] or "-"),
                      str(r["epochs"]),
                      f"{r['wall_s']:.1f}", r["status"]])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in lines)
    if len(rows) > limit:
        text += f"\n... {len(rows) - limit} more in results.csv"
    return text


def write_results(grid, cfg: DictConfig, base: dict, study_dir: Path, log=print) -> dict:
    """Write the study's files and print its table; returns the study summary."""
    rows = trial_rows(grid, cfg)
    columns = [k for k in rows[0] if not k.startswith("_")] if rows else ["trial_id"]
    atomic_write_csv(study_dir / "results.csv", rows, columns)
    metric = cfg.tune.metric
    ranked = [r for r in rows if not math.isnan(r[f"best_{metric}"])]
    summary = {"study": cfg.tune.name, "metric": metric, "mode": cfg.tune.mode, "trials": len(rows),
               "status": {s: sum(r["status"] == s for r in rows) for s in {r["status"] for r in rows}},
               "best": None}
    if ranked:
        top = ranked[0]
        params = {k: top["_config"][k] for k in space_of(cfg)}
        comment = (f"# Best trial {top['trial_id']} of study '{cfg.tune.name}': {metric}="
                   f"{top[f'best_{metric}']:.4f} at epoch {top['best_epoch']}.\n# Rerun it with:\n"
                   f"#   python -m lampseg train --config-path {study_dir.resolve()} "
                   "--config-name best_config\n")
        trained = OmegaConf.merge(cfg, {"parallel": base["parallel"]})  # the engine the trials used
        atomic_write_text(study_dir / "best_config.yaml", best_config_yaml(trained, params, comment))
        summary["best"] = {"trial_id": top["trial_id"], metric: top[f"best_{metric}"],
                           "epoch": top["best_epoch"], "params": params, "trial_dir": top["trial_dir"]}
    _plots(rows, cfg, study_dir)
    log(table(rows, cfg))
    return summary
