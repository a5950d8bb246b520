"""MONAI transforms that an exported bundle's ``configs/inference.json`` names where MONAI has none
(written by ``python -m lampseg export ckpt=PATH out=DIR``; the bundle then needs lampseg installed).

    python -m monai.bundle run --config_file DIR/configs/inference.json --bundle_root DIR --dataset_dir IMAGES
"""
from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform


def regions_to_labels(logits: torch.Tensor, regions: Sequence[tuple[str, Sequence[int]]]) -> torch.Tensor:
    """A (1, X, Y, Z) label map from region logits (K, X, Y, Z), as ``Targets.labels_from_logits`` paints it.

    Args:
        logits: one image's region logits (sigmoid > 0.5 is logit > 0), channel first.
        regions: (name, label values) per output channel, in the order the model was trained with.

    Returns:
        Label values (int64), channel first: regions painted in order, each with the value it holds that
        no later region holds (BraTS WT -> 1, TC -> 2, ET -> 3).
    """
    out = torch.zeros((1, *logits.shape[1:]), dtype=torch.long, device=logits.device)
    for i, (_, values) in enumerate(regions):
        later = {v for _, ws in regions[i + 1:] for v in ws}
        own = sorted(set(values) - later)
        out[0][logits[i] > 0] = own[0] if own else max(values)
    return out


class RegionsToLabelsd(MapTransform):
    """Region logits (sigmoid outputs, BraTS WT/TC/ET style) to one label map per key
    (``regions_to_labels``).

    Args:
        keys: the keys holding logits (K, X, Y, Z).
        regions: (name, label values) per output channel, in training order (``data.regions``).
        allow_missing_keys: as MONAI's ``MapTransform``.
    """

    def __init__(self, keys, regions: Sequence[Sequence], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.regions = [(str(name), [int(v) for v in values]) for name, values in regions]

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        """Replace each key's logits by its label map; a MetaTensor keeps its metadata."""
        d = dict(data)
        for key in self.key_iterator(d):
            logits = d[key].as_tensor() if isinstance(d[key], MetaTensor) else torch.as_tensor(d[key])
            labels = regions_to_labels(logits, self.regions)
            d[key] = MetaTensor(labels, affine=d[key].affine, meta=d[key].meta) \
                if isinstance(d[key], MetaTensor) else labels
        return d

