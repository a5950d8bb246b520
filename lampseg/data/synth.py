"""Deterministic synthetic MSD Task01 (BrainTumour / BraTS) style dataset.

Each case is a brain-like ellipsoid head (scalp shell, grey/white matter texture, dark-ish
ventricles) on an exactly-zero background, with 1-3 irregular nested tumours: edema (label 1)
surrounds a core whose outer rim is enhancing tumour (label 3) and whose inside is
non-enhancing tumour (label 2), so ET ⊂ TC = {2, 3} ⊂ WT = {1, 2, 3}. Every modality gets its
own smooth multiplicative bias field, a global gain and Rician noise.

The modalities are informative in deliberately different ways, so a model has to combine them
and a leave-one-modality-out study ranks them t1gd > FLAIR > T2w > T1w:

======== =====================================================================================
Modality What it shows
======== =====================================================================================
FLAIR    Whole tumour (edema, core and rim) uniformly bright; sub-regions indistinguishable.
T1w      Nearly uninformative: tumour only ~4 % darker than the tissue it replaces (noise level).
t1gd     Enhancing rim very bright, non-enhancing core dark, edema like healthy tissue: the only
         modality that shows ET.
T2w      Core (labels 2 and 3) bright, edema moderately bright: separates core from edema,
         but not ET from the non-enhancing core; ventricles (CSF) are bright too.
======== =====================================================================================

``context="laterality"`` makes long-range context necessary: a tumour's core looks the same in every
modality wherever it is (the non-enhancing core's intensities), but it is labelled enhancing (3) when the
tumour sits in the left half of the head (x below the head's centre) and non-enhancing (2) in the right
half. Edema and the core's extent stay local, so whole-tumour and tumour-core Dice do not need context;
telling 2 from 3 needs to see where the head's midline is, which a small patch inside the tumour
cannot. (Left-right flipping augmentation must be off for such data: it would swap the sides.)

Cases are generated independently from ``np.random.SeedSequence([seed, case_index])`` (and one
sub-stream per modality), so the same arguments always give identical arrays and a modality
subset has exactly the channels of the full dataset.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

__all__ = ["MODALITIES", "LABELS", "MODALITY_INFORMATIVENESS", "CONTEXTS", "generate_dataset",
           "generate_known_importance"]

MODALITIES: tuple[str, ...] = ("FLAIR", "T1w", "t1gd", "T2w")
LABELS: dict[str, str] = {
    "0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour",
}
MODALITY_INFORMATIVENESS: dict[str, str] = {
    "FLAIR": "whole tumour (edema + core) uniformly bright; cannot separate sub-regions",
    "T1w": "nearly uninformative: tumour only ~4% darker than surrounding tissue (noise level)",
    "t1gd": "enhancing rim very bright, non-enhancing core dark, edema ~healthy: only modality showing ET",
    "T2w": "core (labels 2, 3) bright, edema moderately bright: separates core from edema, not ET from core",
}

# Mean healthy intensities per tissue, columns in MODALITIES order (FLAIR, T1w, t1gd, T2w).
_SCALP = np.array([150.0, 400.0, 380.0, 250.0])
_CSF = np.array([120.0, 250.0, 240.0, 850.0])
_GM = np.array([520.0, 480.0, 470.0, 560.0])
_WM = np.array([420.0, 640.0, 620.0, 380.0])
# Tumour intensities per label (1 edema, 2 non-enhancing, 3 enhancing); NaN = keep healthy * factor.
_TUMOUR = {1: np.array([900.0, np.nan, np.nan, 700.0]),
           2: np.array([900.0, np.nan, 300.0, 1000.0]),
           3: np.array([900.0, np.nan, 1150.0, 980.0])}
CONTEXTS = ("none", "laterality")
_HEALTHY_FACTOR = np.array([1.0, 0.96, 1.0, 1.0])  # where _TUMOUR is NaN
_NOISE_SIGMA = np.array([25.0, 25.0, 25.0, 25.0])


def _grid(shape: tuple[int, int, int]) -> list[np.ndarray]:
    """Broadcastable voxel coordinates normalised to [-1, 1] along each axis."""
    return [np.linspace(-1.0, 1.0, n, dtype=np.float32).reshape([-1 if i == a else 1 for i in range(3)])
            for a, n in enumerate(shape)]


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to zero mean and unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, truncate=3.0)
    return (field - field.mean()) / (field.std() + 1e-8)


def _ellipsoid(grid: list[np.ndarray], centre, radii) -> np.ndarray:
    """Normalised ellipsoidal distance (1 on the surface) on a broadcast grid."""
    return np.sqrt(sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)))


def _tumours(rng: np.random.Generator, grid: list[np.ndarray], half: np.ndarray, sigma: float,
             head_c: np.ndarray, head_r: np.ndarray, brain: np.ndarray) -> tuple[np.ndarray, ...]:
    """Masks of the whole tumour, its core, the core's enhancing rim and the cores in the left half: 1-3
    distorted nested ellipsoids placed anywhere inside the brain (either hemisphere)."""
    shape = brain.shape
    edema_noise, core_noise = _smooth_noise(rng, shape, sigma), _smooth_noise(rng, shape, sigma)
    wt, tc, et, left = (np.zeros(shape, bool) for _ in range(4))
    unit = min(half)  # tumour sizes relative to the smallest half-extent, in voxels
    for _ in range(int(rng.integers(1, 4))):
        u = rng.standard_normal(3)
        u *= rng.uniform(0.0, 1.0) ** (1 / 3) / np.linalg.norm(u)
        centre = head_c + 0.5 * head_r * u
        r_wt = max(3.0, rng.uniform(0.24, 0.38) * unit)
        r_core = max(2.5, r_wt * rng.uniform(0.5, 0.72))
        aniso = rng.uniform(0.8, 1.25, 3)
        wt |= _ellipsoid(grid, centre, r_wt * aniso / half) + 0.25 * edema_noise < 1.0
        core_r = r_core * aniso * rng.uniform(0.9, 1.1, 3) / half
        d_core = _ellipsoid(grid, centre, core_r) + 0.12 * core_noise
        tc |= d_core < 1.0
        inner = min(rng.uniform(0.68, 0.85), 1.0 - 1.5 / r_core)  # rim >= ~1.5 voxels thick
        et |= (d_core < 1.0) & (d_core > inner)
        if centre[0] < head_c[0]:
            left |= d_core < 1.0
    wt &= brain
    tc &= ndimage.binary_erosion(wt)  # the core is always enveloped by edema
    et &= tc
    return wt, tc, et, left


def _modality(mrng: np.random.Generator, mod: int, clean: np.ndarray, label: np.ndarray,
              tumour: dict[int, np.ndarray], tumour_tex: np.ndarray, grid: list[np.ndarray],
              head: np.ndarray) -> np.ndarray:
    """One modality's channel: tumour intensities, partial-volume blur, bias field, gain and Rician noise
    (drawn from the modality's own stream ``mrng``), zero outside the head."""
    chan = clean[..., mod].copy()
    for lab, values in tumour.items():
        sel = label == lab
        v = values[mod]
        chan[sel] = chan[sel] * _HEALTHY_FACTOR[mod] if np.isnan(v) else v * tumour_tex[sel]
    chan = ndimage.gaussian_filter(chan, 0.6, truncate=3.0)  # partial-volume blur
    coef = mrng.normal(0.0, 0.12, 9)  # smooth quadratic bias field
    x, y, z = grid
    bias = np.exp(coef[0] * x + coef[1] * y + coef[2] * z + coef[3] * x * x + coef[4] * y * y
                  + coef[5] * z * z + coef[6] * x * y + coef[7] * y * z + coef[8] * x * z)
    chan *= bias * np.float32(mrng.uniform(0.9, 1.1))
    s = np.float32(_NOISE_SIGMA[mod])
    n1 = mrng.standard_normal(label.shape, dtype=np.float32)
    n2 = mrng.standard_normal(label.shape, dtype=np.float32)
    chan = np.sqrt((chan + s * n1) ** 2 + (s * n2) ** 2)  # Rician magnitude
    return np.where(head, np.maximum(chan, 1.0), 0.0)


def _case(seed: int, index: int, shape: tuple[int, int, int],
          channels: tuple[int, ...], context: str = "none") -> tuple[np.ndarray, np.ndarray]:
    """Synthesises one case: image (X, Y, Z, len(channels)) float32 and label (X, Y, Z) uint8."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    grid = _grid(shape)
    half = np.asarray(shape, dtype=np.float64) / 2.0
    sigma = max(1.5, min(shape) / 16.0)

    # Head, brain (head minus scalp shell) and ventricles.
    head_c = rng.uniform(-0.04, 0.04, 3)
    head_r = np.array([0.80, 0.88, 0.84]) * rng.uniform(0.9, 1.0) * rng.uniform(0.96, 1.04, 3)
    d_head = _ellipsoid(grid, head_c, head_r)
    head = d_head < 1.0
    brain = d_head < 1.0 - max(0.08, 2.5 / min(half))
    ventricles = np.zeros(shape, bool)
    for side in (-1.0, 1.0):
        vc = head_c + head_r * np.array([side * 0.13, -0.05, 0.1])
        vr = head_r * np.array([0.07, 0.28, 0.14]) * rng.uniform(0.8, 1.2, 3)
        ventricles |= _ellipsoid(grid, vc, vr) < 1.0
    ventricles &= brain

    # Grey/white matter: soft blend driven by smooth noise (texture).
    texture = _smooth_noise(rng, shape, sigma)
    wm_frac = 1.0 / (1.0 + np.exp(-3.0 * (texture - rng.uniform(-0.3, 0.3))))[..., None]
    clean = (wm_frac * _WM + (1.0 - wm_frac) * _GM).astype(np.float32)  # (X, Y, Z, 4)
    clean[ventricles] = _CSF
    clean[head & ~brain] = _SCALP

    wt, tc, et, left = _tumours(rng, grid, half, sigma, head_c, head_r, brain)
    tumour = _TUMOUR
    if context == "laterality":  # the whole core: enhancing on the left, non-enhancing on the right, alike
        et = tc & left
        tumour = {**_TUMOUR, 3: _TUMOUR[2]}
    label = np.zeros(shape, np.uint8)
    label[wt] = 1
    label[tc] = 2
    label[et] = 3

    image = np.empty((*shape, len(channels)), np.float32)
    tumour_tex = 1.0 + 0.06 * texture
    for out_c, mod in enumerate(channels):
        mrng = np.random.default_rng(np.random.SeedSequence([seed, index, 1000 + mod]))
        image[..., out_c] = _modality(mrng, mod, clean, label, tumour, tumour_tex, grid, head)
    return image, label


def _save(arr: np.ndarray, spacing: tuple[float, float, float], path: Path) -> None:
    """Saves ``arr`` as NIfTI with a diagonal ``spacing`` affine centred on the volume."""
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -np.asarray(arr.shape[:3]) * np.asarray(spacing) / 2.0
    img = nib.Nifti1Image(arr, affine)
    img.header.set_zooms(tuple(spacing) + (1.0,) * (arr.ndim - 3))
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def _resolve_modalities(layout: str, modalities: tuple[str, ...] | None) -> tuple[int, ...]:
    """Maps requested modality names (case-insensitive) to indices into MODALITIES."""
    lookup = {m.lower(): i for i, m in enumerate(MODALITIES)}
    names = tuple(MODALITIES if modalities is None else modalities)
    if not names:
        raise ValueError("modalities must name at least one modality")
    idx = []
    for name in names:
        if str(name).lower() not in lookup:
            raise ValueError(f"unknown modality {name!r}; choose from {list(MODALITIES)}")
        idx.append(lookup[str(name).lower()])
    if len(set(idx)) != len(idx):
        raise ValueError(f"duplicate modality in {list(names)}")
    return tuple(idx[:1]) if layout == "3d" else tuple(idx)


def _already_there(out: Path, overwrite: bool) -> bool:
    """Whether ``out`` already holds a dataset to reuse (generate on first use).

    Raises:
        FileExistsError: ``out`` exists, is not an empty folder and holds no dataset.json (and not
            ``overwrite``).
    """
    if (out / "dataset.json").is_file() and not overwrite:
        return True
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists but holds no dataset.json; pass overwrite=True to replace it")
    return False


@contextmanager
def _staged(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary sibling folder of ``out`` to write a dataset into. When the block succeeds it is renamed
    to ``out`` (an old ``out`` is moved aside first; a concurrent writer that finished first wins unless
    ``overwrite``); when it fails it is removed, so ``out`` is never half-written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():  # overwrite (or an empty folder): move the old one aside, then swap
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.replace(tmp, out)
        except OSError:
            if (out / "dataset.json").is_file() and not overwrite:  # a concurrent writer won the race
                shutil.rmtree(tmp, ignore_errors=True)
                return
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def generate_dataset(out: str | Path, cases: int = 24, shape: tuple[int, int, int] = (64, 64, 48),
                     spacing: tuple[float, float, float] = (1.0, 1.0, 1.0), seed: int = 0,
                     layout: str = "4d", modalities: tuple[str, ...] | None = None,
                     overwrite: bool = False, context: str = "none") -> Path:
    """Writes the dataset and returns its root (the folder holding dataset.json).

    Generation is atomic: everything is written into a temporary sibling folder that is then
    renamed to ``out``. If ``out/dataset.json`` already exists and ``overwrite`` is False, nothing
    is generated and ``out`` is returned (generate on first use).

    Args:
        out: Dataset root to create (MSD layout: dataset.json, imagesTr/, labelsTr/, imagesTs/).
        cases: Number of labelled training cases (>= 2); ``max(1, cases // 10)`` unlabelled test
            images are written as well.
        shape: Volume size (X, Y, Z) in voxels, each >= 16.
        spacing: Voxel size in mm, written to the affine and header zooms.
        seed: Non-negative base seed; case ``i`` uses ``SeedSequence([seed, i])``.
        layout: ``"4d"`` for (X, Y, Z, C) multi-modal images, ``"3d"`` for single-modality (X, Y, Z)
            images of the first selected modality.
        modalities: Subset of ``MODALITIES`` to write, in that order (names matched
            case-insensitively); None means all four.
        overwrite: Regenerate and replace ``out`` even if it already holds a dataset.
        context: ``"none"``, or ``"laterality"``: the tumour core's label depends on which half of the
            head it is in, not on how it looks (see the module docstring).

    Returns:
        The dataset root ``out`` as a Path.

    Raises:
        ValueError: On invalid arguments or unknown modality names.
        FileExistsError: If ``out`` exists, is not empty and holds no dataset.json (and not
            ``overwrite``), or is a file.
    """
    out = Path(out)
    shape, spacing = _check_arguments(cases, shape, spacing, seed, layout, context)
    channels = _resolve_modalities(layout, modalities)
    if _already_there(out, overwrite):
        return out
    with _staged(out, overwrite) as tmp:
        n_test, seed = max(1, cases // 10), int(seed)
        training, test = _write_cases(tmp, cases, n_test, seed, shape, spacing, layout, channels, context)
        meta = {"name": "SyntheticBraTS",
                "description": "Synthetic MSD Task01 BrainTumour-style data generated by lampseg.data.synth "
                               f"(seed={seed}, shape={list(shape)}, spacing={list(spacing)}, "
                               f"context={context})",
                "reference": "lampseg.data.synth", "licence": "CC-BY-SA 4.0", "release": "1.0",
                "tensorImageSize": "3D" if layout == "3d" else "4D",
                "modality": {str(k): MODALITIES[c] for k, c in enumerate(channels)},
                "labels": dict(LABELS), "numTraining": cases, "numTest": n_test,
                "training": training, "test": test}
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=4) + "\n")
    return out


def _check_arguments(cases: int, shape, spacing, seed: int, layout: str,
                     context: str) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """``generate_dataset``'s arguments checked (ValueError naming the first bad one); returns ``shape`` as
    ints and ``spacing`` as floats."""
    if int(cases) != cases or cases < 2:
        raise ValueError(f"cases must be an integer >= 2, got {cases!r}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"shape must be 3 integers each >= 16, got {shape!r}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be 3 positive numbers, got {spacing!r}")
    if layout not in ("4d", "3d"):
        raise ValueError(f"layout must be '4d' or '3d', got {layout!r}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if context not in CONTEXTS:
        raise ValueError(f"context must be one of {CONTEXTS}, got {context!r}")
    return shape, spacing


def _write_cases(root: Path, cases: int, n_test: int, seed: int, shape: tuple[int, int, int],
                 spacing: tuple[float, float, float], layout: str, channels: tuple[int, ...],
                 context: str) -> tuple[list[dict], list[str]]:
    """Writes ``cases`` labelled training cases then ``n_test`` unlabelled test images under ``root``;
    returns their ``training`` and ``test`` entries for dataset.json."""
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir()
    training, test = [], []
    for i in range(cases + n_test):
        image, label = _case(seed, i, shape, channels, context)
        if layout == "3d":
            image = image[..., 0]
        name = f"BRATS_{i + 1:03d}.nii.gz"
        if i < cases:
            _save(image, spacing, root / "imagesTr" / name)
            _save(label, spacing, root / "labelsTr" / name)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            _save(image, spacing, root / "imagesTs" / name)
            test.append(f"./imagesTs/{name}")
    return training, test


def generate_known_importance(out: str | Path, cases: int = 8, size: int = 24, seed: int = 0) -> Path:
    """A small MSD dataset whose modality importance is known by construction, for checking a
    leave-one-modality-out study (``lampseg loo``) on a short schedule.

    Each case (``size``^3, unit spacing) has one ball of label 1 ("alpha") and one of label 2 ("beta") on
    noise. Modality ``A`` alone shows label 1; ``B`` shows label 2; ``C`` shows label 2 faintly (contrast
    0.22 against B's 2.0, below the noise of 0.3). Leaving out A loses label 1 entirely; leaving out B
    loses most of label 2 (C recovers a little); leaving out C loses nothing. Importance: A > B > C.

    Returns:
        The dataset root (``out``).
    """
    out = Path(out)
    if _already_there(out, overwrite=False):
        return out
    with _staged(out) as root:
        rng = np.random.default_rng(seed)
        (root / "imagesTr").mkdir()
        (root / "labelsTr").mkdir()
        grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"))
        training = []
        for k in range(cases):
            label = np.zeros((size,) * 3, np.uint8)
            for value in (1, 2):
                while True:
                    centre = rng.uniform(5, size - 5, 3)
                    ball = ((grid - centre[:, None, None, None]) ** 2).sum(0) <= rng.uniform(3, 5) ** 2
                    if not (label[ball] > 0).any():
                        label[ball] = value
                        break
            noise = rng.normal(0, 0.3, (3, *label.shape))
            image = np.stack([2.0 * (label == 1), 2.0 * (label == 2), 0.22 * (label == 2)]) + noise + 1.0
            name = f"case_{k:02d}"
            image = np.moveaxis(image, 0, -1).astype(np.float32)
            _save(image, (1.0, 1.0, 1.0), root / "imagesTr" / f"{name}.nii.gz")
            _save(label, (1.0, 1.0, 1.0), root / "labelsTr" / f"{name}.nii.gz")
            training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
        (root / "dataset.json").write_text(json.dumps({
            "name": "KnownImportance", "modality": {"0": "A", "1": "B", "2": "C"},
            "labels": {"0": "background", "1": "alpha", "2": "beta"}, "numTraining": cases,
            "training": training, "test": []}))
    return out
