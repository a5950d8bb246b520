"""Preprocessing cache: crop, normalise and resample every training case once per dataset and config.

Layout of a cache directory ``cache_root / f"{dataset.name}-{key[:12]}"``, per case:
``<name>_image.npy`` (float32, C,X,Y,Z), ``<name>_label.npy`` (uint8, X,Y,Z), ``<name>_fg.npy``
(int32 (N,4): label value, x, y, z) and ``<name>_meta.json`` (written last). ``done.json`` marks the
directory complete; every file is written atomically, so concurrent builders (DDP ranks, Tune trials)
cannot leave a torn file, and a directory without ``done.json`` is resumed, never trusted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lampseg.data.msd import NONFINITE_POLICIES, DataError, MSDDataset, read_case
from lampseg.io import atomic_write, fsync_dir

CACHE_VERSION = 1
MAX_FG_PER_LABEL = 10000
NORMALIZATIONS = ("zscore_nonzero", "none")


@dataclass(frozen=True)
class PreprocessConfig:
    """Per-case preprocessing settings (part of the cache key).

    Attributes:
        target_spacing: Resample to this voxel spacing (mm); None keeps the native spacing.
        crop_nonzero: Crop to the bounding box of voxels where any channel is nonzero.
        normalize: ``"zscore_nonzero"`` (per channel, over the nonzero mask) or ``"none"``.
        nonfinite: NaN/Inf image voxels: ``"error"`` or ``"zero"`` (`lampseg.data.msd.check_finite`).
    """

    target_spacing: tuple[float, float, float] | None = None
    crop_nonzero: bool = True
    normalize: str = "zscore_nonzero"
    nonfinite: str = "error"

    def __post_init__(self) -> None:
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {self.normalize!r}")
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {self.nonfinite!r}")
        if self.target_spacing is not None:
            spacing = tuple(float(s) for s in self.target_spacing)
            if len(spacing) != 3 or not all(s > 0 for s in spacing):
                raise ValueError(f"target_spacing must be 3 positive numbers, got {self.target_spacing!r}")
            object.__setattr__(self, "target_spacing", spacing)


def _nearest(arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour resize of the last three axes (pixel-centre aligned, like ``nearest-exact``)."""
    idx = [np.minimum(((np.arange(n) + 0.5) * (o / n)).astype(np.int64), o - 1)
           for o, n in zip(arr.shape[-3:], shape, strict=True)]
    return arr[(..., *np.ix_(*idx))]


def _linear(arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Trilinear resize of a channel-first (C, X, Y, Z) float array."""
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None]
    return F.interpolate(t, size=tuple(shape), mode="trilinear", align_corners=False)[0].numpy()


def preprocess_array(
    image: np.ndarray, label: np.ndarray | None, spacing: Any, cfg: PreprocessConfig
) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Crop, normalise and resample one case (used by the cache and by prediction on new images).

    Args:
        image: Float array (C, X, Y, Z).
        label: Integer array (X, Y, Z) or None.
        spacing: Voxel spacing of ``image`` (3 numbers).
        cfg: Preprocessing settings.

    Returns:
        ``(image, label, meta)``: float32 image, uint8 label (or None), and a JSON-serialisable meta dict
        with ``original_shape``, ``crop_box`` ([[start, end)] x3), ``spacing``, ``target_spacing``,
        ``preprocessed_shape`` and ``norm_stats`` ([mean, std] per channel); pass it to `restore_array`.
    """
    if image.ndim != 4:
        raise ValueError(f"image must be channel-first (C, X, Y, Z), got shape {image.shape}")
    original = tuple(int(s) for s in image.shape[1:])
    if label is not None and tuple(label.shape) != original:
        raise ValueError(f"label shape {label.shape} does not match image spatial shape {original}")
    spacing = tuple(float(s) for s in spacing)
    box = _nonzero_box(image) if cfg.crop_nonzero else [[0, s] for s in original]
    crop = tuple(slice(s, e) for s, e in box)
    image = np.array(image[(slice(None), *crop)], dtype=np.float32)  # copy: never alias the caller's data
    if label is not None:
        label = np.asarray(label[crop]).astype(np.uint8)
    stats = _zscore_nonzero(image) if cfg.normalize == "zscore_nonzero" else []
    shape = tuple(image.shape[1:])
    if cfg.target_spacing is not None:
        new = resampled_shape(shape, spacing, cfg.target_spacing)
        if new != shape:
            image = _linear(image, new)
            label = None if label is None else _nearest(label, new)
            shape = new
    meta = {
        "original_shape": list(original),
        "crop_box": box,
        "spacing": list(spacing),
        "target_spacing": None if cfg.target_spacing is None else list(cfg.target_spacing),
        "preprocessed_shape": [int(s) for s in shape],
        "norm_stats": stats,
    }
    return image, label, meta


def resampled_shape(shape: Any, spacing: Any, target: Any) -> tuple[int, ...]:
    """The size of a volume of ``shape`` voxels of ``spacing`` mm resampled to ``target`` mm (rounded,
    at least 1)."""
    return tuple(max(1, round(int(n) * float(s) / float(t)))
                 for n, s, t in zip(shape, spacing, target, strict=True))


def _nonzero_box(image: np.ndarray) -> list[list[int]]:
    """[[start, end)] x3 of the voxels where any channel of ``image`` (C, X, Y, Z) is nonzero (the whole
    volume when none is)."""
    box = [[0, s] for s in image.shape[1:]]
    mask = np.any(image != 0, axis=0)
    if mask.any():
        for axis in range(3):
            hits = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(3) if a != axis)))
            box[axis] = [int(hits[0]), int(hits[-1]) + 1]
    return box


def _zscore_nonzero(image: np.ndarray) -> list[list[float]]:
    """Normalises each channel of ``image`` in place to zero mean and unit deviation over the voxels where any
    channel is nonzero (the others set to 0); returns [mean, std] per channel."""
    stats: list[list[float]] = []
    mask = np.any(image != 0, axis=0)
    for channel in image:
        values = channel[mask]
        mean = float(values.mean(dtype=np.float64)) if values.size else 0.0
        std = float(values.std(dtype=np.float64)) if values.size else 1.0
        std = max(std, 1e-8)
        channel[mask] = (values - mean) / std
        channel[~mask] = 0.0
        stats.append([mean, std])
    return stats


def restore_array(seg: np.ndarray, meta: dict) -> np.ndarray:
    """Map a prediction in preprocessed space back to the original image grid.

    Args:
        seg: Integer segmentation (X, Y, Z), resampled with nearest neighbour; or channel-first float
            probabilities (K, X, Y, Z), resampled linearly (argmax afterwards). Outside the crop box an
            integer result is 0 and a probability result is background-certain (channel 0 = 1, others 0);
            logits go back with ``crop_space`` and ``uncrop`` (labels first, then background outside).
        meta: The dict returned by `preprocess_array` (or stored in ``<name>_meta.json``).

    Returns:
        Array of spatial shape ``meta["original_shape"]`` (same dtype as ``seg``; float32 for probabilities).
    """
    if tuple(seg.shape[-3:]) != tuple(meta["preprocessed_shape"]) or seg.ndim not in (3, 4):
        raise ValueError(f"expected (X,Y,Z) or (K,X,Y,Z) with spatial shape {meta['preprocessed_shape']}, "
                         f"got {seg.shape}")
    box = meta["crop_box"]
    cropped = tuple(e - s for s, e in box)
    region = tuple(slice(s, e) for s, e in box)
    if seg.ndim == 3:
        out = np.zeros(meta["original_shape"], dtype=seg.dtype)
        out[region] = seg if tuple(seg.shape) == cropped else _nearest(seg, cropped)
        return out
    probs = np.asarray(seg, dtype=np.float32)
    out = np.zeros((seg.shape[0], *meta["original_shape"]), dtype=np.float32)
    out[0] = 1.0
    out[(slice(None), *region)] = crop_space(probs, meta)
    return out


def uncrop(seg: np.ndarray, meta: dict) -> np.ndarray:
    """An integer map on the crop box's grid (``crop_space``'s) placed on the original grid (0 outside)."""
    out = np.zeros(meta["original_shape"], dtype=seg.dtype)
    out[tuple(slice(s, e) for s, e in meta["crop_box"])] = seg
    return out


def crop_space(probs: np.ndarray, meta: dict) -> np.ndarray:
    """Channel-first float outputs (K, X, Y, Z) in preprocessed space on the original grid inside the crop
    box (resampled linearly when preprocessing resampled; unchanged otherwise), as ``restore_array`` places
    them."""
    cropped = tuple(e - s for s, e in meta["crop_box"])
    probs = np.asarray(probs, dtype=np.float32)
    return probs if tuple(probs.shape[1:]) == cropped else _linear(probs, cropped)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, arr, allow_pickle=False))


def _save_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode("utf-8")))


def foreground_coords(label: np.ndarray, name: str, max_per_label: int = MAX_FG_PER_LABEL) -> np.ndarray:
    """Foreground voxel coordinates (N, 4) int32 rows (label value, x, y, z), at most ``max_per_label``
    per label value, subsampled with a seed derived from ``name`` (deterministic)."""
    rng = np.random.default_rng(zlib.crc32(name.encode("utf-8")))
    parts = [np.zeros((0, 4), dtype=np.int32)]
    for value in np.unique(label):
        if value == 0:
            continue
        coords = np.argwhere(label == value)
        if len(coords) > max_per_label:
            coords = coords[np.sort(rng.choice(len(coords), max_per_label, replace=False))]
        parts.append(np.concatenate([np.full((len(coords), 1), value), coords], axis=1).astype(np.int32))
    return np.concatenate(parts)


def cache_key(dataset: MSDDataset, cfg: PreprocessConfig) -> str:
    """Sha256 hex digest over dataset.json, each training file's size and mtime, the config, and
    `CACHE_VERSION`."""
    h = hashlib.sha256(f"lampseg-cache-v{CACHE_VERSION}\n".encode())
    h.update((dataset.root / "dataset.json").read_bytes())
    for case in dataset.cases:
        for path in (case.image, case.label):
            st = Path(path).stat()
            h.update(f"\n{case.name}:{Path(path).name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode())
    return h.hexdigest()


def cache_dir(dataset: MSDDataset, cache_root: str | Path, cfg: PreprocessConfig) -> Path:
    """Directory ``cache_root / f"{dataset.name}-{cache_key[:12]}"`` (name made filesystem-safe and at most
    100 characters)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", dataset.name).strip("._")[:100] or "dataset"  # < NAME_MAX
    return Path(cache_root) / f"{safe}-{cache_key(dataset, cfg)[:12]}"


class PreprocessedDataset:
    """Read access to a complete cache directory.

    Attributes:
        directory: The cache directory.
        cases: Case names, in dataset.json order.
        modalities: Channel names of the cached images.
        labels: Label value -> name.
        config: The `PreprocessConfig` fields used to build it.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        marker = self.directory / "done.json"
        try:
            done = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise DataError(f"{marker}: not a complete preprocessing cache ({err})") from err
        self.cases: list[str] = list(done["cases"])
        self.modalities: list[str] = list(done["modalities"])
        self.labels: dict[int, str] = {int(k): v for k, v in done["labels"].items()}
        self.config: dict = done["config"]
        self._known = set(self.cases)
        self._meta: dict[str, dict] = {}
        self._foreground: dict[str, np.ndarray] = {}

    def _path(self, name: str, suffix: str) -> Path:
        if name not in self._known:
            raise KeyError(f"case {name!r} not in cache {self.directory}")
        return self.directory / f"{name}_{suffix}"

    def image(self, name: str, mmap: bool = True) -> np.ndarray:
        """Float32 (C, X, Y, Z) image; a read-only ``np.memmap`` when ``mmap`` (reads only touched pages)."""
        return np.load(self._path(name, "image.npy"), mmap_mode="r" if mmap else None)

    def label(self, name: str, mmap: bool = True) -> np.ndarray:
        """Uint8 (X, Y, Z) label; a read-only ``np.memmap`` when ``mmap``."""
        return np.load(self._path(name, "label.npy"), mmap_mode="r" if mmap else None)

    def meta(self, name: str) -> dict:
        """The case's meta dict (see `preprocess_array`, plus ``affine``, ``modalities``, ``name``)."""
        if name not in self._meta:
            self._meta[name] = json.loads(self._path(name, "meta.json").read_text(encoding="utf-8"))
        return self._meta[name]

    def foreground(self, name: str) -> np.ndarray:
        """(N, 4) int32 rows (label value, x, y, z) of foreground voxels for patch sampling (read once per
        case: the sampler asks for it for every foreground patch)."""
        if name not in self._foreground:
            self._foreground[name] = np.load(self._path(name, "fg.npy"))
        return self._foreground[name]

    def __len__(self) -> int:
        return len(self.cases)


def _case_complete(directory: Path, name: str, key: str) -> bool:
    """True when a previous (interrupted) build fully wrote this case for the same cache key."""
    try:
        meta = json.loads((directory / f"{name}_meta.json").read_text(encoding="utf-8"))
        if meta.get("cache_key") != key:
            return False
        image = np.load(directory / f"{name}_image.npy", mmap_mode="r")
        label = np.load(directory / f"{name}_label.npy", mmap_mode="r")
        np.load(directory / f"{name}_fg.npy", mmap_mode="r")
    except (OSError, ValueError):
        return False
    shape = list(meta.get("preprocessed_shape", []))
    return list(image.shape[1:]) == shape and list(label.shape) == shape


def build_cache(
    dataset: MSDDataset, cache_root: str | Path, cfg: PreprocessConfig, log: Callable[[str], Any] = print
) -> PreprocessedDataset:
    """Preprocess every training case once and return the cache (reused when already complete).

    Args:
        dataset: The dataset (`lampseg.data.msd.load_dataset`); cases are read with ``read_case``.
        cache_root: Parent directory of all caches.
        cfg: Preprocessing settings.
        log: Called with one short line when building or reusing.

    Returns:
        The complete cache.

    Raises:
        DataError: A case fails validation (the cache stays incomplete).
    """
    directory = cache_dir(dataset, cache_root, cfg)
    if (directory / "done.json").is_file():
        try:
            cache = PreprocessedDataset(directory)
            log(f"reusing preprocessed cache {directory} ({len(cache)} cases)")
            return cache
        except (DataError, KeyError, TypeError, AttributeError):
            pass  # unreadable marker: rebuild
    key = cache_key(dataset, cfg)
    directory.mkdir(parents=True, exist_ok=True)
    log(f"preprocessing {len(dataset.cases)} cases -> {directory}")
    for case in dataset.cases:
        if _case_complete(directory, case.name, key):
            continue
        image, label, affine, spacing = read_case(case, dataset, cfg.nonfinite,
                                                  warn=lambda message: log(f"warning: {message}"))
        image, label, meta = preprocess_array(image, label, spacing, cfg)
        assert label is not None
        prefix = directory / case.name
        _save_npy(Path(f"{prefix}_image.npy"), image)
        _save_npy(Path(f"{prefix}_label.npy"), label)
        _save_npy(Path(f"{prefix}_fg.npy"), foreground_coords(label, case.name))
        meta.update(name=case.name, affine=affine.tolist(), modalities=list(dataset.modalities),
                    cache_key=key)
        _save_json(Path(f"{prefix}_meta.json"), meta)  # last: marks the case complete
    done = {
        "version": CACHE_VERSION,
        "cache_key": key,
        "dataset": dataset.name,
        "cases": [c.name for c in dataset.cases],
        "modalities": list(dataset.modalities),
        "labels": {str(k): v for k, v in dataset.labels.items()},
        "config": dataclasses.asdict(cfg),
    }
    fsync_dir(directory)  # case files durable before the marker that vouches for them
    _save_json(directory / "done.json", done)
    fsync_dir(directory)
    return PreprocessedDataset(directory)
