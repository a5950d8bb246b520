"""lampseg: 3D medical image segmentation at scale (MONAI U-Nets, model/experiment/data parallelism)."""

__version__ = "0.1.0"
