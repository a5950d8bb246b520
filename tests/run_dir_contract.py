"""The training run directory of ``docs/DESIGN.md`` ("User contract: Run directory"), checked file by file.

``check_run_dir(path)`` returns every problem found (an empty list when the directory keeps the contract);
the tests call it on the run directories of real trainings, and ``test_cli.py`` proves on broken copies
that it finds what it should. It reads the files as a user or a script would (CSV, JSON, YAML, PNG,
``torch.load(weights_only=True)``); lampseg's own code only rebuilds the unpartitioned model whose parameter
names a checkpoint must carry, spells metric names (``metric_key``) and recomputes checkpoint checksums.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

STATUSES = ("completed", "failed", "running")
PRECISIONS = ("fp32", "bf16", "fp16")
METRIC_COLUMNS = ["epoch", "step", "train_loss", "val_dice", "lr", "epoch_s", "samples_per_s"]
CHECKPOINTS = ("latest", "best", "final")
FILES = [".hydra/config.yaml", "metrics.csv", "summary.json", "progress.png",
         *(f"checkpoints/{name}.pt" for name in CHECKPOINTS)]
CONFIG_SECTIONS = ["run_dir", "seed", "data", "model", "optim", "trainer", "inference", "parallel"]
PNG = b"\x89PNG\r\n\x1a\n"
CHECKPOINT_KEYS = ["model", "optimizer", "epoch"]


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _summary_problems(summary) -> list[str]:
    """``summary.json``: the keys the contract names, with their types and ranges."""
    if not isinstance(summary, dict):
        return [f"summary.json is a {type(summary).__name__}, not an object"]
    problems = []
    types = {"status": (lambda v: v in STATUSES, f"one of {list(STATUSES)}"),
             "epochs": (lambda v: _integer(v) and v >= 0, "an integer >= 0"),
             "best_epoch": (lambda v: v is None or (_integer(v) and v >= 1), "null or an epoch >= 1"),
             "best_val_dice": (lambda v: v is None or (_number(v) and 0 <= v <= 1),
                               "null or a Dice in [0, 1]"),
             "val_dice": (lambda v: isinstance(v, dict) and bool(v)
                          and all(x is None or (_number(x) and 0 <= x <= 1) for x in v.values()),
                          "a non-empty name -> Dice mapping"),
             "wall_s": (lambda v: _number(v) and v >= 0, "seconds >= 0"),
             "train_samples_per_s": (lambda v: _number(v) and v >= 0, "a rate >= 0"),
             "peak_memory_mb": (lambda v: _number(v) and v >= 0, "megabytes >= 0"),
             "params": (lambda v: _integer(v) and v > 0, "an integer > 0"),
             "plan": (lambda v: v is None or isinstance(v, dict), "null or an object")}
    for key, (ok, wanted) in types.items():
        if key not in summary:
            problems.append(f"summary.json lacks '{key}'")
        elif not ok(summary[key]):
            problems.append(f"summary.json '{key}' is {summary[key]!r}, expected {wanted}")
    if "precision" in summary and summary["precision"] not in PRECISIONS:  # the resolved value, never auto
        problems.append(f"summary.json 'precision' is {summary['precision']!r}, expected one of "
                        f"{list(PRECISIONS)}")
    if "precision_reason" in summary and not isinstance(summary["precision_reason"], str):
        problems.append(f"summary.json 'precision_reason' is {summary['precision_reason']!r}, expected text")
    if summary.get("status") == "completed" and summary.get("best_epoch") is None:
        problems.append("summary.json: a completed run has no best_epoch")
    if _integer(summary.get("best_epoch")) and _integer(summary.get("epochs")) \
            and summary["best_epoch"] > summary["epochs"]:
        problems.append(f"summary.json best_epoch {summary['best_epoch']} > epochs {summary['epochs']}")
    return problems


def _float_cell(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def _metrics_problems(path: Path, summary: dict | None) -> list[str]:
    """``metrics.csv``: the columns, one row per epoch, numbers where numbers belong, and agreement with the
    summary (epochs, best Dice, one ``val_dice_<name>`` column per name)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        rows = list(reader)
    problems = [f"metrics.csv lacks column '{c}'" for c in METRIC_COLUMNS if c not in columns]
    named = [c for c in columns if c.startswith("val_dice_")]
    if not named:
        problems.append("metrics.csv has no val_dice_<name> column")
    if not rows:
        return problems + ["metrics.csv has no rows"]
    if problems:
        return problems
    epochs = [row["epoch"] for row in rows]
    if epochs != [str(e) for e in range(1, len(rows) + 1)]:
        problems.append(f"metrics.csv epochs are {epochs}, expected 1, 2, ... one row per epoch")
    for i, row in enumerate(rows, 1):
        for column in ("step", "train_loss", "lr", "epoch_s", "samples_per_s"):
            if _float_cell(row[column]) is None:
                problems.append(f"metrics.csv row {i} '{column}' is {row[column]!r}, not a number")
        for column in ["val_dice", *named]:  # blank on epochs without validation
            value = _float_cell(row[column]) if row[column] != "" else 0.0
            if value is None or not 0 <= value <= 1:
                problems.append(f"metrics.csv row {i} '{column}' is {row[column]!r}, not blank or a Dice")
    if summary is None:
        return problems
    if _integer(summary.get("epochs")) and summary["epochs"] != len(rows):
        problems.append(f"metrics.csv has {len(rows)} rows, summary.json says {summary['epochs']} epochs")
    if isinstance(summary.get("val_dice"), dict):
        from lampseg.engine.metrics import metric_key

        wanted = {f"val_dice_{metric_key(name)}" for name in summary["val_dice"]}
        if wanted != set(named):
            problems.append(f"metrics.csv val_dice_<name> columns {sorted(named)} do not match the names of "
                            f"summary.json's val_dice (expected {sorted(wanted)})")
    validated = [_float_cell(row["val_dice"]) for row in rows if row["val_dice"] != ""]
    best = summary.get("best_val_dice")
    if _number(best) and validated and all(v is not None for v in validated) \
            and not math.isclose(best, max(validated), abs_tol=1e-9):
        problems.append(f"summary.json best_val_dice {best} is not the best val_dice of metrics.csv "
                        f"({max(validated)})")
    return problems


def _config_problems(path: Path) -> list[str]:
    """``.hydra/config.yaml``: the whole config, every interpolation resolved."""
    import yaml

    text = path.read_text()
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as e:
        return [f".hydra/config.yaml is not YAML: {e}"]
    if not isinstance(config, dict):
        return [".hydra/config.yaml is not a mapping"]
    problems = [f".hydra/config.yaml lacks '{key}'" for key in CONFIG_SECTIONS if key not in config]
    if "${" in text:
        problems.append(".hydra/config.yaml holds an unresolved ${...} interpolation")
    if "run_dir" in config and Path(str(config["run_dir"])).resolve() != path.parent.parent.resolve():
        problems.append(f".hydra/config.yaml run_dir {config['run_dir']!r} is not this run directory")
    return problems


def _unsplit_names(ckpt: dict) -> dict[str, tuple[int, ...]] | None:
    """Parameter names and shapes of the unpartitioned model the checkpoint's config builds (None when the
    checkpoint does not say enough to build it)."""
    from omegaconf import OmegaConf

    from lampseg.config import Config
    from lampseg.model.losses import Targets
    from lampseg.model.unet import build_model

    config, data = ckpt.get("config"), ckpt.get("data")
    if not isinstance(config, dict) or not isinstance(data, dict):
        return None
    cfg = OmegaConf.merge(OmegaConf.structured(Config), config)
    targets = Targets.from_config({int(k): v for k, v in data["labels"].items()}, cfg.data.regions)
    model = build_model(cfg.model, len(data["channels"]), targets.out_channels)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _checkpoint_problems(run: Path, summary: dict | None) -> list[str]:
    """``checkpoints/*.pt``: each loads with ``weights_only=True`` into a dict with the model (under the
    unpartitioned model's names), optimiser and epoch, matches its checksum; the epochs agree with the
    summary; no temp file of an atomic write is left."""
    import torch

    from lampseg.engine.checkpoint import CHECKSUM_KEY, state_digest

    problems, unsplit = [], None
    for name in CHECKPOINTS:
        path = run / "checkpoints" / f"{name}.pt"
        if not path.is_file():
            continue
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - report any load failure
            problems.append(f"{path.name} does not load with weights_only=True: {type(e).__name__}: {e}")
            continue
        if not isinstance(ckpt, dict):
            problems.append(f"{path.name} is a {type(ckpt).__name__}, not a dict")
            continue
        problems += [f"{path.name} lacks '{key}'" for key in CHECKPOINT_KEYS if key not in ckpt]
        saved = ckpt.pop(CHECKSUM_KEY, None)
        if saved is not None and saved != state_digest(ckpt):
            problems.append(f"{path.name} does not match its checksum")
        weights = ckpt.get("model")
        if not isinstance(weights, dict) or not weights \
                or not all(isinstance(t, torch.Tensor) for t in weights.values()):
            problems.append(f"{path.name} 'model' is not a state dict of tensors")
            continue
        if unsplit is None:
            unsplit = _unsplit_names(ckpt)
        if unsplit is not None:
            got = {k: tuple(t.shape) for k, t in weights.items()}
            if got != unsplit:
                odd = sorted(set(got) ^ set(unsplit))[:4] or [k for k in got if got[k] != unsplit[k]][:4]
                problems.append(f"{path.name} parameter names/shapes are not the unpartitioned model's "
                                f"(first differences: {odd})")
        if summary is None or summary.get("status") != "completed" or not _integer(ckpt.get("epoch")):
            continue
        expected = summary.get("best_epoch") if name == "best" else summary.get("epochs")
        if ckpt["epoch"] != expected:
            problems.append(f"{path.name} is of epoch {ckpt['epoch']}, summary.json says {expected}")
    left = sorted(p.name for p in run.rglob("*.tmp"))
    if left:
        problems.append(f"temp files of atomic writes left behind: {left}")
    return problems


def check_run_dir(run: str | Path) -> list[str]:
    """Every way the training run directory ``run`` breaks the contract of ``docs/DESIGN.md`` (empty when
    it keeps it)."""
    run = Path(run)
    problems = [f"missing {f}" for f in FILES if not (run / f).is_file()]
    tb = run / "tb"
    if not tb.is_dir() or not any(p.name.startswith("events.out.tfevents.") for p in tb.rglob("*")):
        problems.append("missing TensorBoard events under tb/")
    summary = None
    if (run / "summary.json").is_file():
        try:
            summary = json.loads((run / "summary.json").read_text())
        except json.JSONDecodeError as e:
            problems.append(f"summary.json is not JSON: {e}")
        else:
            problems += _summary_problems(summary)
            summary = summary if isinstance(summary, dict) else None
    if (run / "metrics.csv").is_file():
        problems += _metrics_problems(run / "metrics.csv", summary)
    if (run / ".hydra" / "config.yaml").is_file():
        problems += _config_problems(run / ".hydra" / "config.yaml")
    if (run / "progress.png").is_file() and (run / "progress.png").read_bytes()[:8] != PNG:
        problems.append("progress.png is not a PNG")
    problems += _checkpoint_problems(run, summary)
    return problems


check = check_run_dir  # conftest.load_check_run_dir() returns this module; callers call .check(path)
