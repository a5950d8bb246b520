"""The U-Net blocks under ``torch.distributed.pipelining`` (torchrun, gloo, CPU, one stage per rank):
the same loss and gradients as the unsplit model for GPipe and 1F1B schedules."""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import worker_rows

WORKER = Path(__file__).parent / "workers" / "pipelining_equivalence.py"


@pytest.mark.extended  # the training tests cover the stages end to end; this checks gradients per schedule
@pytest.mark.parametrize("stages", [2, 4])
def test_pipelining_stages_match_unsplit_model(stages):
    rows = worker_rows(stages, WORKER, timeout=240)
    expected = {("ScheduleGPipe", m) for m in (1, 2, 4)}
    expected |= {("Schedule1F1B", m) for m in (1, 2, 4) if m >= stages}
    assert {(r["schedule"], r["microbatches"]) for r in rows} == expected
    for row in rows:
        assert row["loss"] == pytest.approx(row["ref_loss"], rel=1e-12), row
        assert row["max_rel_grad_error"] < 1e-9, row
