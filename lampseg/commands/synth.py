"""``python -m lampseg synth [out=PATH]``: write the synthetic BraTS-like MSD dataset.

    python -m lampseg synth out=/tmp/synthetic data.synthetic.cases=10 data.synthetic.shape=[64,64,48]
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from lampseg.data.prepare import synthetic_root
from lampseg.data.synth import generate_dataset


def run_synth(cfg: DictConfig) -> Path:
    """``synth``: the dataset ``data.synthetic`` describes, at ``out=PATH`` or where ``data.root=null``
    trains from (generated there only if missing)."""
    s = cfg.data.synthetic
    if cfg.synth.out is None:
        return synthetic_root(cfg.data)
    return generate_dataset(cfg.synth.out, cases=s.cases, shape=tuple(s.shape), seed=s.seed, layout=s.layout,
                            context=s.context)
