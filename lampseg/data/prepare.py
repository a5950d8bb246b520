"""From a config to training data: dataset root (synthetic on first use), cache, targets, channels, splits,
patch size and the training dataset. Knows nothing of the planner or the engine: under
``data.patch_size=auto`` the bundle comes back without a patch size (``DataBundle.patch_size`` is None), and
the planner decides it from ``DataBundle.train_shapes`` (``planner.patch.choose_patch_size``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lampseg.config import ConfigError, is_auto_patch, patch_size_of
from lampseg.data.cache import PreprocessConfig, PreprocessedDataset, build_cache
from lampseg.data.msd import DataError, MSDDataset, load_dataset
from lampseg.data.sampling import PatchDataset, Slab, build_augment, whole_volume_shape
from lampseg.data.splits import load_or_create_splits
from lampseg.data.synth import generate_dataset, generate_known_importance
from lampseg.model.losses import Targets
from lampseg.model.unet import size_divisor


def lampseg_home() -> Path:
    """Where generated datasets and preprocessing caches live: ``$LAMPSEG_HOME`` or ``~/.cache/lampseg``."""
    return Path(os.environ.get("LAMPSEG_HOME", Path.home() / ".cache" / "lampseg")).expanduser()


def dataset_root(data_cfg, log=print) -> Path:
    """``data.root``, or the default synthetic dataset (generated on first use)."""
    if data_cfg.root is not None:
        return Path(str(data_cfg.root)).expanduser()
    return synthetic_root(data_cfg, log)


def synthetic_root(data_cfg, log=print) -> Path:
    """The synthetic dataset ``data.synthetic`` describes, under ``lampseg_home()`` (made on first use)."""
    s = data_cfg.synthetic
    shape = "x".join(str(v) for v in s.shape)
    if s.kind == "known_importance":  # cubes of shape[0]; modalities A > B > C by construction
        root = lampseg_home() / "datasets" / f"known-importance-{s.cases}c-{s.shape[0]}-seed{s.seed}"
        if not (root / "dataset.json").is_file():
            log(f"generating the known-importance dataset ({s.cases} cases of {s.shape[0]}^3) -> {root}")
        return generate_known_importance(root, cases=s.cases, size=s.shape[0], seed=s.seed)
    context = "" if s.context == "none" else f"-{s.context}"
    root = lampseg_home() / "datasets" / f"synthetic-{s.layout}-{s.cases}c-{shape}-seed{s.seed}{context}"
    if not (root / "dataset.json").is_file():
        log(f"generating the synthetic dataset ({s.cases} cases of {shape}) -> {root}")
    return generate_dataset(root, cases=s.cases, shape=tuple(s.shape), seed=s.seed, layout=s.layout,
                            context=s.context)


def preprocess_config(data_cfg) -> PreprocessConfig:
    spacing = tuple(float(v) for v in data_cfg.target_spacing) if data_cfg.target_spacing else None
    return PreprocessConfig(target_spacing=spacing, nonfinite=data_cfg.nonfinite)


@dataclass
class DataBundle:
    """Everything the training loop needs to know about the data."""

    dataset: MSDDataset
    cache: PreprocessedDataset
    targets: Targets
    channels: list[int]
    train_cases: list[str]
    val_cases: list[str]
    patch_size: list[int] | None  # None until the planner decides data.patch_size=auto
    whole_volume: bool
    patch_decision: dict | None = None  # data.patch_size=auto: what was chosen and why

    @property
    def modality_names(self) -> list[str]:
        return [self.dataset.modalities[c] for c in self.channels]

    def train_shapes(self) -> list[list[int]]:
        """Spatial shapes of the (preprocessed) training cases."""
        return [list(self.cache.image(n).shape[-3:]) for n in self.train_cases]


def resolve_channels(dataset: MSDDataset, data_cfg) -> list[int]:
    """Channel indices for ``data.modalities`` (names or indices), with an error naming the key."""
    selection = list(data_cfg.modalities) if data_cfg.modalities is not None else None
    try:
        return dataset.modality_indices(selection)
    except DataError as e:
        raise ConfigError(f"config key 'data.modalities': {e}") from e


def resolve_targets(dataset: MSDDataset, data_cfg) -> Targets:
    try:
        return Targets.from_config(dataset.labels, data_cfg.regions)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def prepare_data(cfg, run_dir: Path, divisor: int, log=print) -> DataBundle:
    """Resolve, validate and preprocess the dataset, then split it into the configured fold.

    Args:
        cfg: the full config.
        run_dir: where ``splits.json`` goes.
        divisor: spatial multiple the network needs (patches and whole volumes must be multiples).
        log: where progress lines go.

    Returns:
        The data bundle for ``run``; without a patch size under ``data.patch_size=auto``.
    """
    d = cfg.data
    root = dataset_root(d, log)
    cache_root = Path(d.cache_dir).expanduser() if d.cache_dir else lampseg_home() / "preprocessed"
    try:
        dataset = load_dataset(root)
        channels = resolve_channels(dataset, d)
        targets = resolve_targets(dataset, d)
        cache = build_cache(dataset, cache_root, preprocess_config(d), log=log)
    except DataError as e:
        raise DataError(f"{e}\n(`python -m lampseg validate data.root={root}` lists every problem in the "
                        f"dataset at once)") from e
    try:
        splits = load_or_create_splits(run_dir, cache.cases, d.folds)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    fold = splits[d.fold]
    patch = patch_size_of(cfg)
    whole = patch is None and not is_auto_patch(cfg)
    if is_auto_patch(cfg):
        pass  # the planner decides (planner.patch.choose_patch_size)
    elif whole:
        patch = whole_volume_shape([cache.image(n).shape[-3:] for n in cache.cases], divisor)
    elif any(p % divisor for p in patch):
        raise ConfigError(f"config key 'data.patch_size': expected multiples of {divisor} (the product of "
                          f"model.strides), got {list(patch)}")
    else:
        report_small_cases(cache, patch, log)
    return DataBundle(dataset, cache, targets, channels, fold["train"], fold["val"], patch, whole)


def report_small_cases(cache, patch: list[int], log) -> None:
    """One line when preprocessed cases are smaller than the patch (they are zero-padded). When every case
    is, the dataset's volumes are simply smaller than the patch (the default synthetic dataset, cropped to
    its foreground, is): said once as information. When only some are, which is rarely what a user meant:
    a warning with examples."""
    shapes = {n: list(cache.image(n).shape[-3:]) for n in cache.cases}
    small = {n: s for n, s in shapes.items() if any(v < p for v, p in zip(s, patch))}
    if not small:
        return
    examples = ", ".join(f"{n} {s}" for n, s in list(small.items())[:3])
    examples += ", ..." if len(small) > 3 else ""
    if len(small) == len(shapes):
        log(f"info: all {len(small)} case(s) are smaller than data.patch_size {patch} after preprocessing "
            f"({examples}): patches are zero-padded around them (data.patch_size=whole trains on whole "
            f"cases instead)")
    else:
        log(f"warning: {len(small)} of {len(cache.cases)} case(s) are smaller than data.patch_size {patch} "
            f"after preprocessing ({examples}): patches are zero-padded")


def curriculum_phases(cfg, bundle: DataBundle) -> list[tuple[int, list[int], bool]]:
    """LAMP's curriculum as ``(first epoch, patch size, whole volume)`` phases.

    ``trainer.curriculum=[[64,64,64],[128,128,128],whole]`` with ``trainer.curriculum_epochs=[10,10,20]``
    trains 10 epochs on 64^3 patches, 10 on 128^3, then whole volumes (the last phase lasts until
    ``trainer.max_epochs``). Without a curriculum there is one phase: ``data.patch_size``.
    """
    curriculum = cfg.trainer.curriculum
    if curriculum is None:
        return [(1, list(bundle.patch_size), bundle.whole_volume)]
    whole = whole_volume_shape([bundle.cache.image(n).shape[-3:] for n in bundle.cache.cases],
                               size_divisor(cfg.model))
    phases, first = [], 1
    for patch, epochs in zip(curriculum, cfg.trainer.curriculum_epochs):
        is_whole = isinstance(patch, str)
        phases.append((first, whole if is_whole else [int(v) for v in patch], is_whole))
        first += int(epochs)
    return phases


def phase_at(phases: list[tuple[int, list[int], bool]], epoch: int) -> tuple[int, list[int], bool]:
    """The curriculum phase that ``epoch`` (1-based) belongs to."""
    return [p for p in phases if p[0] <= epoch][-1]


def training_dataset(cfg, bundle: DataBundle, slab: Slab | None = None) -> PatchDataset:
    """The epoch-seeded patch dataset for the training fold (``slab``: only this slab of each sample)."""
    return PatchDataset(bundle.cache, bundle.train_cases, bundle.patch_size, bundle.channels,
                        cfg.data.samples_per_epoch, cfg.data.foreground_ratio,
                        build_augment(cfg.data.augment), seed=cfg.seed, whole_volume=bundle.whole_volume,
                        flip_prob=cfg.data.augment.flip_prob, slab=slab)
