"""Patch sampling from the memory-mapped preprocessing cache, with foreground oversampling and MONAI
augmentation.

Every sample is a pure function of ``(seed, epoch, index)``: workers, restarts and resumes draw the same
patches, so "sampler state" is just the epoch number. A patch read slices the memory map, so only the
pages under the patch are read from disk (the "read only the needed blocks" idea of seed 002).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from monai.transforms import (
    Compose,
    RandRotated,
    RandScaleIntensityd,
    RandShiftIntensityd,
)
from torch.utils.data import DataLoader, Dataset, Sampler

from lampseg.data.cache import PreprocessedDataset


def read_block(array: np.ndarray, start: list[int], size: list[int], channels: list[int] | None = None,
               fill: float = 0) -> np.ndarray:
    """Read ``array[..., start:start+size]`` (spatial axes last), padding with ``fill`` outside the volume.

    Args:
        array: (X,Y,Z) or (C,X,Y,Z) array, usually a ``np.memmap``.
        start: first voxel per spatial axis; may be negative or run past the end.
        size: block size per spatial axis.
        channels: channel indices to read from a channel-first array (None: all / no channel axis).
        fill: padding value.

    Returns:
        A new in-memory array of spatial size ``size``.
    """
    shape = array.shape[-3:]
    lo = [min(max(s, 0), d) for s, d in zip(start, shape)]  # clamped: a block may lie wholly outside
    src = tuple(slice(a, max(min(s + n, d), a)) for a, s, n, d in zip(lo, start, size, shape))
    dst = tuple(slice(r.start - s, r.stop - s) for r, s in zip(src, start))
    lead = (len(channels),) if channels is not None else array.shape[:-3]
    block = np.full(lead + tuple(size), fill, dtype=array.dtype)
    if channels is not None:
        for i, c in enumerate(channels):
            block[(i, *dst)] = array[(c, *src)]
    else:
        block[(..., *dst)] = array[(..., *src)]
    return block


def whole_volume_shape(shapes: list[tuple[int, ...]], divisor: int) -> list[int]:
    """Smallest shape that holds every volume and is a multiple of the network's ``divisor`` per axis."""
    return [int(math.ceil(max(s[a] for s in shapes) / divisor) * divisor) for a in range(3)]


def centered_start(shape: tuple[int, ...], size: list[int]) -> list[int]:
    """Start that centres a block of ``size`` on a volume of ``shape`` (negative = padding)."""
    return [(d - n) // 2 for d, n in zip(shape, size)]


def flip_axes(rng: np.random.Generator, prob: float) -> tuple[int, ...]:
    """Spatial axes (0-2) to mirror, each with probability ``prob`` (MONAI ``RandFlipd`` per axis)."""
    return tuple(a for a in range(3) if rng.random() < prob)


def flip(sample: dict[str, np.ndarray], axes: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Mirror channel-first image and label along spatial ``axes``: numpy views, because ``torch.flip``
    costs ~3 ms per 4x48^3 patch on CPU (most of the sampling time); the copy happens once, when batching."""
    return {k: np.flip(v, tuple(a + 1 for a in axes)) for k, v in sample.items()} if axes else sample


def split_rows(length: int, parts: int, multiple: int) -> list[tuple[int, int]]:
    """(start, stop) of each of ``parts`` consecutive pieces of ``length`` rows, each a multiple of
    ``multiple`` rows (a slab that survives the U-Net's down-sampling), as equal as that allows.

    Raises:
        ValueError: when ``length`` is not a multiple of ``multiple`` or too short for ``parts`` pieces.
    """
    units, rest = divmod(length, multiple)
    if rest or units < parts:
        raise ValueError(f"{length} rows along the split axis do not make {parts} slabs of a multiple of "
                         f"{multiple} rows each (need a multiple of {multiple}, at least {parts * multiple})")
    base, extra = divmod(units, parts)
    stops = [multiple * (base * (r + 1) + min(r + 1, extra)) for r in range(parts)]
    return list(zip([0, *stops[:-1]], stops))


class Slab(NamedTuple):
    """Which piece of every sample's first spatial axis a process reads (``split_rows``): spatial
    parallelism, where each process holds one slab of each volume."""

    index: int
    parts: int
    multiple: int


def build_augment(aug_cfg) -> Compose | None:
    """MONAI augmentation from ``data.augment``: intensity scale/shift and optional small rotations.

    Mirroring (``data.augment.flip_prob``) is applied by ``flip`` in ``PatchDataset``.
    """
    keys = ["image", "label"]
    transforms = []
    if aug_cfg.rotate_prob > 0:
        rad = math.radians(aug_cfg.rotate_degrees)
        transforms.append(RandRotated(keys, range_x=rad, range_y=rad, range_z=rad, prob=aug_cfg.rotate_prob,
                                      mode=("bilinear", "nearest"), padding_mode="zeros", keep_size=True))
    if aug_cfg.intensity_prob > 0:
        transforms += [RandScaleIntensityd("image", factors=0.1, prob=aug_cfg.intensity_prob),
                       RandShiftIntensityd("image", offsets=0.1, prob=aug_cfg.intensity_prob)]
    return Compose(transforms) if transforms else None


def _as_tensor(x) -> torch.Tensor:
    x = x.as_tensor() if hasattr(x, "as_tensor") else x
    return torch.as_tensor(np.ascontiguousarray(x) if isinstance(x, np.ndarray) else x)


class PatchDataset(Dataset):
    """Random training patches (or whole padded volumes) from a preprocessed dataset.

    Args:
        cache: the preprocessed, memory-mapped dataset.
        cases: names of the cases to sample from (the training fold).
        patch_size: spatial patch size; for whole-volume training pass the padded whole shape.
        channels: modality channel indices to read.
        samples_per_epoch: length of one epoch.
        foreground_ratio: probability that a patch is centred on a foreground voxel.
        augment: MONAI augmentation (or None).
        flip_prob: per-axis mirroring probability.
        seed: base seed.
        whole_volume: return each case whole, centred and padded to ``patch_size``.
        slab: read only this slab of each sample's first axis (the same sample and augmentation as the
            whole one, cut; without rotations, only the slab's rows are read from the memory map).
    """

    def __init__(self, cache: PreprocessedDataset, cases: list[str], patch_size: list[int],
                 channels: list[int], samples_per_epoch: int, foreground_ratio: float = 0.33,
                 augment: Compose | None = None, seed: int = 0, whole_volume: bool = False,
                 flip_prob: float = 0.0, slab: Slab | None = None):
        if not cases:
            raise ValueError("the training fold has no cases")
        self.cache, self.cases, self.patch_size = cache, list(cases), list(patch_size)
        self.channels, self.samples_per_epoch = list(channels), samples_per_epoch
        self.foreground_ratio, self.augment, self.seed = foreground_ratio, augment, seed
        self.whole_volume, self.flip_prob, self.slab = whole_volume, flip_prob, slab
        # rotations mix rows across slabs: such samples are cut after augmentation
        self.cut_after_augment = augment is not None and any(
            isinstance(t, RandRotated) for t in augment.transforms)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; samples are a function of (seed, epoch, index)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.samples_per_epoch

    def _start(self, rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> list[int]:
        size = self.patch_size
        if self.whole_volume:
            return centered_start(shape, size)
        low = [min(0, d - n) for d, n in zip(shape, size)]
        high = [max(0, d - n) for d, n in zip(shape, size)]
        if rng.random() < self.foreground_ratio:
            fg = self.cache.foreground(name)
            if len(fg):
                # nnU-Net style: pick a present label class first so rare classes are seen too.
                cls = rng.choice(np.unique(fg[:, 0]))
                rows = fg[fg[:, 0] == cls]
                center = rows[rng.integers(len(rows)), 1:]
                return [int(np.clip(c - n // 2, lo, hi)) for c, n, lo, hi in zip(center, size, low, high)]
        return [int(rng.integers(lo, hi + 1)) for lo, hi in zip(low, high)]

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        """Sample ``index`` of the selected epoch, or of ``epoch`` given as ``(epoch, index)``
        (``EpochSampler``: persistent loader workers hold a copy of the dataset made when they started)."""
        epoch, index = index if isinstance(index, tuple) else (self.epoch, index)
        rng = np.random.default_rng([self.seed, epoch, index])
        name = self.cases[int(rng.integers(len(self.cases)))]
        image = self.cache.image(name)
        start, size = self._start(rng, name, image.shape[-3:]), list(self.patch_size)
        axes = flip_axes(rng, self.flip_prob) if self.flip_prob > 0 else ()
        rows = None
        if self.slab is not None:
            rows = split_rows(size[0], self.slab.parts, self.slab.multiple)[self.slab.index]
        if rows is not None and not self.cut_after_augment:  # read the rows that become the slab after flips
            lo, hi = (size[0] - rows[1], size[0] - rows[0]) if 0 in axes else rows
            start, size, rows = [start[0] + lo, *start[1:]], [hi - lo, *size[1:]], None
        sample = flip({"image": read_block(image, start, size, self.channels),
                       "label": read_block(self.cache.label(name), start, size)[None]}, axes)
        if self.augment is not None:
            self.augment.set_random_state(seed=int(rng.integers(2**31)))
            sample = self.augment(sample)
        if rows is not None:
            sample = {k: v[:, rows[0]:rows[1]] for k, v in sample.items()}
        return {"image": _as_tensor(sample["image"]).float(),
                "label": _as_tensor(sample["label"]).to(torch.uint8)}


class EpochSampler(Sampler):
    """One epoch's sample indices as ``(epoch, index)`` pairs, so that workers kept alive across epochs
    (``persistent_workers``) draw each epoch's patches: the epoch travels with the index, not in their
    stale copy of the dataset. Replica ``rank`` of ``replicas`` takes indices ``rank, rank + replicas, ...``
    of the first ``replicas * (length // replicas)`` (``DistributedSampler`` without shuffling, dropping
    the remainder), so together the replicas see one process's global batch.
    """

    def __init__(self, length: int, replicas: int = 1, rank: int = 0):
        self.length, self.replicas, self.rank, self.epoch = length, replicas, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        end = self.length // self.replicas * self.replicas
        return ((self.epoch, index) for index in range(self.rank, end, self.replicas))

    def __len__(self) -> int:
        return self.length // self.replicas


def training_loader(dataset: PatchDataset, sampler: EpochSampler, batch_size: int, workers: int,
                    pin_memory: bool = False) -> DataLoader:
    """The training loader: ``workers`` processes kept alive from epoch to epoch (no start-up per epoch;
    set the epoch on ``sampler``), batches of ``batch_size`` (a last partial batch dropped), pinned host
    memory for CUDA."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=workers,
                      pin_memory=pin_memory, persistent_workers=workers > 0)
