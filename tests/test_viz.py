"""``lampseg visualize`` and its montage: colours sit where the labels are; CLI and training write PNGs."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import lampseg

from lampseg.viz import ALPHA, FALSE_NEGATIVE, FALSE_POSITIVE, label_colour, montage

PNG = b"\x89PNG\r\n\x1a\n"


def _expected(mask2d: np.ndarray, scale: int, tile: int) -> np.ndarray:
    """Where a plane's voxels land in a tile: rotated for viewing, scaled by nearest neighbour, top-left."""
    up = np.kron(np.rot90(mask2d).astype(int), np.ones((scale, scale), int)).astype(bool)
    out = np.zeros((tile, tile), bool)
    out[:up.shape[0], :up.shape[1]] = up
    return out


def test_overlay_and_error_colours_sit_where_the_labels_are():
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (2, 20, 16, 12)).astype(np.float32)
    label = np.zeros((20, 16, 12), np.uint8)
    label[3:9, 2:7, 4:9] = 1
    label[12:17, 9:14, 5:8] = 3
    prediction = label.copy()
    prediction[3:5, 2:7, 4:9] = 0          # missed: false negatives
    prediction[0:2, 12:15, 5:8] = 1        # invented: false positives
    picture = montage(image, ["A", "B"], label, [1, 3], prediction, slices=(14, 11, 6), tile=40)
    assert picture.rows == ["A", "B", "label", "prediction", "errors"]
    assert picture.image.shape == (5 * 40, 3 * 40, 3)
    z = 6
    grey = picture.tile_at(0, 0)  # modality A, axial: the grey the overlays are drawn on
    overlay = picture.tile_at(2, 0)
    for k, value in enumerate([1, 3]):
        coloured = np.isclose(overlay, (1 - ALPHA) * grey + ALPHA * label_colour(k), atol=1e-6).all(-1)
        mask = label[:, :, z] == value
        assert mask.any() and (coloured == _expected(mask, 2, 40)).all()
    errors = picture.tile_at(4, 0)
    reference, predicted = label[:, :, z], prediction[:, :, z]
    for colour, mask in [(FALSE_POSITIVE, (predicted > 0) & (reference == 0)),
                         (FALSE_NEGATIVE, (predicted == 0) & (reference > 0))]:
        assert mask.any() and (np.isclose(errors, colour).all(-1) == _expected(mask, 2, 40)).all()


@pytest.mark.extended
def test_visualize_cli_and_training_write_overlays(trained_run, tmp_path):
    """Training left a val_overlay.png; visualize draws a case with the checkpoint's prediction."""
    assert (trained_run / "val_overlay.png").read_bytes()[:8] == PNG
    out = tmp_path / "case.png"
    proc = lampseg("visualize", "+exp=smoke", f"ckpt={trained_run}", "case=BRATS_002", "slices=[10,12,14]",
                   f"out={out}", f"run_dir={tmp_path}")  # a run directory: its best checkpoint
    assert out.read_bytes()[:8] == PNG and out.stat().st_size > 10_000
    assert "BRATS_002 (FLAIR, T1w, t1gd, T2w, label, prediction, errors)" in proc.stdout
    for wrong, key in [("case=nosuch", "'case'"), ("slices=[99,0,0]", "'slices'")]:
        bad = lampseg("visualize", "+exp=smoke", wrong, f"run_dir={tmp_path}", check=False)
        assert bad.returncode == 2 and f"config key {key}" in bad.stderr
