"""``python -m lampseg evaluate ckpt=PATH``: Dice and HD95 of a checkpoint on a split of its dataset, under
any parallel layout (``parallel=pipeline`` under torchrun: this rank's stage); writes ``eval.json``.

    python -m lampseg evaluate ckpt=outputs/run/checkpoints/best.pt inference.mode=sliding
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from lampseg.config import ConfigError
from lampseg.engine.checkpoint import load_checkpoint
from lampseg.engine.evaluate import config_from_checkpoint, evaluate_cases, load_model
from lampseg.engine.metrics import metric_key
from lampseg.engine.setup import load_data
from lampseg.io import write_json
from lampseg.runtime import distributed


def run_evaluate(cfg, overrides: list[str], log=print) -> dict:
    """``evaluate ckpt=...``: metrics of a checkpoint on the validation fold (``split=val``), the training
    fold (``split=train``) or all cases (``split=all``); writes ``eval.json`` in ``run_dir``."""
    if cfg.ckpt is None:
        raise ConfigError("config key 'ckpt': expected the path of a checkpoint (ckpt=PATH), got None")
    ckpt = load_checkpoint(cfg.ckpt)
    cfg = config_from_checkpoint(ckpt, cfg, overrides)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model, _, device, dims = load_model(ckpt, cfg)  # under torchrun: this rank's pipeline stage
    main = distributed.is_main()
    log = log if main else (lambda *_: None)
    with distributed.main_first():
        bundle = load_data(cfg, run_dir, log)
    cases = {"val": bundle.val_cases, "train": bundle.train_cases,
             "all": bundle.train_cases + bundle.val_cases}[cfg.split]
    per_case, means = evaluate_cases(model, bundle, sorted(cases), cfg, device, dims)
    result = {"ckpt": str(cfg.ckpt), "split": cfg.split,
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
