"""The U-Net blocks under ``torch.distributed.pipelining`` (torchrun, gloo, CPU, one stage per rank):
the same loss and gradients as the unsplit model for GPipe and 1F1B schedules."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

WORKER = Path(__file__).parent / "workers" / "pipelining_equivalence.py"


@pytest.mark.extended  # the training tests cover the stages end to end; this checks gradients per schedule
@pytest.mark.parametrize("stages", [2, 4])
def test_pipelining_stages_match_unsplit_model(stages):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "lampseg.launch", f"--nproc_per_node={stages}",
                           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(WORKER)],
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    expected = {("ScheduleGPipe", m) for m in (1, 2, 4)}
    expected |= {("Schedule1F1B", m) for m in (1, 2, 4) if m >= stages}
    assert {(r["schedule"], r["microbatches"]) for r in rows} == expected
    for row in rows:
        assert row["loss"] == pytest.approx(row["ref_loss"], rel=1e-12), row
        assert row["max_rel_grad_error"] < 1e-9, row
