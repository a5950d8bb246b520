"""Validation during training, ``evaluate`` (eval.json) and ``predict`` (NIfTI in the input's space).

    python -m lampseg evaluate ckpt=outputs/run/checkpoints/best.pt inference.mode=sliding
    python -m lampseg predict ckpt=outputs/run/checkpoints/best.pt input=imagesTs output=preds
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from omegaconf import OmegaConf

from lampseg.config import Config, ConfigError, enum_value
from lampseg.data.cache import preprocess_array, restore_array
from lampseg.data.msd import check_finite, read_image
from lampseg.engine.auto import CasePeakMemory, inference_memory
from lampseg.engine.checkpoint import load_checkpoint
from lampseg.engine.inference import infer
from lampseg.engine.logs import write_json
from lampseg.engine.metrics import dice_hd95, summarize
from lampseg.io import atomic_write_bytes
from lampseg.model.losses import Targets
from lampseg.model.unet import build_model, size_divisor
from lampseg.parallel import distributed


def roi_size(cfg, patch_size: list[int]) -> list[int]:
    """Sliding-window size: ``inference.patch_size``, or the training patch."""
    return list(cfg.inference.patch_size) if cfg.inference.patch_size is not None else list(patch_size)


def evaluate_cases(model, bundle, cases: list[str], cfg, device: torch.device, dims=None,
                   on_logits: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None
                   ) -> tuple[list[dict], dict]:
    """Dice/HD95 per case (in preprocessed space, spacing from the cache metadata) and their means.

    With data parallelism each replica evaluates every ``dp``-th case and the results are gathered, so
    every rank returns the same per-case list (in the order of ``cases``) and means.

    Args:
        model: the network (not DDP-wrapped); put in eval mode here and left in eval mode.
        bundle: the ``DataBundle`` (cache, targets, channels, patch size).
        cases: case names to evaluate.
        cfg: the config (``inference.*``, ``trainer.precision``, ``trainer.hd95``).
        device: where to run.
        dims: the run's ``ParallelDims`` (None: one process evaluates everything).
        on_logits: called with each case this process infers: its name, image (1, C, X, Y, Z) and logits
            (training draws overlays from them without a second inference).

    Returns:
        (per-case dicts with ``case``, ``dice``, ``hd95``, ``seconds``; means from ``metrics.summarize``).
    """
    model.eval()
    names, per_case = bundle.targets.names, []
    divisor = size_divisor(cfg.model)
    memory = inference_memory(cfg, len(bundle.channels), bundle.targets.out_channels, device)
    shard = cases[dims.dp_rank::dims.dp] if dims is not None and dims.dp_enabled else cases
    for name in shard:
        start = time.perf_counter()
        image = case_image(bundle, name).to(device)
        report = {"mode": enum_value(cfg.inference.mode)}
        with CasePeakMemory(device) as peak:
            logits = infer(model, image, cfg.inference, roi_size(cfg, bundle.patch_size), divisor,
                           cfg.trainer.precision, memory, report)
        dice, hd = case_scores(bundle, name, logits, cfg.trainer.hd95)
        if on_logits is not None:
            on_logits(name, image, logits)
        per_case.append({"case": name, "dice": dict(zip(names, dice)), "hd95": dict(zip(names, hd)),
                         "seconds": time.perf_counter() - start, "inference": report, **peak.report()})
    if dims is not None and dims.dp_enabled:
        order = {name: k for k, name in enumerate(cases)}
        per_case = sorted(dims.dp_gather(per_case), key=lambda c: order[c["case"]])
    return per_case, summarize(per_case, names)


def case_image(bundle, name: str) -> torch.Tensor:
    """A cached case's selected channels as a (1, C, X, Y, Z) tensor (preprocessed space)."""
    return torch.from_numpy(np.stack([bundle.cache.image(name)[c] for c in bundle.channels]))[None]


def case_scores(bundle, name: str, logits: torch.Tensor, with_hd95: bool) -> tuple[list[float], list[float]]:
    """Dice and HD95 (mm, spacing from the cache metadata) per region/label of ``logits`` for a cached case.

    Args:
        bundle: the ``DataBundle``.
        name: the case.
        logits: (1, K, X, Y, Z) network outputs in the case's preprocessed space.
        with_hd95: compute HD95 (NaN otherwise).
    """
    label = torch.from_numpy(np.array(bundle.cache.label(name)))[None, None].to(logits.device)
    meta = bundle.cache.meta(name)
    return dice_hd95(bundle.targets.masks_from_logits(logits)[0], bundle.targets.masks_from_labels(label)[0],
                     meta.get("target_spacing") or meta["spacing"], with_hd95)


def config_from_checkpoint(ckpt: dict, cfg, overrides: list[str]):
    """The checkpoint's training config, with the keys overridden on the command line taken from ``cfg``.

    Args:
        ckpt: a loaded checkpoint (holds ``config``).
        cfg: the config composed for this command.
        overrides: the command-line overrides (``key=value`` or ``group=option``).
    """
    merged = OmegaConf.merge(OmegaConf.structured(Config), ckpt["config"])
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if key.startswith("hydra") or key == "exp":
            continue
        OmegaConf.update(merged, key, OmegaConf.select(cfg, key), merge=False)
    for key in ("run_dir", "ckpt", "input", "output", "split", "overwrite"):
        OmegaConf.update(merged, key, cfg[key], merge=False)
    return merged


def load_model(ckpt: dict, cfg):
    """Rebuild the network of a checkpoint, load its weights (unsplit names) and apply ``cfg.parallel``
    (pipeline stages when ``parallel=pipeline``; under torchrun this rank's stage), in eval mode.

    Returns:
        (the module to run, the targets, this process's device, the run's ``ParallelDims``).
    """
    from lampseg.engine.train import resolve_device
    from lampseg.parallel.dims import resolve_dims
    from lampseg.parallel.memory import keep_freed_cpu_memory
    from lampseg.parallel.parallelize import parallelize

    dims = resolve_dims(cfg)  # under torchrun: joins the job first, so the device is this rank's
    device = distributed.local_device(resolve_device(cfg.trainer.device))
    if device.type == "cpu" and cfg.trainer.cache_cpu_memory:
        keep_freed_cpu_memory()
    info = ckpt["data"]
    targets = Targets.from_config({int(k): v for k, v in info["labels"].items()}, cfg.data.regions)
    model = build_model(cfg.model, len(info["channels"]), targets.out_channels)
    model.load_state_dict(ckpt["model"])
    if cfg.trainer.channels_last:  # as trained: the faster 3D convolution layout (bf16 on CPU especially)
        model = model.to(memory_format=torch.channels_last_3d)
    net, _ = parallelize(model.to(device), dims, cfg, [len(info["channels"]), *info["patch_size"]], device,
                         train=False)
    return net.eval(), targets, device, dims


def run_evaluate(cfg, overrides: list[str], log=print) -> dict:
    """``evaluate ckpt=...``: metrics of a checkpoint on the validation fold (``split=val``), the training
    fold (``split=train``) or all cases (``split=all``); writes ``eval.json`` in ``run_dir``."""
    from lampseg.data.pipeline import prepare_data

    if cfg.ckpt is None:
        raise ConfigError("config key 'ckpt': expected the path of a checkpoint (ckpt=PATH), got None")
    ckpt = load_checkpoint(cfg.ckpt)
    cfg = config_from_checkpoint(ckpt, cfg, overrides)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model, _, device, dims = load_model(ckpt, cfg)  # under torchrun: this rank's pipeline stage
    main = distributed.is_main()
    log = log if main else (lambda *_: None)
    with distributed.main_first():
        bundle = prepare_data(cfg, run_dir, size_divisor(cfg.model), log)
    cases = {"val": bundle.val_cases, "train": bundle.train_cases,
             "all": bundle.train_cases + bundle.val_cases}[cfg.split]
    per_case, means = evaluate_cases(model, bundle, sorted(cases), cfg, device, dims)
    result = {"ckpt": str(cfg.ckpt), "split": cfg.split,
              "inference": OmegaConf.to_container(cfg.inference, enum_to_str=True),
              "parallel": OmegaConf.to_container(cfg.parallel), "mean": means,
              "seconds_per_case": float(np.mean([c["seconds"] for c in per_case])), "cases": per_case}
    if main:
        write_json(run_dir / "eval.json", result)
    names = bundle.targets.names
    log(f"evaluated {len(per_case)} cases: mean Dice {means['dice']:.4f} ("
        + ", ".join(f"{n} {means[f'dice_{n}']:.4f}" for n in names)
        + f"), {result['seconds_per_case']:.2f} s/case -> {run_dir / 'eval.json'}")
    return result


def _nifti_inputs(path: Path) -> list[Path]:
    if path.is_dir():
        # Hidden files are skipped: MSD's archives carry macOS "._BRATS_001.nii.gz" resource forks.
        files = sorted(p for p in path.iterdir()
                       if p.name.endswith((".nii.gz", ".nii")) and not p.name.startswith("."))
        if not files:
            raise ConfigError(f"config key 'input': no .nii/.nii.gz files in {path}")
        return files
    if not path.is_file():
        raise ConfigError(f"config key 'input': {path} does not exist")
    return [path]


def run_predict(cfg, overrides: list[str], log=print) -> list[Path]:
    """``predict ckpt=... input=FILE_OR_DIR output=DIR``: label NIfTIs in each input's original space
    (preprocessing undone, the input's affine and header kept)."""
    from lampseg.data.pipeline import preprocess_config

    for key in ("ckpt", "input", "output"):
        if cfg[key] is None:
            raise ConfigError(f"config key '{key}': expected a path ({key}=PATH), got None")
    ckpt = load_checkpoint(cfg.ckpt)
    cfg = config_from_checkpoint(ckpt, cfg, overrides)
    model, targets, device, dims = load_model(ckpt, cfg)
    # Under torchrun each data-parallel replica segments every dp-th image; the first stage of each
    # replica writes its images (rank 0's replica logs).
    writer = dims.mesh.get_local_rank("pp") == 0 if dims.mesh is not None else True
    log = log if distributed.is_main() else (lambda *_: None)
    info, out_dir = ckpt["data"], Path(cfg.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    memory = inference_memory(cfg, len(info["channels"]), targets.out_channels, device)
    written, skipped = [], 0
    for path in _nifti_inputs(Path(cfg.input))[dims.dp_rank::dims.dp]:
        start = time.perf_counter()
        target = out_dir / path.name
        if target.exists() and not cfg.overwrite:  # written atomically: present means finished
            written.append(target)
            skipped += 1
            continue
        image, img = read_image(path, len(info["modalities"]))
        image = check_finite(image, path, cfg.data.nonfinite)
        spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
        pre, _, meta = preprocess_array(image[info["channels"]], None, spacing, preprocess_config(cfg.data))
        report = {"mode": enum_value(cfg.inference.mode)}
        logits = infer(model, torch.from_numpy(pre)[None].to(device), cfg.inference,
                       roi_size(cfg, info["patch_size"]), size_divisor(cfg.model), cfg.trainer.precision,
                       memory, report)
        restored = restore_array(logits[0].cpu().numpy(), meta)
        seg = targets.labels_from_logits(torch.from_numpy(restored)[None])[0].numpy().astype(np.uint8)
        header = img.header.copy()
        header.set_data_dtype(np.uint8)
        if len(header.get_data_shape()) == 4:
            header.set_data_shape(seg.shape)
        out = nib.Nifti1Image(seg, img.affine, header)
        if writer:
            atomic_write_bytes(target, _nifti_bytes(out, target.name))
        written.append(target)
        window = f" {report['window']}" if report.get("window") else ""
        log(f"{path.name}: {time.perf_counter() - start:.2f} s ({report['mode']}{window}) -> {target}")
    if skipped:
        log(f"skipped {skipped} input(s) whose prediction was already in {out_dir} "
            f"(overwrite=true redoes them)")
    return written


def _nifti_bytes(image: nib.Nifti1Image, name: str) -> bytes:
    """Serialise a NIfTI image (gzipped when ``name`` ends in .gz) so it can be written atomically."""
    import gzip
    import io

    buffer = io.BytesIO()
    file_map = nib.Nifti1Image.make_file_map({"image": buffer, "header": buffer})
    image.to_file_map(file_map)
    data = buffer.getvalue()
    return gzip.compress(data, compresslevel=1) if name.endswith(".gz") else data
