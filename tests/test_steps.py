"""A training step and its epoch (``engine/steps.py``), and the per-epoch LR schedules."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import compose

from lampseg.engine.optim import build_scheduler, lr_factor

# ------------------------------------------------------------------------------------------------ lr


def test_lr_factor_schedules():
    assert [lr_factor(e, 10, "cosine", warmup=2) for e in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    cosine = [lr_factor(e, 10, "cosine") for e in range(10)]
    assert cosine[0] == 1.0 and all(a > b for a, b in zip(cosine, cosine[1:])) and cosine[-1] < 0.03
    assert lr_factor(10, 10, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(5, 10, "poly", power=0.9) == pytest.approx(0.5 ** 0.9)
    assert lr_factor(10, 10, "poly") == 0.0
    assert all(lr_factor(e, 10, "constant") == 1.0 for e in range(10))
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = build_scheduler(optimizer, SimpleNamespace(schedule="poly", warmup_epochs=1, poly_power=1.0),
                                max_epochs=5)
    lrs = []
    for _ in range(5):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.05, 0.1, 0.075, 0.05, 0.025])



def test_progress_bar_on_request_and_silent_otherwise(capsys):
    from lampseg.engine.steps import Progress

    bar = Progress("bar", total=3, epoch=7)
    for loss in (0.5, 0.4, 0.3):
        bar.update(loss)
    bar.close()
    err = capsys.readouterr().err
    assert "epoch 7" in err and "3/3" in err and "loss=0.3000" in err
    quiet = Progress("auto", total=3, epoch=1)  # pytest's stderr is not a terminal: no bar
    quiet.update(0.1)
    quiet.close()
    assert quiet.bar is None and capsys.readouterr().err == ""


@pytest.mark.parametrize("clip", [None, 1.0])
def test_a_step_with_non_finite_gradients_is_skipped_not_applied(clip):
    """bf16/fp32 have no GradScaler to catch overflow: the step must leave the weights untouched (clipping
    an infinite norm would otherwise turn every weight into NaN) and report NaN so the epoch counts it."""

    from lampseg.engine.setup import make_grad_scaler
    from lampseg.engine.steps import local_step

    cfg = compose("+exp=smoke", "trainer.precision=fp32",
                  f"optim.grad_clip={'null' if clip is None else clip}")
    model = torch.nn.Conv3d(2, 3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    scale = {"value": math.inf}

    def loss_fn(out, target):
        return (out * scale["value"]).mean()

    cpu = torch.device("cpu")
    step = local_step(model, optimizer, loss_fn, cfg, cpu, make_grad_scaler(cfg, cpu))
    image, target = torch.randn(1, 2, 4, 4, 4), torch.zeros(1)
    assert math.isnan(step(image, target))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    scale["value"] = 1.0
    assert math.isfinite(step(image, target))
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_epoch_line_names_the_data_wait_only_when_it_costs():
    from lampseg.engine.train import DATA_WAIT_NOTE, epoch_line

    row = {"epoch": 3, "step": 150, "train_loss": 0.5, "lr": 1e-3, "epoch_s": 4.0, "samples_per_s": 25.0,
           "data_wait_frac": DATA_WAIT_NOTE / 2, "val_dice": 0.8, "val_dice_non-enhancing_tumor": 0.7}
    line = epoch_line(row, 20, ["non-enhancing tumor"], workers=1)
    assert "data wait" not in line and "val_dice=0.8000 (non-enhancing tumor=0.700)" in line
    line = epoch_line({**row, "data_wait_frac": 0.12, "val_dice": math.nan}, 20, ["a"], workers=1)
    assert line == ("epoch 3/20 step 150 loss=0.5000 lr=1.00e-03 4.0s 25.0 samples/s data wait 12% "
                    "(data.num_workers=1)")
