"""The subcommands' own arguments, each in its section of the config (``evaluate.ckpt``, ``predict.input``,
...). On the command line a subcommand's arguments may be written without their section
(``SHORT_ARGUMENTS``): ``python -m lampseg evaluate ckpt=PATH`` is ``evaluate.ckpt=PATH``.
"""
from __future__ import annotations

from dataclasses import dataclass

from lampseg.config.choice import Choice


class Split(Choice):
    val = "val"
    train = "train"
    all = "all"



@dataclass
class EvaluateArgs:
    """``python -m lampseg evaluate ckpt=PATH [split=val|train|all]``."""

    ckpt: str | None = None  # the checkpoint to evaluate
    split: Split = Split.val  # the checkpoint's validation fold, its training fold, or every case


@dataclass
class PredictArgs:
    """``python -m lampseg predict ckpt=PATH input=FILE_DIR_OR_LIST output=DIR [overwrite=true]
    [progress=false]``."""

    ckpt: str | None = None  # the checkpoint to segment with
    input: str | None = None  # a NIfTI image, a folder of them, a .txt list or a dataset.json (its "test")
    output: str | None = None  # the folder the label NIfTIs (and predictions.csv) go to
    overwrite: bool = False  # redo inputs whose prediction is already in output (default: skip them)
    progress: bool = True  # a bar over cases on stderr when it is a terminal (rank 0)


@dataclass
class VisualizeArgs:
    """``python -m lampseg visualize [case=NAME] [ckpt=PATH_OR_RUN | prediction=NIFTI] [slices=[x,y,z]]
    [out=PNG]``."""

    case: str | None = None  # the case to draw (default: the dataset's first)
    ckpt: str | None = None  # a checkpoint or a run directory (its best) whose prediction is drawn
    prediction: str | None = None  # a label NIfTI to draw over the case
    slices: list[int] | None = None  # x, y, z of the planes (default: the foreground's centre)
    out: str | None = None  # the PNG (default: run_dir/visualize_<case>.png)


@dataclass
class ExportArgs:
    """``python -m lampseg export ckpt=PATH out=DIR [overwrite=true]``: a checkpoint as a MONAI bundle."""

    ckpt: str | None = None  # the checkpoint to export
    out: str | None = None  # the bundle's folder (must not exist unless overwrite)
    overwrite: bool = False  # replace an existing out (once the new bundle is complete)


@dataclass
class SynthArgs:
    """``python -m lampseg synth [out=PATH]`` (the dataset's size and seed: ``data.synthetic.*``)."""

    out: str | None = None  # where the dataset goes (default: where data.root=null trains from)


# A subcommand's own arguments may be written without their section: `evaluate ckpt=PATH` is
# `evaluate evaluate.ckpt=PATH` (config.loading.qualify). Every other key keeps its section.
SHORT_ARGUMENTS = {
    "evaluate": ("ckpt", "split"),
    "predict": ("ckpt", "input", "output", "overwrite", "progress"),
    "visualize": ("case", "ckpt", "prediction", "slices", "out"),
    "synth": ("out",),
    "export": ("ckpt", "out", "overwrite"),
    "bench": ("ckpt",),
}
