"""``python -m lampseg export ckpt=PATH out=DIR``: a checkpoint as a MONAI bundle (``configs/metadata.json``,
``configs/inference.json``, ``configs/logging.conf``, ``models/model.pt``, ``models/model.ts``,
``docs/README.md``), built in a temp folder next to ``out`` and renamed into place, so ``out`` is either the
whole bundle or untouched.

    python -m lampseg export ckpt=outputs/run/checkpoints/best.pt out=bundle
    python -m monai.bundle run --config_file bundle/configs/inference.json --bundle_root bundle \
        --dataset_dir imagesTs --output_dir preds
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import monai
import nibabel
import numpy as np
import torch
from monai.bundle import ConfigParser
from omegaconf import DictConfig

from lampseg import __version__
from lampseg.commands.bundle import (
    LOGGING_CONF,
    RUN_COMMAND,
    VERIFY_COMMAND,
    BundleModel,
    inference_config,
    inference_mode,
    metadata,
    network_def,
    readme,
    training_summary,
)
from lampseg.config import ConfigError, changes_from
from lampseg.engine.checkpoint import CheckpointError, load_checkpoint, load_weights
from lampseg.engine.evaluate import config_from_checkpoint
from lampseg.errors import LampsegError
from lampseg.io import atomic_write, atomic_write_bytes, fsync_dir, write_json
from lampseg.model.losses import Targets

DATA_KEYS = ("modalities", "channels", "labels", "patch_size")
TS_TOLERANCE = 1e-5  # max |TorchScript - eager| logits, relative to the largest logit (at least 1)


def run_export(cfg: DictConfig, overrides: list[str], log=print) -> Path:
    """``export ckpt=PATH out=DIR [overwrite=true]``: ``export_bundle`` with the settings the command line
    changed (``inference.mode=sliding``, ...) applied to the checkpoint's config."""
    args = cfg.export
    for key in ("ckpt", "out"):
        if args[key] is None:
            raise ConfigError(f"config key 'export.{key}': expected a path ({key}=PATH), got None")
    return export_bundle(Path(args.ckpt).expanduser(), Path(args.out).expanduser(), args.overwrite,
                         changes_from(cfg, overrides), log)


def export_bundle(ckpt_path: Path, out: Path, overwrite: bool = False, changes: dict | None = None,
                  log=print) -> Path:
    """Write a lampseg checkpoint as a MONAI bundle in ``out``, atomically.

    Args:
        ckpt_path: the checkpoint (``RUN/checkpoints/best.pt``).
        out: the bundle's folder; it must not exist unless ``overwrite``.
        overwrite: replace an existing ``out`` (only once the new bundle is complete).
        changes: settings to change in the checkpoint's config (``inference.mode``, ``inference.overlap``).
        log: where the summary line goes.

    Returns:
        ``out``.

    Raises:
        ConfigError: ``out`` exists (without ``overwrite``) or is not a folder.
        FileNotFoundError: the checkpoint does not exist.
        CheckpointError: the file is not a lampseg training checkpoint, or its weights do not fit its
            config's network; the message names the file and the key.
    """
    start, shown = time.perf_counter(), out
    out = Path(os.path.abspath(out))
    _check_out(out, overwrite)
    ckpt = load_checkpoint(ckpt_path)
    b, net = _bundle_model(ckpt, ckpt_path, changes)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        _write_bundle(tmp, ckpt, ckpt_path, b, net)
        _replace(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"{shown}: MONAI bundle, {size / 1e6:.2f} MB in {time.perf_counter() - start:.1f} s ({b.mode}-volume "
        f"inference, {len(b.modalities)} channel(s) -> {b.targets.out_channels} outputs)\n"
        f"verify: {VERIFY_COMMAND.format(out=shown)}\nrun:    {RUN_COMMAND.format(out=shown)}")
    if b.cfg.inference.tta:
        log("note: the bundle does not mirror (inference.tta=true is lampseg's; its README says so)")
    return out


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"config key 'export.out': {out} exists and is not a folder")
    if out.exists() and not overwrite:
        raise ConfigError(f"config key 'export.out': {out} already exists; export.overwrite=true replaces it "
                          f"(once the new bundle is complete)")


def _bundle_model(ckpt: dict, path: Path, changes: dict | None) -> tuple[BundleModel, torch.nn.Module]:
    """The checkpoint's config and data info resolved, and its network built from the bundle's
    ``network_def`` with its weights loaded (eval mode)."""
    for key in ("config", "data"):
        if not isinstance(ckpt.get(key), dict):
            raise CheckpointError(f"checkpoint {path} has no '{key}' entry: not a lampseg training "
                                  f"checkpoint")
    missing = [k for k in DATA_KEYS if k not in ckpt["data"]]
    if missing:
        raise CheckpointError(f"checkpoint {path}: its 'data' entry lacks {missing}: not a lampseg training "
                              f"checkpoint")
    cfg = config_from_checkpoint(ckpt, changes)
    info = ckpt["data"]
    targets = Targets.from_config({int(k): v for k, v in info["labels"].items()}, cfg.data.regions)
    definition = network_def(cfg, len(info["channels"]), targets.out_channels)
    net = ConfigParser({"network_def": definition}).get_parsed_content("network_def")
    load_weights(net, ckpt["model"], path, cfg.model.name)
    net.eval()
    b = BundleModel(cfg, info, targets, inference_mode(cfg, info))
    return BundleModel(cfg, info, targets, b.mode, _min_multiple(net, b)), net


@torch.no_grad()
def _min_multiple(net: torch.nn.Module, b: BundleModel) -> int:
    """The smallest multiple of the divisor the network runs at (instance norm needs two voxels or more at
    its bottom level)."""
    for multiple in (1, 2, 3, 4):
        size = b.divisor * multiple
        try:
            net(torch.zeros(1, len(b.modalities), size, size, size))
            return multiple
        except (RuntimeError, ValueError):
            continue
    raise CheckpointError(f"the network of model '{b.cfg.model.name}' runs at no size up to {4 * b.divisor}")


def _write_bundle(root: Path, ckpt: dict, ckpt_path: Path, b: BundleModel, net: torch.nn.Module) -> None:
    """Every file of the bundle under ``root`` (the temp folder)."""
    run_dir = ckpt_path.resolve().parent.parent
    summary = _read_summary(run_dir / "summary.json") if ckpt_path.resolve().parent.name == "checkpoints" \
        else None
    trained = training_summary(ckpt, summary)
    versions = {"monai": monai.__version__, "torch": torch.__version__.split("+")[0],
                "numpy": np.__version__, "nibabel": nibabel.__version__, "lampseg": __version__}
    changelog = f"exported by lampseg {__version__} from {ckpt_path.name} (epoch {ckpt.get('epoch')})"
    write_json(root / "configs" / "metadata.json", metadata(b, versions, changelog, trained["dice"]))
    write_json(root / "configs" / "inference.json", inference_config(b))
    atomic_write_bytes(root / "configs" / "logging.conf", LOGGING_CONF.encode())
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    atomic_write(root / "models" / "model.pt", lambda f: torch.save(state, f))
    atomic_write_bytes(root / "models" / "model.ts", _torchscript(net, b))
    atomic_write_bytes(root / "docs" / "README.md", readme(b, trained, ckpt_path.name).encode())
    _umask_modes(root)
    for folder in ("configs", "models", "docs", "."):
        fsync_dir(root / folder)


def _umask_modes(root: Path) -> None:
    """The modes a plain ``mkdir``/``open`` would have given (temp files and folders are private)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _read_summary(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@torch.no_grad()
def _torchscript(net: torch.nn.Module, b: BundleModel) -> bytes:
    """The network as TorchScript (scripted: any valid size), checked against it on a valid input."""
    scripted = torch.jit.script(net)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    data = buffer.getvalue()
    size = b.divisor * b.min_multiple
    x = torch.randn(1, len(b.modalities), size, size + b.divisor, size,
                    generator=torch.Generator().manual_seed(0))
    want, got = net(x), torch.jit.load(io.BytesIO(data))(x)
    error = float((got - want).abs().max()) / max(1.0, float(want.abs().max()))
    if error > TS_TOLERANCE:
        raise LampsegError(f"TorchScript of model '{b.cfg.model.name}' differs from it by {error:.2e} "
                           f"(relative; tolerance {TS_TOLERANCE})")
    return data


def _replace(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` onto ``out`` (the old ``out`` removed only after, under ``overwrite``)."""
    old = None
    if out.exists():
        _check_out(out, overwrite)  # created meanwhile
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        if old is not None:
            os.rename(old, out)  # the old bundle back where it was
        raise
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old)
