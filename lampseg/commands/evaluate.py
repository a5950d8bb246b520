"""``python -m lampseg evaluate ckpt=PATH``: Dice and HD95 of a checkpoint on a split of its dataset, under
any parallel layout (``parallel=pipeline`` under torchrun: this rank's stage); writes ``eval.json``.

    python -m lampseg evaluate ckpt=outputs/run/checkpoints/best.pt inference.mode=sliding
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from lampseg.config import ConfigError, changes_from, enum_value
from lampseg.engine.checkpoint import load_checkpoint
from lampseg.engine.evaluate import config_from_checkpoint, evaluate_cases, load_model
from lampseg.engine.metrics import metric_key
from lampseg.engine.setup import load_data
from lampseg.io import write_json
from lampseg.runtime import distributed


def run_evaluate(cfg: DictConfig, overrides: list[str], log=print) -> dict:
    """``evaluate ckpt=PATH [split=val|train|all]``: ``evaluate_checkpoint`` with the settings the command
    line changed applied to the checkpoint's config."""
    if cfg.evaluate.ckpt is None:
        raise ConfigError("config key 'ckpt': expected the path of a checkpoint (ckpt=PATH), got None")
    return evaluate_checkpoint(Path(cfg.evaluate.ckpt), Path(cfg.run_dir), enum_value(cfg.evaluate.split),
                               changes_from(cfg, overrides), log)


def evaluate_checkpoint(ckpt_path: Path, run_dir: Path, split: str = "val", changes: dict | None = None,
                        log=print) -> dict:
    """Metrics of a checkpoint on its dataset, under any parallel layout; writes ``run_dir/eval.json``.

    Args:
        ckpt_path: the checkpoint.
        run_dir: where ``eval.json`` (and, for a new split, ``splits.json``) go.
        split: ``val`` (the checkpoint's validation fold), ``train`` (its training fold) or ``all``.
        changes: settings to change in the checkpoint's config (dotted keys: ``inference.mode``, ...).
        log: where progress lines go (rank 0's).

    Returns:
        What ``eval.json`` holds: per-case and mean Dice/HD95, seconds per case.
    """
    ckpt = load_checkpoint(ckpt_path)
    cfg = config_from_checkpoint(ckpt, changes, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model, _, device, dims = load_model(ckpt, cfg, ckpt_path)  # under torchrun: this rank's pipeline stage
    main = distributed.is_main()
    log = log if main else (lambda *_: None)
    with distributed.main_first():
        bundle = load_data(cfg, run_dir, log)
    cases = {"val": bundle.val_cases, "train": bundle.train_cases,
             "all": bundle.train_cases + bundle.val_cases}[split]
    per_case, means = evaluate_cases(model, bundle, sorted(cases), cfg, device, dims)
    result = {"ckpt": str(ckpt_path), "split": split,
              "inference": OmegaConf.to_container(cfg.inference, enum_to_str=True),
              "parallel": OmegaConf.to_container(cfg.parallel), "mean": means,
              "seconds_per_case": float(np.mean([c["seconds"] for c in per_case])), "cases": per_case}
    if main:
        write_json(run_dir / "eval.json", result)
    names = bundle.targets.names
    log(f"evaluated {len(per_case)} cases: mean Dice {means['dice']:.4f} ("
        + ", ".join(f"{n} {means[f'dice_{metric_key(n)}']:.4f}" for n in names)
        + f"), {result['seconds_per_case']:.2f} s/case -> {run_dir / 'eval.json'}")
    return result
