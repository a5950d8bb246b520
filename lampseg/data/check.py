"""Check a whole MSD dataset and report every problem at once (``python -m lampseg validate``).

    python -m lampseg validate data.root=/data/Task01_BrainTumour data.patch_size=[128,128,128]

Training stops at the first bad case (with the same message); ``validate`` reads every listed file,
runs the preprocessing the cache would run, and lists all errors (training would fail on them) and
warnings (training works, but probably not as intended) before exiting non-zero if there was an error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lampseg.data.cache import PreprocessConfig, preprocess_array
from lampseg.data.msd import DataError, MSDDataset, check_finite, load_dataset, read_case, read_image


@dataclass
class DatasetReport:
    """What ``check_dataset`` found.

    Attributes:
        root: the dataset directory.
        cases: training cases read (including those with errors).
        test_images: test images read.
        errors: one message per problem that stops training (each names its file).
        warnings: one message per suspicious finding that training tolerates.
    """

    root: Path
    cases: int = 0
    test_images: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"root": str(self.root), "cases": self.cases, "test_images": self.test_images,
                "errors": self.errors, "warnings": self.warnings}


def _case_warnings(name: str, path: Path, image: np.ndarray, label: np.ndarray, modalities: list[str],
                   patch_size: list[int] | None, cfg: PreprocessConfig, spacing) -> list[str]:
    """Findings in a case that reads cleanly: empty foreground, blank modalities, smaller than the patch."""
    found = []
    if not label.any():
        found.append(f"{path}: case {name!r} has no foreground voxels (only background); the sampler draws "
                     f"random patches from it and its Dice is undefined")
    for c, modality in enumerate(modalities):
        if float(image[c].min()) == float(image[c].max()):
            found.append(f"{path}: modality {modality!r} (channel {c}) of case {name!r} is constant "
                         f"({float(image[c].min()):g}): no information")
    if patch_size is not None:
        pre, _, _ = preprocess_array(image, label, spacing, cfg)
        shape = list(pre.shape[1:])
        if any(s < p for s, p in zip(shape, patch_size)):
            found.append(f"{path}: case {name!r} is {shape} after preprocessing, smaller than "
                         f"data.patch_size {list(patch_size)}: its patches are zero-padded")
    return found


def check_dataset(root: str | Path, patch_size: list[int] | None = None,
                  preprocess: PreprocessConfig | None = None) -> DatasetReport:
    """Read every file of an MSD dataset and collect every problem instead of stopping at the first.

    Args:
        root: the dataset directory (holding ``dataset.json``).
        patch_size: the training patch size, to warn about cases smaller than it; None for whole volumes.
        preprocess: the preprocessing training would apply (spacing, ``nonfinite`` policy).

    Returns:
        The report; ``errors`` is empty when training can use every case.
    """
    cfg = preprocess or PreprocessConfig()
    report = DatasetReport(Path(root).expanduser().resolve())
    missing: list[DataError] = []
    try:
        dataset: MSDDataset = load_dataset(report.root, missing)
    except DataError as e:  # dataset.json itself is unusable: nothing else can be checked
        report.errors.append(str(e))
        return report
    report.errors += [str(e) for e in missing]
    for case in dataset.cases:
        report.cases += 1
        try:
            image, label, _, spacing = read_case(case, dataset, cfg.nonfinite, warn=report.warnings.append)
        except DataError as e:
            report.errors.append(str(e))
            continue
        report.warnings += _case_warnings(case.name, case.image, image, label, dataset.modalities,
                                          patch_size, cfg, spacing)
    for case in dataset.test:
        report.test_images += 1
        try:
            image, _ = read_image(case.image, len(dataset.modalities))
            check_finite(image, case.image, cfg.nonfinite, warn=report.warnings.append)
        except DataError as e:
            report.errors.append(str(e))
    return report
