"""lampseg's steps that MONAI has no transform for, as MONAI transforms: an exported bundle's
``configs/inference.json`` names them (``python -m lampseg export ckpt=PATH out=DIR``), and then needs lampseg
installed (its metadata's ``required_packages_version`` says so).

    python -m monai.bundle run --config_file DIR/configs/inference.json --bundle_root DIR --dataset_dir IMAGES
"""
from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform, Resized

from lampseg.data.cache import resampled_shape
from lampseg.model.losses import Targets


class ResampleToSpacingd(Resized):
    """Resample to ``pixdim`` as ``data.cache.preprocess_array`` does (trilinear, ``align_corners=False``, to
    ``resampled_shape``); invertible (MONAI's ``Resize`` back to the original size, the same way
    ``restore_array`` resamples logits back).

    Args:
        keys: the keys of channel-first images (MetaTensors: their spacing comes from the affine).
        pixdim: the target spacing (mm), ``data.target_spacing``.
        allow_missing_keys: as MONAI's ``MapTransform``.
    """

    def __init__(self, keys, pixdim: Sequence[float], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, spatial_size=(1, 1, 1), mode="trilinear", align_corners=False,
                         allow_missing_keys=allow_missing_keys)
        self.pixdim = [float(p) for p in pixdim]

    def __call__(self, data: Mapping[Hashable, torch.Tensor], lazy: bool | None = None
                 ) -> dict[Hashable, torch.Tensor]:
        """Each key's image at ``pixdim`` (unchanged when its size already matches)."""
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            spacing = [float(s) for s in image.pixdim] if isinstance(image, MetaTensor) else [1.0] * 3
            self.resizer.spatial_size = resampled_shape(image.shape[1:], spacing, self.pixdim)
            d[key] = self.resizer(image, mode="trilinear", align_corners=False, lazy=False)
        return d


class RegionsToLabelsd(MapTransform):
    """Sigmoid-region logits (BraTS WT/TC/ET style, K channels) to one label map per key, painted as
    ``Targets.labels_from_logits`` paints them (WT -> 1, TC -> 2, ET -> 3).

    Args:
        keys: the keys holding logits (K, X, Y, Z).
        regions: [name, label values] per output channel, in training order (``data.regions``).
        allow_missing_keys: as MONAI's ``MapTransform``.
    """

    def __init__(self, keys, regions: Sequence[Sequence], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        pairs = [(str(name), [int(v) for v in values]) for name, values in regions]
        values = sorted({0, *(v for _, vs in pairs for v in vs)})
        self.targets = Targets.from_config({v: str(v) for v in values}, dict(pairs))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        """Each key's logits replaced by its (1, X, Y, Z) label map; a MetaTensor keeps its metadata."""
        d = dict(data)
        for key in self.key_iterator(d):
            logits = d[key].as_tensor() if isinstance(d[key], MetaTensor) else torch.as_tensor(d[key])
            labels = self.targets.labels_from_logits(logits[None])
            d[key] = MetaTensor(labels, affine=d[key].affine, meta=d[key].meta) \
                if isinstance(d[key], MetaTensor) else labels
        return d
