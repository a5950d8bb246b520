"""``python -m lampseg bench context``: LAMP's accuracy claim, more input context (up to the whole volume)
and wider models raise Dice, checked by training the same model at several input sizes and widths.

    python -m lampseg bench context data.synthetic.context=laterality data.augment.flip_prob=0 \
        "bench.patch_sizes=[16,32,whole]" "bench.widths=[8,16]" trainer.max_epochs=8

For every width in ``bench.widths`` (channels of the first level; the others keep ``model.channels``'
ratios) and every training input in ``bench.patch_sizes`` (cube sides, or ``whole`` for whole padded
volumes), ``run()`` trains the model on the configured data (its own run directory under
``run_dir/context/``, resumable: rerunning the bench skips finished trainings) and validates it the way it
was trained: sliding windows of the training patch for patch-trained models (nnU-Net's practice), the
whole volume for whole-volume models. On ``data.synthetic.context=laterality`` data the tumour core's
label depends on which side of the head it is in (``lampseg.data.synth``), which a small patch cannot
see. Writes ``bench_context.json`` and ``bench_context.png`` (Dice vs input size per width).
"""
from __future__ import annotations

import math
import time
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import OmegaConf

from lampseg.config import ConfigError, derive
from lampseg.engine.checkpoint import load_checkpoint
from lampseg.engine.train import run as train
from lampseg.io import atomic_write_bytes, write_json
from lampseg.model.unet import receptive_field
from lampseg.plots import figure_png, pyplot


def _settings(b) -> tuple[list, list[int]]:
    sizes = list(b.patch_sizes)
    if not sizes or any(not (s == "whole" or (isinstance(s, int) and s > 0)) for s in sizes):
        raise ConfigError(f"config key 'bench.patch_sizes': expected positive cube sides or 'whole', "
                          f"got {sizes}")
    widths = list(b.widths)
    if not widths or min(widths) < 1:
        raise ConfigError(f"config key 'bench.widths': expected positive channel counts, got {widths}")
    return sizes, widths


def run(cfg, log=print) -> dict:
    """Train and validate every (width, input size); returns what it writes as JSON."""
    sizes, widths = _settings(cfg.bench)
    base = list(cfg.model.channels)
    run_dir = Path(cfg.run_dir)
    rows, start = [], time.perf_counter()
    reach = receptive_field(cfg.model)  # the same at every width: channels do not change it
    log(f"bench context: widths {widths} x inputs {sizes}, {cfg.trainer.max_epochs} epochs each, "
        f"data {cfg.data.root or 'synthetic (context=' + cfg.data.synthetic.context + ')'}; the model's "
        f"receptive field is {reach} voxels along each axis (context beyond it reaches a voxel only "
        f"through normalisation statistics)")
    for width in widths:
        channels = [max(1, round(c * width / base[0])) for c in base]
        for size in sizes:
            whole = size == "whole"
            changes = {"model.channels": channels, "data.patch_size": "whole" if whole else [size] * 3,
                       "trainer.curriculum": None, "inference.mode": "whole" if whole else "sliding",
                       "inference.patch_size": None,  # sliding: the training patch
                       "run_dir": str(run_dir / "context" / f"w{width}_{size}"), "trainer.resume": "auto"}
            try:
                sub = derive(cfg, changes)
            except ConfigError as e:
                raise ConfigError(f"bench context, width {width}, input {size}: {e}") from e
            summary = train(sub, log=lambda line, w=width, s=size: log(f"  [w{w} {s}] {line}")
                            if line.startswith(("epoch", "done", "resumed")) else None)
            patch = summary["plan"]["input_shape"][1:] if summary.get("plan") else None
            rows.append({"width": width, "channels": channels, "input": size,
                         "input_voxels": math.prod(patch or ([size] * 3 if not whole else _whole(sub))),
                         "params": summary["params"], "val_dice": summary["best_val_dice"],
                         "val_dice_per_region": summary["val_dice"], "epochs": summary["epochs"],
                         "wall_s": summary["wall_s"], "run_dir": str(sub.run_dir)})
            log(f"width {width} input {size}: best val Dice {summary['best_val_dice']:.4f} "
                f"({', '.join(f'{k} {v:.3f}' for k, v in summary['val_dice'].items() if v is not None)})")
    result = {"benchmark": "context", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "rows": rows, "config": {"widths": widths, "patch_sizes": sizes, "model": cfg.model.name,
                                       "max_epochs": cfg.trainer.max_epochs, "receptive_field": reach,
                                       "samples_per_epoch": cfg.data.samples_per_epoch,
                                       "data": str(cfg.data.root) if cfg.data.root else
                                       OmegaConf.to_container(cfg.data.synthetic)},
              "wall_s": round(time.perf_counter() - start, 1)}
    json_path, png_path = run_dir / "bench_context.json", run_dir / "bench_context.png"
    write_json(json_path, result)
    atomic_write_bytes(png_path, _plot(result))
    log(f"wrote {json_path} and {png_path}")
    return result


def _whole(cfg) -> list[int]:
    """The padded whole-volume shape a run trained on (read back from its checkpoint)."""
    return list(load_checkpoint(Path(cfg.run_dir) / "checkpoints" / "final.pt")["data"]["patch_size"])


def _plot(result: dict) -> bytes:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for width in result["config"]["widths"]:
        rows = sorted((r for r in result["rows"] if r["width"] == width), key=lambda r: r["input_voxels"])
        ax.plot([r["input_voxels"] ** (1 / 3) for r in rows], [r["val_dice"] for r in rows], "o-",
                label=f"width {width}")
        for r in rows:
            ax.annotate(str(r["input"]), (r["input_voxels"] ** (1 / 3), r["val_dice"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("training input size (cube root of voxels)")
    ax.set_ylabel("best validation Dice")
    ax.legend()
    ax.set_title("bench context: Dice vs input context and width")
    fig.tight_layout()
    return figure_png(fig, 110)
