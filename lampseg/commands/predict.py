"""``python -m lampseg predict ckpt=PATH input=FILE_DIR_OR_LIST output=DIR``: label NIfTIs in each input's
original space (preprocessing undone, the input's affine and header kept); resumable over many cases, with
a progress bar, a row per case in ``output/predictions.csv`` and a summary line.

    python -m lampseg predict ckpt=outputs/run/checkpoints/best.pt input=imagesTs output=preds
    python -m lampseg predict ckpt=outputs/run/checkpoints/best.pt input=Task01/dataset.json output=preds
"""
from __future__ import annotations

import gzip
import io
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from omegaconf import DictConfig

from lampseg.commands.predict_cases import CaseProgress, CaseTable, case_inputs, case_row, summary_line
from lampseg.commands.segment import segment_image
from lampseg.config import ConfigError, changes_from
from lampseg.engine.checkpoint import load_checkpoint
from lampseg.engine.evaluate import config_from_checkpoint, load_model, roi_size
from lampseg.io import atomic_write_bytes
from lampseg.planner.inference import inference_memory
from lampseg.runtime import distributed
from lampseg.runtime.memory import CasePeakMemory


def run_predict(cfg: DictConfig, overrides: list[str], log=print) -> list[Path]:
    """``predict ckpt=PATH input=FILE_DIR_OR_LIST output=DIR [overwrite=true] [progress=false]``:
    ``predict_images`` with the settings the command line changed applied to the checkpoint's config."""
    args = cfg.predict
    for key in ("ckpt", "input", "output"):
        if args[key] is None:
            raise ConfigError(f"config key 'predict.{key}': expected a path ({key}=PATH), got None")
    return predict_images(Path(args.ckpt), Path(args.input), Path(args.output), args.overwrite,
                          changes_from(cfg, overrides), log, args.progress)


def predict_images(ckpt_path: Path, inputs: Path, output: Path, overwrite: bool = False,
                   changes: dict | None = None, log=print, progress: bool = True) -> list[Path]:
    """Label NIfTIs of ``inputs`` in each input's original space (preprocessing undone, the input's affine and
    header kept), resumable: an input whose prediction exists is skipped unless ``overwrite``. Each case's
    file, seconds, inference mode, input shape and peak memory go to ``output/predictions.csv``
    (``predict_cases.CaseTable``, rewritten after each case), and a summary line closes the run.

    Args:
        ckpt_path: the checkpoint.
        inputs: a NIfTI image, a folder of them, or a list of them (``predict_cases.case_inputs``).
        output: the folder the predictions go to (same file names).
        overwrite: redo inputs whose prediction is already in ``output``.
        changes: settings to change in the checkpoint's config (``inference.mode``, ``parallel``, ...).
        log: where progress lines go (rank 0's).
        progress: a bar over cases on stderr (rank 0's, when stderr is a terminal).

    Returns:
        The prediction of every input this replica was given (written now or before).
    """
    paths = case_inputs(inputs)  # before the model: a bad input fails at once
    ckpt = load_checkpoint(ckpt_path)
    cfg = config_from_checkpoint(ckpt, changes)
    model, targets, device, dims = load_model(ckpt, cfg, ckpt_path)
    # Under torchrun each data-parallel replica segments every dp-th image; the first stage (first slab) of
    # each replica writes its images (rank 0's replica logs, and writes predictions.csv with every replica's
    # rows).
    writer = dims.mesh is None or dims.mesh.get_local_rank("pp") == dims.mesh.get_local_rank("sp") == 0
    main = distributed.is_main()
    log = log if main else (lambda *_: None)
    info, out_dir = ckpt["data"], output
    out_dir.mkdir(parents=True, exist_ok=True)
    memory = inference_memory(cfg, len(info["channels"]), targets.out_channels, device)
    table = CaseTable(out_dir, paths, write=main)
    shard = paths[dims.dp_rank::dims.dp]
    bar = CaseProgress(len(shard), progress and main)
    written, rows, begin = [], [], time.perf_counter()
    for path in shard:
        start = time.perf_counter()
        target = out_dir / path.name
        if target.exists() and not overwrite:  # written atomically: present means finished
            row = table.skipped(path, target)
        else:
            with CasePeakMemory(device) as peak:
                seg, img, report = segment_image(path, model, targets, device, cfg, info, memory)
            if writer:
                atomic_write_bytes(target, _nifti_bytes(_label_image(seg, img), target.name))
            row = case_row(path, target, time.perf_counter() - start, report, img.shape, peak.report(),
                           roi_size(cfg, info["patch_size"]))
            window = f" {report['window']}" if report.get("window") else ""
            bar.log(log, f"{path.name}: {row['seconds']:.2f} s ({report['mode']}{window}) -> {target}")
        written.append(target)
        rows.append(row)
        table.update([row])
        bar.update()
    bar.close()
    rows = dims.dp_gather(rows)  # every replica's rows, on every rank of the replica group
    table.update(rows)
    skipped = sum(row["status"] == "skipped" for row in rows)
    if skipped:
        log(f"skipped {skipped} input(s) whose prediction was already in {out_dir} "
            f"(overwrite=true redoes them)")
    log(summary_line(rows, time.perf_counter() - begin, table.path))
    return written


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
