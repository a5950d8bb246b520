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
from omegaconf import OmegaConf

from lampseg.commands.predict import run_predict
from lampseg.config import ConfigError
from lampseg.data.msd import load_dataset, read_case
from lampseg.data.prepare import dataset_root
from lampseg.viz import montage, render


def run_visualize(cfg, overrides: list[str], log=print) -> Path:
    """``python -m lampseg visualize``: the montage of one case (``case=NAME``, default the dataset's first)
    at ``slices=[x,y,z]`` (default: through the foreground's centre), with the prediction of
    ``prediction=NIFTI`` or of ``ckpt=PATH`` (a checkpoint or a run directory: its best; predicted here, in
    the original space) when given; writes ``out`` (default ``run_dir/visualize_<case>.png``)."""
    dataset = load_dataset(dataset_root(cfg.data, log))
    cases = {c.name: c for c in dataset.cases + dataset.test}
    name = cfg.case if cfg.case is not None else dataset.cases[0].name
    if name not in cases:
        raise ConfigError(f"config key 'case': {name!r} is not a case of {dataset.root / 'dataset.json'} "
                          f"(e.g. {', '.join(list(cases)[:3])})")
    image, label, _, _ = read_case(cases[name], dataset)
    prediction_path = Path(cfg.prediction) if cfg.prediction else None
    run_dir = Path(cfg.run_dir)
    if prediction_path is None and cfg.ckpt is not None:
        predict = cfg.copy()
        if Path(cfg.ckpt).is_dir():  # a run directory: its best checkpoint
            OmegaConf.update(predict, "ckpt", str(Path(cfg.ckpt) / "checkpoints" / "best.pt"), merge=False)
        OmegaConf.update(predict, "input", str(cases[name].image), merge=False)
        OmegaConf.update(predict, "output", str(run_dir / "prediction"), merge=False)
        prediction_path = run_predict(predict, overrides, log)[0]
    prediction = None
    if prediction_path is not None:
        if not prediction_path.is_file():
            raise ConfigError(f"config key 'prediction': {prediction_path} does not exist")
        prediction = np.asarray(nib.load(str(prediction_path)).dataobj).astype(np.int16)
        if prediction.shape != image.shape[1:]:
            raise ConfigError(f"config key 'prediction': {prediction_path} has shape {prediction.shape}, the "
                              f"image of {name} {image.shape[1:]}")
    values = [v for v in sorted(dataset.labels) if v != 0]
    slices = tuple(cfg.slices) if cfg.slices is not None else None
    if slices is not None and any(v >= n for v, n in zip(slices, image.shape[1:])):
        raise ConfigError(f"config key 'slices': {list(slices)} is outside the image of {name} "
                          f"{list(image.shape[1:])}")
    picture = montage(image, dataset.modalities, label, values, prediction, slices=slices)
    out = Path(cfg.out) if cfg.out else run_dir / f"visualize_{name}.png"
    render(picture, {v: dataset.labels[v] for v in values}, f"{dataset.name}: {name}", out)
    log(f"visualize: {name} ({', '.join(picture.rows)}) -> {out}")
    return out
