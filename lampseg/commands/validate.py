"""``python -m lampseg validate data.root=PATH``: read a whole dataset and list every problem at once;
writes ``validate.json``."""
from __future__ import annotations

from pathlib import Path

from lampseg.config import patch_size_of
from lampseg.data.check import DatasetReport, check_dataset
from lampseg.data.msd import DataError
from lampseg.data.prepare import dataset_root, preprocess_config
from lampseg.io import write_json


def run_validate(cfg, log=print) -> DatasetReport:
    """``validate``: check the dataset ``data.root`` names (the synthetic one when null) and print every
    problem; writes ``RUN_DIR/validate.json``.

    Raises:
        DataError: when there is at least one error (after printing them all).
    """
    root = dataset_root(cfg.data, log)
    report = check_dataset(root, patch_size_of(cfg), preprocess_config(cfg.data))
    for level, messages in (("error", report.errors), ("warning", report.warnings)):
        for message in messages:
            log(f"{level}: {message}")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "validate.json", report.to_dict())
    summary = (f"{report.root}: {report.cases} training case(s) and {report.test_images} test image(s) "
               f"checked: {len(report.errors)} error(s), {len(report.warnings)} warning(s)")
    if report.errors:
        raise DataError(summary + " (listed above)")
    log(summary)
    return report
