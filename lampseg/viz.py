"""Pictures of cases: every modality in three orientations, the label and prediction overlays with a legend of
the label names from ``dataset.json``, and an error map.

(``python -m lampseg visualize``: ``commands/visualize.py``; during training: ``validation_overlay``.)
``montage`` builds the picture as one RGB array (tiles of a fixed size in a grid), so the colours at a
voxel's tile position can be checked; ``render`` adds titles and the legend and writes the PNG.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lampseg.io import atomic_write_bytes
from lampseg.plots import figure_png, pyplot

ORIENTATIONS = ("axial", "coronal", "sagittal")  # slices across z, y, x of an (X, Y, Z) volume
PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [0, 128, 128]],
                   dtype=float) / 255
FALSE_POSITIVE = np.array([1.0, 0.0, 1.0])  # magenta: predicted foreground where the reference has none
FALSE_NEGATIVE = np.array([0.0, 1.0, 1.0])  # cyan: reference foreground the prediction missed
WRONG_LABEL = np.array([1.0, 1.0, 1.0])  # white: foreground in both, different labels
ALPHA = 0.5


def label_colour(index: int) -> np.ndarray:
    """The overlay colour of the ``index``-th foreground label (in ``dataset.json`` order)."""
    return PALETTE[index % len(PALETTE)]


@dataclass
class Montage:
    """The picture as an array and where its tiles are: ``rows`` names each tile row, ``tile`` its size."""

    image: np.ndarray  # (H, W, 3) floats in [0, 1]
    rows: list[str]
    tile: int
    slices: tuple[int, int, int]  # x, y, z of the three planes

    def tile_at(self, row: int, column: int) -> np.ndarray:
        t = self.tile
        return self.image[row * t:(row + 1) * t, column * t:(column + 1) * t]


def centre_slices(label: np.ndarray | None, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """The planes through the foreground's centre of mass (the volume's centre without foreground)."""
    if label is None or not (label > 0).any():
        return tuple(s // 2 for s in shape)  # type: ignore[return-value]
    return tuple(int(round(c.mean())) for c in np.nonzero(label > 0))  # type: ignore[return-value]


def _plane(volume: np.ndarray, orientation: str, slices: tuple[int, int, int]) -> np.ndarray:
    """A 2D plane of an (X, Y, Z) volume, rows top to bottom as radiologists look at it."""
    x, y, z = slices
    plane = {"axial": volume[:, :, z], "coronal": volume[:, y, :], "sagittal": volume[x, :, :]}[orientation]
    return np.rot90(plane)


def _fit(plane: np.ndarray, tile: int) -> np.ndarray:
    """Nearest-neighbour resize into a square tile, keeping the aspect ratio (padded with zeros)."""
    h, w = plane.shape[:2]
    scale = tile / max(h, w)
    rows = np.minimum((np.arange(int(h * scale)) / scale).astype(int), h - 1)
    cols = np.minimum((np.arange(int(w * scale)) / scale).astype(int), w - 1)
    out = np.zeros((tile, tile) + plane.shape[2:], dtype=plane.dtype)
    out[:len(rows), :len(cols)] = plane[rows][:, cols]
    return out


def _grey(plane: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(plane, [1, 99]) if plane.size else (0.0, 1.0)
    grey = np.clip((plane - lo) / max(hi - lo, 1e-6), 0, 1)
    return np.repeat(grey[..., None], 3, axis=-1)


def _overlay(grey: np.ndarray, label: np.ndarray, values: list[int]) -> np.ndarray:
    out = grey.copy()
    for k, value in enumerate(values):
        mask = label == value
        out[mask] = (1 - ALPHA) * out[mask] + ALPHA * label_colour(k)
    return out


def _errors(grey: np.ndarray, reference: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    out = grey * 0.6
    out[(prediction > 0) & (reference == 0)] = FALSE_POSITIVE
    out[(prediction == 0) & (reference > 0)] = FALSE_NEGATIVE
    out[(prediction > 0) & (reference > 0) & (prediction != reference)] = WRONG_LABEL
    return out


def montage(image: np.ndarray, modalities: list[str], label: np.ndarray | None, label_values: list[int],
            prediction: np.ndarray | None = None, slices: tuple[int, int, int] | None = None,
            tile: int = 160) -> Montage:
    """Tiles: one row per modality, then the label overlay, the prediction overlay and the error map;
    one column per orientation (axial, coronal, sagittal).

    Args:
        image: (C, X, Y, Z) intensities.
        modalities: the C channel names.
        label: (X, Y, Z) reference label values, or None.
        label_values: the foreground label values in ``dataset.json`` order (colours follow this order).
        prediction: (X, Y, Z) predicted label values, or None.
        slices: x, y, z of the planes (default: through the reference foreground's centre of mass).
        tile: pixels per tile side.
    """
    slices = slices or centre_slices(label if label is not None else prediction, image.shape[1:])
    background = image[0]
    rows, tiles = [], []
    for name, channel in zip(modalities, image):
        rows.append(name)
        tiles.append([_grey(_plane(channel, o, slices)) for o in ORIENTATIONS])
    base = [_grey(_plane(background, o, slices)) for o in ORIENTATIONS]
    if label is not None:
        rows.append("label")
        tiles.append([_overlay(g, _plane(label, o, slices), label_values)
                      for g, o in zip(base, ORIENTATIONS)])
    if prediction is not None:
        rows.append("prediction")
        tiles.append([_overlay(g, _plane(prediction, o, slices), label_values)
                      for g, o in zip(base, ORIENTATIONS)])
        if label is not None:
            rows.append("errors")
            tiles.append([_errors(g, _plane(label, o, slices), _plane(prediction, o, slices))
                          for g, o in zip(base, ORIENTATIONS)])
    grid = np.concatenate([np.concatenate([_fit(t, tile) for t in row], axis=1) for row in tiles], axis=0)
    return Montage(grid, rows, tile, slices)


def render(picture: Montage, label_names: dict[int, str], title: str, path: Path | None = None) -> bytes:
    """The montage with row/column titles and a legend (label names, error colours) as PNG bytes (written
    atomically to ``path`` when given)."""
    from matplotlib.patches import Patch  # lazy: matplotlib costs a second of start-up (plots.pyplot)

    plt = pyplot()
    h, w = picture.image.shape[:2]
    left, right, top, bottom = 1.0, 1.9, 0.7, 0.1  # inches around the picture: row names, legend, titles
    width, height = w / 100 + left + right, h / 100 + top + bottom
    fig = plt.figure(figsize=(width, height))
    ax = fig.add_axes((left / width, bottom / height, w / 100 / width, h / 100 / height))
    ax.imshow(picture.image, interpolation="nearest")
    t = picture.tile
    ax.set_xticks([t * (k + 0.5) for k in range(len(ORIENTATIONS))], ORIENTATIONS)
    ax.set_yticks([t * (k + 0.5) for k in range(len(picture.rows))], picture.rows)
    ax.xaxis.tick_top()
    handles = [Patch(color=label_colour(k), label=f"{value}: {name}")
               for k, (value, name) in enumerate(sorted(label_names.items()))]
    if "errors" in picture.rows:
        handles += [Patch(color=FALSE_POSITIVE, label="false positive"),
                    Patch(color=FALSE_NEGATIVE, label="false negative"),
                    Patch(facecolor=WRONG_LABEL, edgecolor="black", label="wrong label")]
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    x, y, z = picture.slices
    fig.suptitle(f"{title}  (x={x}, y={y}, z={z})", fontsize=10)
    data = figure_png(fig, 100)
    if path is not None:
        atomic_write_bytes(path, data)
    return data


def validation_overlay(bundle, case: str, image, labels, run_dir: Path, logger=None, step: int = 0,
                       png: bool = True) -> Path:
    """During training: the montage of one validation case with the prediction validation just made
    (``image`` (1, C, X, Y, Z) and its ``labels`` (1, X, Y, Z), as ``evaluate_cases`` passes them), logged to
    TensorBoard as ``val/overlay/<case>`` and, with ``png``, written to ``run_dir/val_overlay.png`` (replaced
    at every validation)."""
    prediction = labels[0].cpu().numpy()
    values = [v for v in sorted(bundle.dataset.labels) if v != 0]
    names = [bundle.dataset.modalities[c] for c in bundle.channels]
    picture = montage(image[0].float().cpu().numpy(), names, np.asarray(bundle.cache.label(case)), values,
                      prediction, tile=96)
    path = run_dir / "val_overlay.png"
    if png:
        render(picture, {v: bundle.dataset.labels[v] for v in values}, f"{case}, epoch {step}", path)
    if logger is not None and logger.write:
        logger.tb.add_image(f"val/overlay/{case}", picture.image, step, dataformats="HWC")
    return path
