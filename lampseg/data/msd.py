"""Read and validate Medical Segmentation Decathlon (MSD) format datasets.

An MSD dataset is a directory holding ``dataset.json`` (modalities, label names, training and test
file lists, paths relative to the directory) plus the listed NIfTI files. Images are 4D
``(X, Y, Z, C)`` or 3D ``(X, Y, Z)`` when there is a single modality; labels are 3D integer volumes.
Every name (dataset, modalities, labels, files) comes from ``dataset.json``.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from lampseg.errors import LampsegError

AFFINE_TOLERANCE = 1e-3
MAX_LABEL = 255  # labels are stored as uint8
NONFINITE_POLICIES = ("error", "zero")  # data.nonfinite: what NaN/Inf image voxels do


class DataError(LampsegError, ValueError):
    """Bad dataset input; the message names the file and what was expected."""


@dataclass(frozen=True)
class Case:
    """One image (and, for training cases, its label).

    Attributes:
        name: File stem without ``.nii.gz``/``.nii``, e.g. ``"BRATS_001"``.
        image: Absolute path of the image file.
        label: Absolute path of the label file, or None for test images.
    """

    name: str
    image: Path
    label: Path | None


@dataclass(frozen=True)
class MSDDataset:
    """A parsed and validated MSD dataset.

    Attributes:
        root: Dataset directory (the one holding ``dataset.json``).
        name: ``dataset.json`` ``"name"``, or the directory name when absent.
        modalities: Modality names ordered by their integer keys (= channel index).
        labels: Label value -> name, ordered by value; includes 0 (background).
        cases: Training cases (with labels).
        test: Test images (``label`` is None).
    """

    root: Path
    name: str
    modalities: list[str]
    labels: dict[int, str]
    cases: list[Case]
    test: list[Case]

    def modality_indices(self, selection: list[str | int] | None) -> list[int]:
        """Resolve modality names (case-insensitive) or channel indices to channel indices.

        Args:
            selection: Names and/or indices; None selects all modalities in order.

        Returns:
            Channel indices in the order given.

        Raises:
            DataError: Unknown or ambiguous name, out-of-range index, duplicate or empty selection;
                the message lists the available modalities.
        """
        if selection is None:
            return list(range(len(self.modalities)))
        available = ", ".join(f"{i}={m!r}" for i, m in enumerate(self.modalities))
        lower = [m.lower() for m in self.modalities]
        out: list[int] = []
        for item in selection:
            if isinstance(item, str) and lower.count(item.lower()) == 1:
                index = lower.index(item.lower())
            elif isinstance(item, str) and lower.count(item.lower()) > 1:
                raise DataError(f"{self.root / 'dataset.json'}: modality name {item!r} is ambiguous; "
                                f"available modalities: {available}")
            elif (isinstance(item, (int, np.integer)) and not isinstance(item, bool)) or (
                isinstance(item, str) and item.strip().isdigit()
            ):
                index = int(item)
                if not 0 <= index < len(self.modalities):
                    raise DataError(f"{self.root / 'dataset.json'}: modality index {index} out of range; "
                                    f"available modalities: {available}")
            else:
                raise DataError(f"{self.root / 'dataset.json'}: unknown modality {item!r}; "
                                f"available modalities: {available}")
            if index in out:
                raise DataError(f"modality {item!r} selected twice; available modalities: {available}")
            out.append(index)
        if not out:
            raise DataError(f"empty modality selection; available modalities: {available}")
        return out


def _case_name(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _int_keyed(value: Any, field: str, where: Path) -> dict[int, str]:
    if not isinstance(value, dict) or not value:
        raise DataError(f"{where}: {field!r} must be a non-empty object {{'0': name, ...}}, got {value!r}")
    out: dict[int, str] = {}
    for key, name in value.items():
        try:
            index = int(str(key).strip())
        except ValueError:
            raise DataError(f"{where}: {field!r} key {key!r} is not an integer") from None
        if index in out:
            raise DataError(f"{where}: {field!r} key {index} appears twice")
        if not isinstance(name, str) or not name:
            raise DataError(f"{where}: {field!r}[{key!r}] must be a non-empty string, got {name!r}")
        out[index] = name
    return dict(sorted(out.items()))


def _resolve(root: Path, rel: Any, where: Path, what: str, missing: list[DataError] | None = None
             ) -> Path | None:
    if not isinstance(rel, str) or not rel.strip():
        raise DataError(f"{where}: {what} path must be a non-empty string, got {rel!r}")
    path = root / rel.strip()  # not resolve(): a symlinked file keeps its listed name
    try:
        exists = path.is_file()
    except (OSError, ValueError) as err:  # a name too long for the file system, a NUL byte ...
        raise DataError(f"{where}: listed {what} path {rel!r} is not a usable file name ({err})") from None
    if not exists:
        error = DataError(f"{where}: listed {what} file {path} does not exist")
        if missing is None:
            raise error
        missing.append(error)
        return None
    return path


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DataError(f"duplicate key {key!r}")
        out[key] = value
    return out


def load_dataset(root: str | Path, missing: list[DataError] | None = None) -> MSDDataset:
    """Parse and validate ``root/dataset.json`` and check that every listed file exists.

    Args:
        root: Dataset directory.
        missing: when given, a listed file that does not exist is appended here (and its case left out)
            instead of raised, so that ``lampseg validate`` reports every problem at once.

    Returns:
        The parsed dataset (image data is not read).

    Raises:
        DataError: Missing or malformed ``dataset.json`` (bad JSON, duplicate keys, non-integer label or
            modality keys, non-contiguous modality keys, missing label 0, empty/duplicate training
            entries) or a missing listed file; the message names ``dataset.json`` or the file.
    """
    root = Path(root).expanduser().resolve()
    where = root / "dataset.json"
    meta = _read_json(where)
    modality = _int_keyed(meta["modality"], "modality", where)
    if list(modality) != list(range(len(modality))):
        raise DataError(f"{where}: 'modality' keys must be 0..{len(modality) - 1}, got {list(modality)}")
    labels = _int_keyed(meta["labels"], "labels", where)
    if 0 not in labels:
        raise DataError(f"{where}: 'labels' must declare 0 (background), got {list(labels)}")
    if min(labels) < 0 or max(labels) > MAX_LABEL:
        raise DataError(f"{where}: label values must be in 0..{MAX_LABEL}, got {list(labels)}")
    cases, test = _cases(root, meta, where, missing)
    name = meta.get("name")
    name = name.strip() if isinstance(name, str) and name.strip() else root.name
    return MSDDataset(root, name, list(modality.values()), labels, cases, test)


def _read_json(where: Path) -> dict:
    """``dataset.json`` parsed: a JSON object without duplicate keys, holding every required key."""
    if not where.is_file():
        raise DataError(f"{where}: dataset.json not found (expected an MSD dataset directory)")
    try:
        meta = json.loads(where.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicate_keys)
    except DataError as err:
        raise DataError(f"{where}: {err}") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise DataError(f"{where}: not valid JSON ({err})") from err
    if not isinstance(meta, dict):
        raise DataError(f"{where}: expected a JSON object at top level")
    for key in ("modality", "labels", "training"):
        if key not in meta:
            raise DataError(f"{where}: missing required key {key!r}")
    return meta


def _cases(root: Path, meta: dict, where: Path,
           missing: list[DataError] | None) -> tuple[list[Case], list[Case]]:
    """The training cases and test images ``meta`` lists (each name once per group; files that do not
    exist raised, or appended to ``missing`` and left out)."""
    training = meta["training"]
    if not isinstance(training, list) or not training:
        raise DataError(f"{where}: 'training' must be a non-empty list of {{'image', 'label'}} entries")
    cases: list[Case] = []
    for i, entry in enumerate(training):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise DataError(f"{where}: training[{i}] must be {{'image': ..., 'label': ...}}, got {entry!r}")
        image = _resolve(root, entry["image"], where, "image", missing)
        label = _resolve(root, entry["label"], where, "label", missing)
        if image is not None and label is not None:
            cases.append(Case(_case_name(image), image, label))
    test: list[Case] = []
    raw_test = meta.get("test") or []
    if not isinstance(raw_test, list):
        raise DataError(f"{where}: 'test' must be a list, got {type(raw_test).__name__}")
    for i, entry in enumerate(raw_test):
        if isinstance(entry, dict):
            if "image" not in entry:
                raise DataError(f"{where}: test[{i}] has no 'image' key: {entry!r}")
            entry = entry["image"]
        image = _resolve(root, entry, where, "test image", missing)
        if image is not None:
            test.append(Case(_case_name(image), image, None))
    for group, what in ((cases, "training"), (test, "test")):
        seen: set[str] = set()
        for case in group:
            if case.name in seen:
                raise DataError(f"{where}: duplicate {what} case {case.name!r} ({case.image})")
            seen.add(case.name)
    return cases, test


def _load(path: Path) -> nib.Nifti1Image:
    try:
        img = nib.load(str(path))
    except Exception as err:
        raise DataError(f"{path}: cannot read NIfTI file ({type(err).__name__}: {err})") from err
    if not isinstance(img, nib.Nifti1Image):
        raise DataError(f"{path}: expected a NIfTI image, got {type(img).__name__}")
    return img


GZIP_MAX_RATIO = 1100  # deflate expands at most ~1032x: a header claiming more than that is lying


def _check_size(img: nib.Nifti1Image, path: Path) -> None:
    """Refuse a header whose shape is empty or needs more bytes than the file can hold, before nibabel
    allocates that much (a flipped header byte can claim gigabytes for a kilobyte file)."""
    shape = tuple(int(s) for s in img.shape)
    if not shape or any(s <= 0 for s in shape):
        raise DataError(f"{path}: header declares shape {shape}; every dimension must be positive")
    dtype = img.get_data_dtype()
    if dtype.kind not in "biuf":
        raise DataError(f"{path}: voxel type {dtype} is not supported (expected integers or real numbers)")
    claimed = math.prod(shape) * dtype.itemsize
    size = path.stat().st_size
    limit = size * GZIP_MAX_RATIO if path.name.endswith(".gz") else size
    if claimed > limit:
        raise DataError(f"{path}: header declares {shape} voxels of {dtype} ({claimed / 2**20:.1f} MiB), "
                        f"more than a {size}-byte file can hold: corrupt header or truncated file")


def _data(img: nib.Nifti1Image, path: Path, dtype: Any = None) -> np.ndarray:
    _check_size(img, path)
    try:
        return np.asarray(img.dataobj, dtype=dtype)
    except Exception as err:  # truncated gzip, EOF, bad buffer size ...
        raise DataError(f"{path}: cannot read voxel data, file corrupt or truncated "
                        f"({type(err).__name__}: {err})") from err


def read_header(path: Path, n_channels: int) -> nib.Nifti1Image:
    """An image whose header says 3D ``(X, Y, Z)``, 4D ``(X, Y, Z, C)`` or 5D ``(X, Y, Z, 1, C)`` with
    ``n_channels`` channels, in a file that can hold it (voxels not read).

    Raises:
        DataError: Unreadable file, or wrong dimensionality / channel count / size.
    """
    img = _load(path)
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 5 and shape[3] == 1:
        shape = shape[:3] + shape[4:]
    if len(shape) not in (3, 4):
        raise DataError(f"{path}: expected a 3D (X,Y,Z) or 4D (X,Y,Z,C) image, got shape {img.shape}")
    channels = 1 if len(shape) == 3 else shape[3]
    if channels != n_channels:
        raise DataError(f"{path}: image shape {img.shape} has {channels} channel(s), expected {n_channels} "
                        f"(one per modality in dataset.json)")
    _check_size(img, path)
    return img


def read_image(path: Path, n_channels: int) -> tuple[np.ndarray, nib.Nifti1Image]:
    """``(array, image)``: the image (``read_header``'s checks) as a contiguous float32 ``(C, X, Y, Z)``
    array, and the nibabel image (affine, header).

    Raises:
        DataError: Unreadable, corrupt or truncated file, or wrong dimensionality / channel count.
    """
    img = read_header(Path(path), n_channels)
    data = np.moveaxis(_data(img, Path(path), np.float32).reshape(*img.shape[:3], -1), -1, 0)
    return np.ascontiguousarray(data), img


def check_finite(image: np.ndarray, path: Path, policy: str = "error",
                 warn: Callable[[str], None] | None = None) -> np.ndarray:
    """Apply ``data.nonfinite`` to an image's NaN/Inf voxels.

    Args:
        image: the image array (changed in place under ``"zero"``).
        path: its file, for the message.
        policy: ``"error"`` raises; ``"zero"`` sets those voxels to 0 and warns with their count.
        warn: where that warning goes (a log, a report); None: ``warnings.warn``.

    Returns:
        The image.

    Raises:
        DataError: naming the file and the count, under ``"error"``.
    """
    bad = int(image.size - np.count_nonzero(np.isfinite(image)))
    if not bad:
        return image
    if policy == "zero":
        message = f"{path}: {bad} NaN/Inf voxel(s) set to 0 (data.nonfinite=zero)"
        warn(message) if warn is not None else warnings.warn(message, stacklevel=2)
        return np.nan_to_num(image, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    raise DataError(f"{path}: image contains {bad} NaN/Inf voxel(s) (expected finite intensities; "
                    f"data.nonfinite=zero sets them to 0 instead)")


def read_case(
    case: Case, dataset: MSDDataset, nonfinite: str = "error", warn: Callable[[str], None] | None = None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, tuple[float, float, float]]:
    """Read and validate one case.

    Args:
        case: The case (``case.label`` None for test images).
        dataset: Its dataset (modality count and declared labels).
        nonfinite: ``data.nonfinite``: ``"error"`` or ``"zero"`` for NaN/Inf image voxels (`check_finite`).
        warn: where ``check_finite``'s warning goes (None: ``warnings.warn``).

    Returns:
        ``(image, label, affine, spacing)``: float32 ``(C, X, Y, Z)``, uint8 ``(X, Y, Z)`` or None,
        the image's 4x4 affine, and the voxel spacing from the header zooms.

    Raises:
        DataError: Unreadable files, NaN/Inf in the image, bad spacing, label/image shape or affine
            mismatch, non-integer or undeclared label values.
    """
    image, img = read_image(case.image, len(dataset.modalities))
    image = check_finite(image, case.image, nonfinite, warn)
    affine = np.asarray(img.affine, dtype=np.float64)
    spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise DataError(f"{case.image}: invalid voxel spacing {spacing} in header (expected 3 positive)")
    if case.label is None:
        return image, None, affine, spacing  # type: ignore[return-value]
    lbl = _load(case.label)
    lshape = tuple(int(s) for s in lbl.shape)
    if len(lshape) == 4 and lshape[3] == 1:
        lshape = lshape[:3]
    if lshape != image.shape[1:]:
        raise DataError(f"{case.label}: label shape {lbl.shape} does not match image {case.image} "
                        f"spatial shape {image.shape[1:]}")
    if not np.allclose(lbl.affine, affine, rtol=0.0, atol=AFFINE_TOLERANCE):
        raise DataError(f"{case.label}: label affine differs from image {case.image} affine "
                        f"(tolerance {AFFINE_TOLERANCE})\nlabel:\n{lbl.affine}\nimage:\n{affine}")
    raw = _data(lbl, case.label).reshape(lshape)
    declared = sorted(dataset.labels)
    if not np.issubdtype(raw.dtype, np.integer):
        finite = np.isfinite(raw)
        nonint = raw[~finite] if not finite.all() else raw[raw != np.round(raw)]
        if nonint.size:
            raise DataError(f"{case.label}: label values must be integers, found "
                            f"{np.unique(nonint)[:10].tolist()} (declared labels {declared})")
    values = np.unique(raw)
    undeclared = [v for v in values.tolist() if int(v) not in dataset.labels]
    if undeclared:
        raise DataError(f"{case.label}: label values {undeclared} are not declared in dataset.json "
                        f"labels {declared}")
    return image, raw.astype(np.uint8), affine, spacing  # type: ignore[return-value]
