"""``python -m lampseg doctor``: every check on this CPU, its JSON report, and a failing check's exit."""
from __future__ import annotations

import json
import subprocess

import torch
from conftest import lampseg

from lampseg.doctor.checks import CHECKS


def test_doctor_checks_every_parallel_mode_and_writes_its_report(tmp_path):
    report_path = tmp_path / "report.json"
    proc = lampseg("doctor", "--json", report_path, f"run_dir={tmp_path / 'run'}", timeout=180)
    report = json.loads(report_path.read_text())
    assert report == json.loads((tmp_path / "run" / "doctor.json").read_text())
    assert report["ok"] and report["failed"] == [] and list(report["checks"]) == list(CHECKS)
    for name, result in report["checks"].items():
        assert result["ok"] and result["seconds"] >= 0, (name, result)
        assert f"PASS  {name}" in proc.stdout
    for name in ("ddp", "pipeline", "spatial"):  # two gloo processes on this CPU, compared with one
        result = report["checks"][name]
        assert result["processes"] == 2 and result["backend"] == "gloo"
        assert "match one process" in result["detail"]
    inference = report["checks"]["inference"]["detail"]  # the memory-aware choice, then its fallback
    assert "whole" in inference and "sliding" in inference
    assert report["versions"]["torch"] == torch.__version__
    assert report["cpu"]["cores_available"] >= 1 and report["devices"] == []  # no GPU here
    planner = report["planner"]
    assert [row["devices"] for row in planner["capacity"]] == planner["device_counts"] == [1, 2, 4, 8]
    suggestion = planner["suggestion"]
    assert suggestion["devices"] == 1 and suggestion["largest_cube"] == max(
        planner["capacity"][0]["pipeline_side"], planner["capacity"][0]["spatial_side"])
    assert f"{suggestion['largest_cube']}^3" in proc.stdout and "5 of 5 checks passed" in proc.stdout


def test_doctor_exits_nonzero_when_a_check_fails_and_leaves_no_process(tmp_path):
    """The two-process job cannot finish in 2 s (its imports alone take longer): it is killed, its checks
    fail with that reason, the command exits 1 naming them, and no worker is left running."""
    proc = lampseg("doctor", "doctor.checks=[ddp,spatial]", "doctor.timeout_s=2", f"run_dir={tmp_path}",
                   check=False, timeout=180)
    assert proc.returncode == 1, proc.stderr
    assert "FAIL  ddp" in proc.stdout and "FAIL  spatial" in proc.stdout
    assert "check(s) failed: ddp, spatial" in proc.stderr
    report = json.loads((tmp_path / "doctor.json").read_text())
    assert not report["ok"] and report["failed"] == list(report["checks"]) == ["ddp", "spatial"]
    assert "did not finish in doctor.timeout_s=2 s" in report["checks"]["ddp"]["detail"]
    left = subprocess.run(["pgrep", "-f", "lampseg.doctor.worker"], capture_output=True, text=True).stdout
    assert not left.split(), f"doctor workers left running: {left}"
