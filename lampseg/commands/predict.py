"""``python -m lampseg predict ckpt=PATH input=FILE_OR_DIR output=DIR``: label NIfTIs in each input's original
space (preprocessing undone, the input's affine and header kept); resumable over a folder.

    python -m lampseg predict ckpt=outputs/run/checkpoints/best.pt input=imagesTs output=preds
"""
from __future__ import annotations

import gzip
import io
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from omegaconf import DictConfig

from lampseg.config import ConfigError, changes_from, enum_value
from lampseg.data.cache import preprocess_array, restore_array
from lampseg.data.msd import check_finite, read_image
from lampseg.data.prepare import preprocess_config
from lampseg.engine.checkpoint import load_checkpoint
from lampseg.engine.evaluate import config_from_checkpoint, load_model, roi_size
from lampseg.engine.inference import infer
from lampseg.io import atomic_write_bytes
from lampseg.model.unet import size_divisor
from lampseg.planner.inference import inference_memory
from lampseg.runtime import distributed


def _nifti_inputs(path: Path) -> list[Path]:
    if path.is_dir():
        # Hidden files are skipped: MSD's archives carry macOS "._BRATS_001.nii.gz" resource forks.
        files = sorted(p for p in path.iterdir()
                       if p.name.endswith((".nii.gz", ".nii")) and not p.name.startswith("."))
        if not files:
            raise ConfigError(f"config key 'input': no .nii/.nii.gz files in {path}")
        return files
    if not path.is_file():
        raise ConfigError(f"config key 'input': {path} does not exist")
    return [path]


def run_predict(cfg: DictConfig, overrides: list[str], log=print) -> list[Path]:
    """``predict ckpt=PATH input=FILE_OR_DIR output=DIR [overwrite=true]``: ``predict_images`` with the
    settings the command line changed applied to the checkpoint's config."""
    args = cfg.predict
    for key in ("ckpt", "input", "output"):
        if args[key] is None:
            raise ConfigError(f"config key '{key}': expected a path ({key}=PATH), got None")
    return predict_images(Path(args.ckpt), Path(args.input), Path(args.output), args.overwrite,
                          changes_from(cfg, overrides), log)


def predict_images(ckpt_path: Path, inputs: Path, output: Path, overwrite: bool = False,
                   changes: dict | None = None, log=print) -> list[Path]:
    """Label NIfTIs of ``inputs`` in each input's original space (preprocessing undone, the input's affine and
    header kept), resumable: an input whose prediction exists is skipped unless ``overwrite``.

    Args:
        ckpt_path: the checkpoint.
        inputs: a NIfTI image, or a folder of them.
        output: the folder the predictions go to (same file names).
        overwrite: redo inputs whose prediction is already in ``output``.
        changes: settings to change in the checkpoint's config (``inference.mode``, ``parallel``, ...).
        log: where progress lines go (rank 0's).

    Returns:
        The prediction of every input (written now or before).
    """
    ckpt = load_checkpoint(ckpt_path)
    cfg = config_from_checkpoint(ckpt, changes)
    model, targets, device, dims = load_model(ckpt, cfg)
    # Under torchrun each data-parallel replica segments every dp-th image; the first stage (first slab) of
    # each replica writes its images (rank 0's replica logs).
    writer = dims.mesh is None or dims.mesh.get_local_rank("pp") == dims.mesh.get_local_rank("sp") == 0
    log = log if distributed.is_main() else (lambda *_: None)
    info, out_dir = ckpt["data"], output
    out_dir.mkdir(parents=True, exist_ok=True)
    memory = inference_memory(cfg, len(info["channels"]), targets.out_channels, device)
    written, skipped = [], 0
    for path in _nifti_inputs(inputs)[dims.dp_rank::dims.dp]:
        start = time.perf_counter()
        target = out_dir / path.name
        if target.exists() and not overwrite:  # written atomically: present means finished
            written.append(target)
            skipped += 1
            continue
        seg, img, report = _segment(path, model, targets, device, cfg, info, memory)
        if writer:
            atomic_write_bytes(target, _nifti_bytes(_label_image(seg, img), target.name))
        written.append(target)
        window = f" {report['window']}" if report.get("window") else ""
        log(f"{path.name}: {time.perf_counter() - start:.2f} s ({report['mode']}{window}) -> {target}")
    if skipped:
        log(f"skipped {skipped} input(s) whose prediction was already in {out_dir} "
            f"(overwrite=true redoes them)")
    return written


def _segment(path: Path, model, targets, device: torch.device, cfg: DictConfig, info: dict, memory
             ) -> tuple[np.ndarray, nib.Nifti1Image, dict]:
    """One image's labels in its original space, the image it was read from, and how inference ran."""
    image, img = read_image(path, len(info["modalities"]))
    image = check_finite(image, path, cfg.data.nonfinite)
    spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
    pre, _, meta = preprocess_array(image[info["channels"]], None, spacing, preprocess_config(cfg.data))
    report = {"mode": enum_value(cfg.inference.mode)}
    logits = infer(model, torch.from_numpy(pre)[None].to(device), cfg.inference,
                   roi_size(cfg, info["patch_size"]), size_divisor(cfg.model), cfg.trainer.precision,
                   memory, report)
    restored = restore_array(logits[0].cpu().numpy(), meta, targets.background_logits())
    seg = targets.labels_from_logits(torch.from_numpy(restored)[None])[0].numpy().astype(np.uint8)
    return seg, img, report


def _label_image(seg: np.ndarray, img: nib.Nifti1Image) -> nib.Nifti1Image:
    """``seg`` as a uint8 NIfTI with the input's affine and header."""
    header = img.header.copy()
    header.set_data_dtype(np.uint8)
    if len(header.get_data_shape()) == 4:
        header.set_data_shape(seg.shape)
    return nib.Nifti1Image(seg, img.affine, header)


def _nifti_bytes(image: nib.Nifti1Image, name: str) -> bytes:
    """Serialise a NIfTI image (gzipped when ``name`` ends in .gz) so it can be written atomically."""
    buffer = io.BytesIO()
    file_map = nib.Nifti1Image.make_file_map({"image": buffer, "header": buffer})
    image.to_file_map(file_map)
    data = buffer.getvalue()
    return gzip.compress(data, compresslevel=1) if name.endswith(".gz") else data
