"""The files of a MONAI bundle made from a lampseg checkpoint (``configs/metadata.json``,
``configs/inference.json``, ``docs/README.md``), as plain data; ``commands/export.py`` writes them.

    python -m lampseg export ckpt=outputs/run/checkpoints/best.pt out=bundle

lampseg's preprocessing (``data.cache.preprocess_array``) maps onto MONAI transforms: channel selection
(``data.channels``), the crop to the box where any channel is nonzero (``CropForegroundd``), z-score over
nonzero voxels per channel (``NormalizeIntensityd``), resampling to ``data.target_spacing``,
whole-volume zero padding to the U-Net's divisor, centred (``DivisiblePadd``); ``Invertd`` undoes them on
the logits, which then become labels as ``Targets.labels_from_logits`` makes them. Resampling and sigmoid
regions are lampseg's own transforms (``lampseg.data.transforms``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from lampseg import __version__
from lampseg.config import enum_value
from lampseg.model.losses import Targets
from lampseg.model.unet import size_divisor

BUNDLE_VERSION = "0.1.0"
META_SCHEMA = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
               "meta_schema_20240725.json")
RUN_COMMAND = ("python -m monai.bundle run --config_file {out}/configs/inference.json --bundle_root {out} "
               "--dataset_dir IMAGES --output_dir OUTPUT")
VERIFY_COMMAND = ("python -m monai.bundle verify_net_in_out network_def "
                  "--meta_file {out}/configs/metadata.json --config_file {out}/configs/inference.json")
# The Model Zoo's configs/logging.conf (monai.bundle run warns without one).
LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


@dataclass(frozen=True)
class BundleModel:
    """What the bundle's files are made from: the checkpoint's config and data info, resolved.

    Attributes:
        cfg: the checkpoint's config (with the export's changes).
        info: the checkpoint's ``data`` entry (modalities, channels, labels, patch_size).
        targets: labels or regions the outputs stand for.
        mode: ``whole`` or ``sliding`` (``inference.mode=auto`` exports as whole).
        min_multiple: the smallest multiple of the divisor the network runs at (instance norm needs more
            than one voxel at the bottom level).
    """

    cfg: DictConfig
    info: dict
    targets: Targets
    mode: str
    min_multiple: int = 1

    @property
    def divisor(self) -> int:
        return size_divisor(self.cfg.model)

    @property
    def modalities(self) -> list[str]:
        return [self.info["modalities"][c] for c in self.info["channels"]]

    @property
    def roi_size(self) -> list[int]:
        patch = self.cfg.inference.patch_size
        return list(patch if patch is not None else self.info["patch_size"])


def inference_mode(cfg: DictConfig, info: dict) -> str:
    """``whole`` or ``sliding``: ``inference.mode``, with ``auto`` (and sliding without a window) as whole."""
    mode = enum_value(cfg.inference.mode)
    has_window = cfg.inference.patch_size is not None or info.get("patch_size") is not None
    return "sliding" if mode == "sliding" and has_window else "whole"


def network_def(cfg: DictConfig, in_channels: int, out_channels: int) -> dict:
    """``monai.networks.nets.UNet`` with ``model.unet.build_model``'s arguments, as a bundle config entry."""
    m = cfg.model
    norm: Any = enum_value(m.norm)
    if norm == "group":
        norm = ["group", {"num_groups": math.gcd(8, min(m.channels))}]
    return {"_target_": "monai.networks.nets.UNet", "spatial_dims": 3, "in_channels": in_channels,
            "out_channels": out_channels, "channels": list(m.channels), "strides": list(m.strides),
            "kernel_size": m.kernel_size, "up_kernel_size": m.kernel_size,
            "num_res_units": m.num_res_units, "norm": norm, "dropout": m.dropout}


def _preprocessing(b: BundleModel) -> list[dict]:
    """MONAI transforms doing ``preprocess_array``'s steps in its order (image key ``image``)."""
    steps: list[dict] = [{"_target_": "LoadImaged", "keys": "image"},
                         {"_target_": "EnsureChannelFirstd", "keys": "image"}]
    channels = [int(c) for c in b.info["channels"]]
    if channels != list(range(len(b.info["modalities"]))):
        steps.append({"_target_": "Lambdad", "keys": "image", "func": f"$lambda x: x[{channels}]"})
    steps += [{"_target_": "CropForegroundd", "keys": "image", "source_key": "image",
               # an image without a nonzero voxel is kept whole, as preprocess_array keeps it
               "select_fn": "$lambda x: (x != 0) | (x == 0).all()", "margin": 0, "allow_smaller": True},
              {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True}]
    spacing = b.cfg.data.target_spacing
    if spacing is not None:
        # MONAI's Spacingd samples another grid (voxel centres kept, not the volume's edges); this is
        # preprocess_array's resampling, invertible.
        steps.append({"_target_": "lampseg.data.transforms.ResampleToSpacingd", "keys": "image",
                      "pixdim": [float(s) for s in spacing]})
    if b.mode == "whole":
        steps.append({"_target_": "DivisiblePadd", "keys": "image", "k": b.divisor, "method": "symmetric"})
    steps.append({"_target_": "EnsureTyped", "keys": "image"})
    return steps


def _postprocessing(b: BundleModel) -> list[dict]:
    """Logits back to the input's grid (``Invertd``), then labels, then NIfTIs."""
    steps: list[dict] = [{"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing",
                          "orig_keys": "image", "nearest_interp": False, "to_tensor": True}]
    t = b.targets
    if t.regions is not None:
        steps.append({"_target_": "lampseg.data.transforms.RegionsToLabelsd", "keys": "pred",
                      "regions": [[name, list(values)] for name, values in t.regions]})
    else:
        steps += [{"_target_": "Activationsd", "keys": "pred", "softmax": True},
                  {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}]
        if t.label_values != tuple(range(len(t.label_values))):
            steps.append({"_target_": "MapLabelValued", "keys": "pred",
                          "orig_labels": list(range(len(t.label_values))),
                          "target_labels": list(t.label_values)})
    steps.append({"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir",
                  "output_postfix": "seg", "output_dtype": "$numpy.uint8", "resample": False,
                  "separate_folder": False, "squeeze_end_dims": True})
    return steps


def _inferer(b: BundleModel) -> dict:
    if b.mode == "whole":
        return {"_target_": "SimpleInferer"}
    i = b.cfg.inference
    return {"_target_": "SlidingWindowInferer", "roi_size": b.roi_size, "sw_batch_size": i.sw_batch_size,
            "overlap": i.overlap, "mode": enum_value(i.blend), "padding_mode": "constant", "cval": 0.0}


def inference_config(b: BundleModel) -> dict:
    """``configs/inference.json``: the Model Zoo's keys, ``monai.bundle run`` segments ``dataset_dir``."""
    return {
        "imports": ["$import collections", "$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "$@bundle_root + '/images'",
        "datalist": "$list(sorted(glob.glob(os.path.join(@dataset_dir, '*.nii.gz'))))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "ckpt_path": "$@bundle_root + '/models/model.pt'",
        "network_def": network_def(b.cfg, len(b.info["channels"]), b.targets.out_channels),
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": _preprocessing(b)},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": _inferer(b),
        "postprocessing": {"_target_": "Compose", "transforms": _postprocessing(b)},
        # The Model Zoo's evaluator needs pytorch-ignite: `monai.bundle run run_evaluator ...` uses it; `run`
        # does the same (decollate, postprocessing per image) without it.
        "handlers": [{"_target_": "StatsHandler", "iteration_log": False}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device",
                      "val_data_loader": "@dataloader", "network": "@network", "inferer": "@inferer",
                      "postprocessing": "@postprocessing", "val_handlers": "@handlers", "amp": False},
        "initialize": ["$monai.utils.set_determinism(seed=0)",
                       "$@network.load_state_dict(torch.load(@ckpt_path, map_location=@device, "
                       "weights_only=True))",
                       "$@network.eval()"],
        "run": ["$torch.set_grad_enabled(False)",
                "$collections.deque((@postprocessing(item) for batch in @dataloader for item in "
                "monai.data.decollate_batch({'image': batch['image'], "
                "'pred': @inferer(batch['image'].to(@device), @network)})), maxlen=0)"],
        "run_evaluator": ["$torch.set_grad_enabled(False)", "$@evaluator.run()"],
    }


def _spatial_shape(b: BundleModel) -> list[str]:
    """Sizes the network accepts as MONAI writes them: ``"16*n"`` (``"16*(n+1)"`` when one multiple of the
    divisor is too small)."""
    d, m = b.divisor, b.min_multiple
    return [f"{d}*n" if m == 1 else f"{d}*(n+{m - 1})"] * 3


def uses_lampseg_transforms(b: BundleModel) -> bool:
    """Whether ``inference.json`` names ``lampseg.data.transforms`` (resampling, sigmoid regions)."""
    return b.targets.regions is not None or b.cfg.data.target_spacing is not None


def _modality(b: BundleModel) -> str:
    """``CT`` when every input channel is named CT (MSD's CT tasks), else ``MR``."""
    return "CT" if all(name.upper() == "CT" for name in b.modalities) else "MR"


def metadata(b: BundleModel, versions: dict[str, str], changelog: str, dice: float | None) -> dict:
    """``configs/metadata.json`` in MONAI's bundle metadata schema.

    Args:
        b: the model.
        versions: ``monai``, ``torch``, ``numpy``, ``nibabel``, ``lampseg`` versions.
        changelog: this version's line.
        dice: the checkpoint's best mean validation Dice (None: not recorded).
    """
    t, labels = b.targets, {str(k): v for k, v in b.info["labels"].items()}
    if t.regions is not None:
        out_def = {str(i): f"{name} (labels {list(vs)})" for i, (name, vs) in enumerate(t.regions)}
    else:
        out_def = {str(i): labels[str(v)] for i, v in enumerate(t.label_values)}
    shape, patch = _spatial_shape(b), b.mode == "sliding"
    uses_lampseg = uses_lampseg_transforms(b)
    return {
        "schema": META_SCHEMA, "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: changelog},
        "monai_version": versions["monai"], "pytorch_version": versions["torch"],
        "numpy_version": versions["numpy"],
        # MONAI 1.6 reads optional_packages_version as a deprecated name of required_packages_version
        # (and replaces the latter with it): lampseg, where a transform of it is named, goes here.
        "required_packages_version": {"nibabel": versions["nibabel"],
                                      **({"lampseg": versions["lampseg"]} if uses_lampseg else {})},
        "name": f"lampseg {b.cfg.model.name}",
        "task": f"3D segmentation of {', '.join(t.names)} from {', '.join(b.modalities)}",
        "description": f"A MONAI 3D U-Net trained with lampseg ({b.cfg.trainer.max_epochs} epochs); "
                       f"{'sigmoid regions' if t.regions is not None else 'softmax over labels'}, "
                       f"{b.mode}-volume inference{' (sliding windows)' if patch else ''}.",
        "authors": "lampseg export", "copyright": "Copyright (c) the model's trainers",
        "data_type": "nibabel", "image_classes": f"{len(b.modalities)} channel(s): "
                                                  f"{', '.join(b.modalities)}",
        "label_classes": ", ".join(f"{k}: {v}" for k, v in labels.items()),
        "pred_classes": ", ".join(f"{k}: {v}" for k, v in labels.items()),
        "eval_metrics": {"val_mean_dice": dice} if dice is not None else {},
        "intended_use": "research only",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "magnitude", "modality": _modality(b),
                                 "num_channels": len(b.modalities), "spatial_shape": shape,
                                 "dtype": "float32", "value_range": [], "is_patch_data": patch,
                                 "channel_def": {str(i): n for i, n in enumerate(b.modalities)}}},
            "outputs": {"pred": {"type": "image", "format": "segmentation",
                                 "num_channels": t.out_channels, "spatial_shape": shape, "dtype": "float32",
                                 "value_range": [], "is_patch_data": patch, "channel_def": out_def}},
        },
    }


def training_summary(ckpt: dict, summary: dict | None) -> dict:
    """How the checkpoint was trained, for the README: epochs, precision, layout, validation Dice (the
    checkpoint's ``train_state``, else the run's ``summary.json``)."""
    state, cfg = ckpt.get("train_state") or {}, ckpt["config"]
    p = cfg.get("parallel", {})
    best = state.get("best_metrics") or {}
    dice = state.get("best_val_dice") if state.get("best_epoch") is not None else None
    if dice is None and summary:
        dice = summary.get("best_val_dice")
    per_label = {k[len("dice_"):]: v for k, v in best.items() if k.startswith("dice_")}
    if not per_label and summary:
        per_label = {k: v for k, v in (summary.get("val_dice") or {}).items() if v is not None}
    return {"epoch": ckpt.get("epoch"), "max_epochs": cfg["trainer"]["max_epochs"],
            "precision": ckpt.get("precision", cfg["trainer"]["precision"]),
            "layout": f"{p.get('name')} (dp={p.get('dp')}, pp={p.get('pp')}, sp={p.get('sp')})",
            "best_epoch": state.get("best_epoch"), "dice": dice, "dice_per_label": per_label}


def readme(b: BundleModel, trained: dict, source: str) -> str:
    """``docs/README.md``: how the model was trained, its inputs and outputs, the commands that run it.

    Args:
        b: the model.
        trained: ``training_summary``'s dict.
        source: the checkpoint's file name (no user path).
    """
    m, d, o = b.cfg.model, b.cfg.data, b.cfg.optim
    dice = "not recorded (no validation ran)" if trained["dice"] is None else \
        f"{trained['dice']:.4f} (mean, best epoch {trained['best_epoch']})"
    per_label = "".join(f"\n  - {k}: {v:.4f}" for k, v in trained["dice_per_label"].items())
    spacing = "the image's own (no resampling)" if d.target_spacing is None else \
        f"resampled to {list(d.target_spacing)} mm (`lampseg.data.transforms.ResampleToSpacingd`), the " \
        f"logits resampled back"
    labels = ", ".join(f"{k} = {v}" for k, v in b.info["labels"].items())
    regions = "" if b.targets.regions is None else (
        "\n- the network predicts sigmoid regions (" + ", ".join(f"{n}: labels {list(vs)}" for n, vs in
                                                                 b.targets.regions)
        + "); `lampseg.data.transforms.RegionsToLabelsd` paints them back into labels")
    needs = "\n\nThis bundle names transforms of `lampseg.data.transforms`: it needs lampseg " \
        f"{__version__} installed (`required_packages_version`)." if uses_lampseg_transforms(b) else ""
    window = f"sliding windows of {b.roi_size} (overlap {b.cfg.inference.overlap}, " \
             f"{enum_value(b.cfg.inference.blend)} blending)" if b.mode == "sliding" else \
        f"the whole volume at once, zero-padded (centred) to multiples of {b.divisor}"
    window += f" (`inference.mode={enum_value(b.cfg.inference.mode)}`; `lampseg export ... " \
              f"inference.mode=sliding|whole` chooses)"
    return f"""# {m.name}: {', '.join(b.targets.names)} segmentation (exported from lampseg)

A MONAI 3D U-Net trained with lampseg, exported with `python -m lampseg export` from `{source}`.

## Training
- model: `{m.name}`, MONAI UNet, channels {list(m.channels)}, strides {list(m.strides)},
  {m.num_res_units} residual unit(s), kernel {m.kernel_size}, {enum_value(m.norm)} norm, dropout {m.dropout}
- epochs: {trained['epoch']} of {trained['max_epochs']}; precision {trained['precision']};
  layout {trained['layout']}
- optimiser: {enum_value(o.name)}, lr {o.lr}, loss {enum_value(o.loss)};
  patch {b.info.get('patch_size')}, batch {d.batch_size}, fold {d.fold} of {d.folds}
- validation Dice: {dice}{per_label}

## Inputs
- one NIfTI per case (`*.nii.gz` in the dataset folder), 3D (X, Y, Z) or 4D (X, Y, Z, C) with the channels
  in this order: {', '.join(f'{i}: {n}' for i, n in enumerate(b.modalities))}
  (of the training set's {', '.join(b.info['modalities'])})
- spacing: {spacing}; the voxel axes are used as stored (no reorientation, as lampseg
  trained)
- preprocessing: crop to the box where any channel is nonzero, z-score per channel over nonzero voxels
- inference: {window}; the network accepts sizes that are multiples of {b.divisor}, at least
  {b.divisor * b.min_multiple}

## Outputs
- `OUTPUT/<case>_seg.nii.gz`: uint8 labels ({labels}) on the input's grid and
  affine{regions}{needs}

## Commands
```
{VERIFY_COMMAND.format(out='BUNDLE')}
{RUN_COMMAND.format(out='BUNDLE')}
```
`python -m monai.bundle` needs `fire` (`pip install fire`). `run` segments every `IMAGES/*.nii.gz` without
pytorch-ignite; `run run_evaluator` does the same through MONAI's `SupervisedEvaluator` (needs
pytorch-ignite). TorchScript: `torch.jit.load("BUNDLE/models/model.ts")` gives the logits
(1, {b.targets.out_channels}, X, Y, Z) of a preprocessed (1, {len(b.modalities)}, X, Y, Z) image.

## Differences from `python -m lampseg predict`
- runs in float32 (training precision: {trained['precision']}); no test-time augmentation
  (`inference.tta` was {b.cfg.inference.tta})
- `NormalizeIntensityd(nonzero=True)` takes each channel's own nonzero voxels, lampseg the voxels where any
  channel is nonzero: the same wherever the modalities share one mask (skull-stripped MR)
- NaN/Inf voxels are not checked (lampseg: `data.nonfinite={d.nonfinite}`)
"""
