"""Rows of a NIfTI image read through nibabel's array proxy, without the whole image in memory: what a rank of
split inference reads of its input (``commands/segment.py``).

    img = read_header(path, n_channels=4)                              # data.msd: the header, checked
    rows = image_rows(img, path, channels=[0, 2], start=10, stop=20)   # (2, 10, Y, Z) float32

Memory: one channel's rows at a time. NIfTI stores the first axis fastest, so a run of rows is one short
stretch per line of the other axes; nibabel reads the stretches (or, for compressed files, streams through
the file) without materialising the channel.
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from lampseg.data.msd import DataError


def spatial_shape(img: nib.Nifti1Image) -> list[int]:
    """The image's (X, Y, Z)."""
    return [int(s) for s in img.shape[:3]]


def image_rows(img: nib.Nifti1Image, path: Path, channels: list[int], start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of the first axis of the chosen ``channels``, as float32 (C, rows, Y, Z).

    Raises:
        DataError: the file is corrupt or truncated where these rows are.
    """
    shape = spatial_shape(img)
    out = np.empty((len(channels), max(stop - start, 0), shape[1], shape[2]), dtype=np.float32)
    if stop <= start:
        return out
    for k, channel in enumerate(channels):
        index = (slice(start, stop), slice(None), slice(None))
        if len(img.shape) == 4:
            index += (channel,)
        elif len(img.shape) == 5:
            index += (0, channel)
        try:
            out[k] = np.asarray(img.dataobj[index], dtype=np.float32)
        except Exception as err:  # truncated gzip, EOF, bad buffer size ...
            raise DataError(f"{path}: cannot read voxel data, file corrupt or truncated "
                            f"({type(err).__name__}: {err})") from err
    return out
