"""Targets (per-label softmax or nested regions) and segmentation losses.

``Targets`` is the single place that knows how integer label maps become training targets, metric
masks and back: per-label softmax when ``data.regions`` is null (names from ``dataset.json``), sigmoid
regions otherwise (e.g. BraTS WT/TC/ET).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from monai.losses import DiceCELoss, DiceFocalLoss
from torch import nn

from lampseg.config import enum_value


@dataclass(frozen=True)
class Targets:
    """How labels map to network outputs and metric masks.

    Args:
        label_values: every label value declared in dataset.json, background (0) first.
        label_names: names of those values, same order.
        regions: region name -> label values, or None for per-label softmax.
    """

    label_values: tuple[int, ...]
    label_names: tuple[str, ...]
    regions: tuple[tuple[str, tuple[int, ...]], ...] | None = None

    @classmethod
    def from_config(cls, labels: dict[int, str], regions) -> Targets:
        """Build from dataset.json labels (value -> name) and the ``data.regions`` config (or None)."""
        values = tuple(sorted(labels))
        if values[0] != 0:
            raise ValueError(f"dataset.json labels must declare background 0, got values {list(values)}")
        region_items = None
        if regions is not None:
            region_items = tuple((str(k), tuple(int(v) for v in vs)) for k, vs in regions.items())
            for name, vs in region_items:
                unknown = sorted(set(vs) - set(values))
                if unknown or 0 in vs:
                    raise ValueError(f"config key 'data.regions.{name}': label values {unknown or [0]} are "
                                     f"not foreground labels declared in dataset.json {list(values[1:])}")
        return cls(values, tuple(labels[v] for v in values), region_items)

    @property
    def region_based(self) -> bool:
        return self.regions is not None

    @property
    def names(self) -> list[str]:
        """Metric names: regions, or foreground label names."""
        if self.regions is not None:
            return [name for name, _ in self.regions]
        return list(self.label_names[1:])

    @property
    def out_channels(self) -> int:
        return len(self.regions) if self.regions is not None else len(self.label_values)

    def class_index(self, label: torch.Tensor) -> torch.Tensor:
        """Map label values (any integers) to contiguous class indices 0..K-1."""
        if self.label_values == tuple(range(len(self.label_values))):  # already indices: no lookup per step
            return label.long()
        lut = torch.zeros(max(self.label_values) + 1, dtype=torch.long, device=label.device)
        lut[torch.tensor(self.label_values, device=label.device)] = torch.arange(len(self.label_values),
                                                                                 device=label.device)
        return lut[label.long()]

    def loss_target(self, label: torch.Tensor) -> torch.Tensor:
        """Loss target from a (B,1,X,Y,Z) label map: float region masks or class indices."""
        if self.regions is not None:
            return self.masks_from_labels(label).float()
        return self.class_index(label)

    def masks_from_labels(self, label: torch.Tensor) -> torch.Tensor:
        """Boolean (B,N,X,Y,Z) masks, one per metric name, from a (B,1,X,Y,Z) label map."""
        if self.regions is not None:
            return torch.cat([torch.isin(label, torch.tensor(vs, device=label.device))
                              for _, vs in self.regions], dim=1)
        return torch.cat([label == v for v in self.label_values[1:]], dim=1)

    def masks_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Boolean (B,N,X,Y,Z) masks from network outputs (sigmoid > 0.5, or softmax argmax)."""
        if self.regions is not None:
            return logits > 0
        cls = logits.argmax(1, keepdim=True)
        return torch.cat([cls == i for i in range(1, len(self.label_values))], dim=1)

    def background_logits(self) -> list[float]:
        """Logits, one per output channel, that ``labels_from_logits`` maps to background: every region
        off (sigmoid regions), or background-certain (softmax)."""
        if self.regions is not None:
            return [-1.0] * len(self.regions)
        return [1.0] + [0.0] * (len(self.label_values) - 1)

    def labels_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(B,X,Y,Z) label map in dataset.json values from network outputs.

        Regions are painted in config order, each with the label value it holds that no later region
        holds (WT -> 1, TC -> 2, ET -> 3 for BraTS); nested regions thus map back exactly.
        """
        if self.regions is None:
            values = torch.tensor(self.label_values, device=logits.device)
            return values[logits.argmax(1)]
        out = torch.zeros(logits.shape[:1] + logits.shape[2:], dtype=torch.long, device=logits.device)
        for i, (_, vs) in enumerate(self.regions):
            later = {v for _, ws in self.regions[i + 1:] for v in ws}
            own = sorted(set(vs) - later)
            out[logits[:, i] > 0] = own[0] if own else max(vs)
        return out


def build_loss(optim_cfg, targets: Targets) -> nn.Module:
    """Dice + cross-entropy, or Dice + focal (LAMP: Dice + 0.5 focal); sigmoid for regions.

    Args:
        optim_cfg: the ``optim`` config node (``loss``, ``focal_weight``).
        targets: the label/region mapping.

    Returns:
        A loss module called as ``loss(logits, targets.loss_target(label))``.
    """
    sigmoid = targets.region_based
    common = dict(sigmoid=sigmoid, softmax=not sigmoid, to_onehot_y=not sigmoid,
                  smooth_nr=1e-5, smooth_dr=1e-5)
    name = enum_value(optim_cfg.loss)
    if name == "dice_focal":
        return DiceFocalLoss(lambda_focal=optim_cfg.focal_weight, **common)
    return DiceCELoss(**common)
