"""``python -m lampseg visualize``: a case's modalities in three orientations, its label, and a prediction
(of a checkpoint, predicted here, or a NIfTI) with an error map.

    python -m lampseg visualize                                     # first case of the synthetic dataset
    python -m lampseg visualize data.root=/data/Task01_BrainTumour case=BRATS_001
    python -m lampseg visualize case=BRATS_001 ckpt=RUN/checkpoints/best.pt   # + prediction and errors
    python -m lampseg visualize case=BRATS_001 prediction=PRED/BRATS_001.nii.gz out=case.png
    python -m lampseg visualize case=BRATS_001 ckpt=RUN "slices=[120,120,77]"      # a run dir, chosen planes
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from omegaconf import DictConfig

from lampseg.commands.predict import predict_images
from lampseg.config import ConfigError, changes_from
from lampseg.data.msd import load_dataset, read_case
from lampseg.data.prepare import dataset_root
from lampseg.viz import montage, render


def run_visualize(cfg: DictConfig, overrides: list[str], log=print) -> Path:
    """``visualize [case=NAME] [ckpt=PATH_OR_RUN | prediction=NIFTI] [slices=[x,y,z]] [out=PNG]``:
    ``visualize_case`` on the dataset ``data`` names."""
    a = cfg.visualize
    return visualize_case(cfg.data, Path(cfg.run_dir), a.case, Path(a.ckpt) if a.ckpt else None,
                          Path(a.prediction) if a.prediction else None,
                          tuple(a.slices) if a.slices is not None else None, Path(a.out) if a.out else None,
                          changes_from(cfg, overrides), log)


def visualize_case(data_cfg: DictConfig, run_dir: Path, case: str | None = None, ckpt: Path | None = None,
                   prediction: Path | None = None, slices: tuple[int, int, int] | None = None,
                   out: Path | None = None, changes: dict | None = None, log=print) -> Path:
    """The montage of one case: its modalities in three orientations, its label, and a prediction with an
    error map when there is one.

    Args:
        data_cfg: the ``data`` section (the dataset and its modalities).
        run_dir: where the picture (and a prediction made here) go by default.
        case: the case to draw (default: the dataset's first).
        ckpt: a checkpoint, or a run directory (its best), whose prediction is made here (original space).
        prediction: a label NIfTI to draw instead.
        slices: x, y, z of the planes (default: through the foreground's centre).
        out: the PNG (default ``run_dir/visualize_<case>.png``).
        changes: settings to change in the checkpoint's config when predicting.
        log: where progress lines go.

    Returns:
        The PNG written.
    """
    dataset = load_dataset(dataset_root(data_cfg, log))
    cases = {c.name: c for c in dataset.cases + dataset.test}
    name = case if case is not None else dataset.cases[0].name
    if name not in cases:
        raise ConfigError(f"config key 'case': {name!r} is not a case of {dataset.root / 'dataset.json'} "
                          f"(e.g. {', '.join(list(cases)[:3])})")
    image, label, _, _ = read_case(cases[name], dataset)
    if prediction is None and ckpt is not None:
        if ckpt.is_dir():  # a run directory: its best checkpoint
            ckpt = ckpt / "checkpoints" / "best.pt"
        prediction = predict_images(ckpt, Path(cases[name].image), run_dir / "prediction", changes=changes,
                                    log=log)[0]
    labels = _prediction(prediction, image.shape[1:], name) if prediction is not None else None
    values = [v for v in sorted(dataset.labels) if v != 0]
    if slices is not None and any(v >= n for v, n in zip(slices, image.shape[1:])):
        raise ConfigError(f"config key 'slices': {list(slices)} is outside the image of {name} "
                          f"{list(image.shape[1:])}")
    picture = montage(image, dataset.modalities, label, values, labels, slices=slices)
    out = out or run_dir / f"visualize_{name}.png"
    render(picture, {v: dataset.labels[v] for v in values}, f"{dataset.name}: {name}", out)
    log(f"visualize: {name} ({', '.join(picture.rows)}) -> {out}")
    return out


def _prediction(path: Path, shape: tuple[int, ...], name: str) -> np.ndarray:
    """The label NIfTI at ``path``, checked against the image's shape."""
    if not path.is_file():
        raise ConfigError(f"config key 'prediction': {path} does not exist")
    labels = np.asarray(nib.load(str(path)).dataobj).astype(np.int16)
    if labels.shape != tuple(shape):
        raise ConfigError(f"config key 'prediction': {path} has shape {labels.shape}, the image of {name} "
                          f"{tuple(shape)}")
    return labels
