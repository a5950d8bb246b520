"""The cases of ``predict``: the images its ``input`` names (a NIfTI, a folder of them, a ``.txt`` list or a
``dataset.json``-style JSON list), the table of what happened to each (``predictions.csv`` in the output
folder), the progress bar over cases and the closing summary line.

    case,input,output,status,seconds,mode,window,input_shape,process_peak_rss_mb
    case_003,/data/imagesTs/case_003.nii.gz,preds/case_003.nii.gz,written,0.412,whole,,32x32x32x4,801.3
"""
from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from lampseg.config import ConfigError
from lampseg.io import atomic_write_csv

CSV_NAME = "predictions.csv"
COLUMNS = ["case", "input", "output", "status", "seconds", "mode", "window", "input_shape"]
PEAK_COLUMNS = ("peak_memory_mb", "process_peak_rss_mb")  # CasePeakMemory.report(): CUDA's, or the CPU's
NIFTI = (".nii.gz", ".nii")
LIST_FILES = "a .nii/.nii.gz image, a folder of them, a .txt list of them or a dataset.json-style .json list"


def _error(path: Path, text: str) -> ConfigError:
    return ConfigError(f"config key 'predict.input': {path}: {text}")


def case_inputs(path: Path) -> list[Path]:
    """The images ``path`` names: itself (a NIfTI), a folder's NIfTIs (sorted; hidden files skipped), or
    the images a list file names (in its order; relative paths are relative to the list's folder).

    A list is a ``.txt`` file of one path per line (blank lines and ``#`` comments skipped) or a ``.json``
    file: MSD's ``dataset.json`` (its ``"test"`` list) or a bare list, of paths or ``{"image": path}``.

    Raises:
        ConfigError: naming ``predict.input`` and the file: it does not exist, is not readable, is of another
            kind, or lists nothing, a missing image, or two images of the same file name (one output).
    """
    path = path.expanduser()
    if path.is_dir():
        # Hidden files are skipped: MSD's archives carry macOS "._BRATS_001.nii.gz" resource forks.
        try:
            files = sorted(p for p in path.iterdir() if p.name.endswith(NIFTI) and not p.name.startswith("."))
        except OSError as err:
            raise _error(path, f"cannot list the folder ({err})") from None
        if not files:
            raise _error(path, "no .nii/.nii.gz files in this folder")
        return files
    if not path.is_file():
        raise _error(path, f"does not exist (expected {LIST_FILES})")
    if path.name.endswith(NIFTI):
        return [path]
    if path.suffix.lower() not in (".txt", ".json"):
        raise _error(path, f"expected {LIST_FILES}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise _error(path, f"cannot read the list ({err})") from None
    listed = _json_list(path, text) if path.suffix.lower() == ".json" else _text_list(text)
    if not listed:
        raise _error(path, "the list names no image")
    return _checked(path, [path.parent / Path(p).expanduser() for p in listed])


def _text_list(text: str) -> list[str]:
    """A ``.txt`` list's paths: one per line, blank lines and ``#`` comments skipped."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def _json_list(path: Path, text: str) -> list[str]:
    """A ``.json`` list's paths: a bare list, or a ``dataset.json``'s ``"test"`` list, of paths or
    ``{"image": path}`` entries (MSD's ``"./imagesTs/x.nii.gz"``)."""
    try:
        data = json.loads(text)
    except ValueError as err:
        raise _error(path, f"not valid JSON ({err})") from None
    if isinstance(data, dict):
        if "test" not in data:
            raise _error(path, "a JSON object without a 'test' list (expected MSD's dataset.json or a list)")
        data = data["test"]
    if not isinstance(data, list):
        raise _error(path, f"expected a list of image paths, got {type(data).__name__}")
    listed = []
    for i, entry in enumerate(data):
        image = entry.get("image") if isinstance(entry, dict) else entry
        if not isinstance(image, str) or not image.strip():
            raise _error(path, f"entry {i} is not an image path or {{'image': path}}: {entry!r}")
        listed.append(image.strip())
    return listed


def _checked(path: Path, files: list[Path]) -> list[Path]:
    """``files`` of the list ``path``, each an existing NIfTI, no two of the same name (the output's)."""
    missing = [str(f) for f in files if not _is_file(f)]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise _error(path, f"{len(missing)} listed image(s) do not exist: {', '.join(missing[:3])}{more}")
    other = [str(f) for f in files if not f.name.endswith(NIFTI)]
    if other:
        raise _error(path, f"listed files that are not .nii/.nii.gz images: {', '.join(other[:3])}")
    seen: dict[str, Path] = {}
    for f in files:
        if f.name in seen:
            raise _error(path, f"{seen[f.name]} and {f} would both be predicted to {f.name}")
        seen[f.name] = f
    return files


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte ...
        return False


def case_name(path: Path) -> str:
    """An image's case: its file name without ``.nii.gz``/``.nii``."""
    return next(path.name[: -len(s)] for s in (*NIFTI, "") if path.name.endswith(s))


def case_row(path: Path, target: Path, seconds: float, report: dict, shape: tuple[int, ...], peak: dict,
             roi: list[int]) -> dict:
    """The ``predictions.csv`` row of an image predicted now (``report``: how inference ran; ``peak``:
    ``CasePeakMemory.report()``; ``roi``: the sliding window of ``inference.mode=sliding``, which ``auto``'s
    report names itself)."""
    window = report.get("window") or (roi if report.get("mode") == "sliding" else None)
    return {"case": case_name(path), "input": str(path), "output": str(target), "status": "written",
            "seconds": round(seconds, 3), "mode": report.get("mode"),
            "window": "x".join(map(str, window)) if window else "",
            "input_shape": "x".join(map(str, shape)), **peak}


class CaseTable:
    """``predictions.csv`` of an output folder: a row per prediction in it, this run's cases first (in input
    order), written atomically (only where ``write``, rank 0). It starts from the previous file's rows
    whose prediction is still there, so an interrupted run keeps the rows of its finished cases, a skipped
    case keeps its old timings, and cases an earlier run predicted into the same folder keep theirs."""

    def __init__(self, out_dir: Path, inputs: list[Path], write: bool) -> None:
        self.path, self.write = out_dir / CSV_NAME, write
        self.order = {out_dir / p.name: k for k, p in enumerate(inputs)}
        self.rows: dict[Path, dict] = {}
        for row in self._previous():
            name = Path(row.get("output") or "").name
            if name.endswith(NIFTI) and (out_dir / name).is_file():
                self.rows[out_dir / name] = row
                self.order.setdefault(out_dir / name, len(inputs) + len(self.rows))  # after this run's

    def _previous(self) -> list[dict]:
        try:
            with open(self.path, newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
        except (OSError, UnicodeDecodeError, csv.Error):
            return []

    def skipped(self, path: Path, target: Path) -> dict:
        """The row of an image whose prediction was already there: its previous row (timings kept), if
        any, with status ``skipped``."""
        row = {k: v for k, v in self.rows.get(target, {}).items() if k is not None}
        return {**row, "case": case_name(path), "input": str(path), "output": str(target),
                "status": "skipped"}

    def update(self, rows: list[dict]) -> None:
        """Put ``rows`` in (replacing their cases' previous rows) and rewrite the file."""
        for row in rows:
            self.rows[Path(row["output"])] = row
        if self.write:
            ordered = [self.rows[t] for t in sorted(self.rows, key=lambda t: self.order[t])]
            present = {k for row in ordered for k in row}
            atomic_write_csv(self.path, ordered, COLUMNS + [k for k in PEAK_COLUMNS if k in present])


class CaseProgress:
    """A tqdm bar over cases (cases/s, ETA) on stderr when ``enabled`` and stderr is a terminal; a line
    logged while it shows is written above it."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = tqdm(total=total, desc="predict", unit="case", file=sys.stderr, dynamic_ncols=True,
                        disable=None if enabled else True)  # None: tqdm's own choice, off unless a TTY

    def log(self, log: Callable[[str], object], line: str) -> None:
        with tqdm.external_write_mode(file=sys.stderr):
            log(line)

    def update(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def summary_line(rows: list[dict], seconds: float, csv_path: Path) -> str:
    """``N case(s) predicted in T s (R cases/s), peak memory M MB -> predictions.csv`` (``N case(s): W
    predicted, S skipped in ...`` on a resume), over every replica's rows; the rate counts predicted cases."""
    done = [r for r in rows if r.get("status") == "written"]
    peaks = [(float(r[k]), k) for r in done for k in PEAK_COLUMNS if r.get(k) not in (None, "")]
    peak = max(peaks, default=None)
    memory = "" if peak is None else (f", peak memory {peak[0]:.1f} MB"
                                      + (" (process peak RSS)" if peak[1] == "process_peak_rss_mb" else ""))
    rate = len(done) / seconds if seconds > 0 else 0.0
    skipped = len(rows) - len(done)
    counts = f": {len(done)} predicted, {skipped} skipped" if skipped else " predicted"
    return f"{len(rows)} case(s){counts} in {seconds:.2f} s ({rate:.2f} cases/s){memory} -> {csv_path}"
