"""``python -m lampseg loo``: which modality matters? A leave-one-modality-out study (seed 002).

    python -m lampseg loo data.root=/data/Task01_BrainTumour +exp=brats loo.folds=5
    python -m lampseg loo loo.folds=patients tune.resources.gpu=1 tune.address=auto    # as in the seed
    python -m lampseg loo run_dir=RUN tune.resume=true                                 # continue it

For the baseline (every modality) and each modality of ``dataset.json`` left out (``loo.modalities``
narrows that list), and for each fold of patients (``loo.folds=K``, or ``patients`` for one patient per
fold), one trial trains on the remaining modalities and then evaluates its ``loo.checkpoint`` on the fold's
held-out cases. The trials run as one Ray Tune grid study (experiment parallelism, the ``tune.resources``,
``tune.max_concurrent`` and ``tune.address`` of ``lampseg tune``; resumable with ``tune.resume=true``).
Every case is held out once per condition, so conditions are compared case by case against the baseline
(``lampseg.tune.stats``). Writes ``loo/results.csv``, ``loo/summary.csv``, ``loo/summary.md``,
``loo/importance.png`` and ``loo/per_case.png``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from omegaconf import DictConfig

from lampseg.config import ConfigError, checked, derive
from lampseg.data.msd import load_dataset
from lampseg.data.prepare import dataset_root, resolve_channels
from lampseg.engine.metrics import metric_key
from lampseg.io import atomic_write_bytes, atomic_write_csv, atomic_write_text
from lampseg.plots import figure_png, pyplot
from lampseg.tune.search import run_tune
from lampseg.tune.stats import ConditionSummary, summarise

BASELINE = "none"


def conditions(cfg: DictConfig, used: list[str]) -> dict[str, list[str]]:
    """Left-out modality ("none" for the baseline) -> the modalities a trial of that condition uses.

    Args:
        cfg: the config (``loo.modalities``: which to leave out; default every one).
        used: the study's modality names (``data.modalities`` resolved against ``dataset.json``).
    """
    out = list(cfg.loo.modalities) if cfg.loo.modalities else used
    lower = {m.lower(): m for m in used}
    unknown = [m for m in out if m.lower() not in lower]
    if unknown:
        raise ConfigError(f"config key 'loo.modalities': {unknown} not among the study's modalities {used}")
    if len(used) < 2:
        raise ConfigError(f"config key 'data.modalities': leaving one out needs 2 or more modalities, "
                          f"got {used}")
    result = {BASELINE: used}
    for name in out:
        result[lower[name.lower()]] = [m for m in used if m.lower() != name.lower()]
    return result


def _folds(cfg: DictConfig, cases: int) -> int:
    folds = cases if cfg.loo.folds == "patients" else int(cfg.loo.folds)
    if folds > cases:
        raise ConfigError(f"config key 'loo.folds': {folds} folds need at least {folds} cases, the dataset "
                          f"has {cases}")
    return folds


def loo_study(cfg: DictConfig, subsets: dict[str, list[str]], folds: int) -> DictConfig:
    """The config of the Tune grid study of the leave-one-out trials (modality subsets x folds), derived
    from ``cfg`` (checked, read-only)."""
    study = {"name": "loo", "search": "grid", "scheduler": "fifo", "num_samples": 1, "metric": "val_dice",
             "mode": "max", "space": [{"key": "data.modalities", "grid": list(subsets.values())},
                                      {"key": "data.fold", "grid": list(range(folds))}]}
    return derive(cfg, {"data.folds": folds, "tune": study})


class ConditionNames:
    """Names a trial by its condition and fold (``without T2star, fold 1``; ``all modalities, fold 0``).

    Args:
        subsets: :func:`conditions`' result.
    """

    def __init__(self, subsets: dict[str, list[str]]):
        self.by_subset = {tuple(m.lower() for m in used): name for name, used in subsets.items()}

    def left_out(self, params: dict) -> str | None:
        """The condition (left-out modality, or ``none``) of a trial's parameters; None if not a subset."""
        return self.by_subset.get(tuple(m.lower() for m in params["data.modalities"]))

    def __call__(self, params: dict) -> str:
        left_out = self.left_out(params)
        condition = "all modalities" if left_out == BASELINE else f"without {left_out}"
        return f"{condition}, fold {params['data.fold']}"


def gather(study_dir: Path, subsets: dict[str, list[str]]) -> list[dict]:
    """One row per (condition, fold, held-out case) from the trials' ``eval.json``.

    Raises:
        ConfigError: when a trial has not finished (so the study is incomplete).
    """
    names = ConditionNames(subsets)
    rows, missing = [], []
    for trial in sorted(study_dir.glob("trial_*")):
        params = json.loads((trial / "params.json").read_text())
        left_out = names.left_out(params)
        if left_out is None:
            continue
        if not (trial / "eval.json").is_file():
            missing.append(trial.name)
            continue
        for case in json.loads((trial / "eval.json").read_text())["cases"]:
            scores = case["dice"]
            rows.append({"left_out": left_out, "fold": params["data.fold"], "case": case["case"],
                         "dice": sum(scores.values()) / len(scores),
                         **{f"dice_{metric_key(k)}": v for k, v in scores.items()}})
    if missing:
        raise ConfigError(f"the study is incomplete: {len(missing)} trial(s) have no held-out evaluation "
                          f"({', '.join(missing[:4])}); continue it with tune.resume=true")
    return rows


def _markdown(summary: list[ConditionSummary], cfg: DictConfig, folds: int) -> str:
    level = f"{cfg.loo.confidence:.0%}"
    lines = [f"# Leave-one-modality-out study ({folds} folds, {summary[0].cases} held-out cases)", "",
             f"| left out | mean Dice | {level} CI | change vs all | {level} CI of change "
             f"| p ({cfg.loo.test}) | importance |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in summary:
        p = "-" if math.isnan(r.p_value) else f"{r.p_value:.3g}"
        lines.append(f"| {'nothing (all)' if r.left_out == BASELINE else r.left_out} | {r.mean_dice:.4f} | "
                     f"[{r.ci_low:.4f}, {r.ci_high:.4f}] | {r.change:+.4f} | [{r.change_ci_low:+.4f}, "
                     f"{r.change_ci_high:+.4f}] | {p} | {r.rank or '-'} |")
    ranked = [r.left_out for r in summary if r.rank]
    lines += ["", f"Importance (largest Dice drop when left out first): {' > '.join(ranked)}.", ""]
    return "\n".join(lines)


def _plots(rows: list[dict], summary: list[ConditionSummary], out: Path) -> None:
    plt = pyplot()
    ranked = [r for r in summary if r.rank]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    drops = [-r.change for r in ranked]
    errors = [[r.change_ci_high - r.change for r in ranked], [r.change - r.change_ci_low for r in ranked]]
    ax.bar([r.left_out for r in ranked], drops, yerr=errors, capsize=5, color="#cc6677")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set(ylabel="Dice drop when left out (vs all modalities)", xlabel="left-out modality",
           title="Modality importance (mean drop and CI over held-out cases)")
    fig.tight_layout()
    atomic_write_bytes(out / "importance.png", figure_png(fig, 100))

    order = [r.left_out for r in summary]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    data = [[row["dice"] for row in rows if row["left_out"] == name] for name in order]
    ax.boxplot(data, showfliers=False)
    for k, values in enumerate(data, 1):
        ax.scatter([k] * len(values), values, s=12, alpha=0.7, color="black")
    ax.set_xticks(range(1, len(order) + 1), ["all" if n == BASELINE else f"-{n}" for n in order])
    ax.set(ylabel="Dice per held-out case", title="Per case, by left-out modality", ylim=(0, 1))
    fig.tight_layout()
    atomic_write_bytes(out / "per_case.png", figure_png(fig, 100))


def run_loo(cfg: DictConfig, log=print) -> dict:
    """Run (or resume) the leave-one-modality-out study and write its answer.

    Returns:
        ``{"summary": [rows of summary.csv], "ranking": [modalities, most important first], ...}``.

    Raises:
        ConfigError: bad ``loo.*`` settings, or an incomplete study.
    """
    cfg = checked(cfg)
    dataset = load_dataset(dataset_root(cfg.data, log))
    used = [dataset.modalities[k] for k in resolve_channels(dataset, cfg.data)]  # names, dataset.json order
    subsets = conditions(cfg, used)
    folds = _folds(cfg, len(dataset.cases))
    log(f"loo: {len(subsets)} conditions ({', '.join(subsets)}) x {folds} folds = {len(subsets) * folds} "
        "trials")
    run_tune(loo_study(cfg, subsets, folds), log=log, held_out=cfg.loo.checkpoint,
             describe=ConditionNames(subsets))
    run_dir = Path(cfg.run_dir).resolve()
    rows = gather(run_dir / "tune", subsets)
    dice: dict[str, dict[str, float]] = {}
    for row in rows:
        dice.setdefault(row["left_out"], {})[row["case"]] = row["dice"]
    summary = summarise(dice, BASELINE, cfg.loo.confidence, cfg.loo.test)
    out = run_dir / "loo"
    atomic_write_csv(out / "results.csv", rows)
    atomic_write_csv(out / "summary.csv", [r.to_dict() for r in summary])
    markdown = _markdown(summary, cfg, folds)
    atomic_write_text(out / "summary.md", markdown)
    _plots(rows, summary, out)
    log(markdown)
    log(f"loo: wrote {out / 'summary.md'}, results.csv, summary.csv, importance.png, per_case.png")
    return {"summary": [r.to_dict() for r in summary], "ranking": [r.left_out for r in summary if r.rank],
            "folds": folds, "cases": len(next(iter(dice.values())))}
