"""``python -m lampseg doctor``: every check on this CPU, its JSON report, and a failing check's exit."""
from __future__ import annotations

import json
import subprocess

import pytest
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


@pytest.mark.extended
def test_doctor_exits_nonzero_when_a_check_fails_and_leaves_no_process(tmp_path):
    """The two-process job's workers start (each in a session of its own, as torchrun starts them) and hang
    (the test stops them with SIGSTOP as they appear): after doctor.timeout_s every process of the job is
    ended, its checks fail with that reason and the command exits 1 naming them."""
    import sys
    import time

    import psutil
    from conftest import REPO

    timeout_s = 20  # the workers appear within ~6 s of the job's start on 2 busy cores
    command = [sys.executable, "-m", "lampseg", "doctor", "doctor.checks=[ddp,spatial]",
               f"doctor.timeout_s={timeout_s}", f"run_dir={tmp_path}"]
    with open(tmp_path / "stdout", "w") as out, open(tmp_path / "stderr", "w") as err:
        doctor = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=err)
    seen, stopped = {}, []
    try:
        deadline = time.monotonic() + 180
        while doctor.poll() is None and time.monotonic() < deadline:
            try:
                tree = psutil.Process(doctor.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                break
            for process in tree:
                try:
                    seen.setdefault(process.pid, process.create_time())
                    words = process.cmdline()
                    if "lampseg.doctor.worker" in words and "lampseg.launch" not in words and \
                            process.pid not in stopped:
                        process.suspend()  # a hung worker: only the launcher's timeout can end the job
                        stopped.append(process.pid)
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.1)
    finally:
        if doctor.poll() is None:
            doctor.kill()
        doctor.wait()
    stdout, stderr = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    assert len(stopped) == 2, f"the workers did not start before the timeout: {stopped}\n{stdout}\n{stderr}"
    assert doctor.returncode == 1, stderr
    assert "FAIL  ddp" in stdout and "FAIL  spatial" in stdout
    assert "check(s) failed: ddp, spatial" in stderr
    report = json.loads((tmp_path / "doctor.json").read_text())
    assert not report["ok"] and report["failed"] == list(report["checks"]) == ["ddp", "spatial"]
    assert f"did not finish in doctor.timeout_s={timeout_s} s" in report["checks"]["ddp"]["detail"]
    left = []
    for pid, created in seen.items():  # the launcher, both workers and anything they started
        try:
            process = psutil.Process(pid)
            if process.create_time() == created and process.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{pid} {' '.join(process.cmdline())[:100]}")
        except psutil.NoSuchProcess:
            pass
    assert not left, f"processes of the doctor's job left running: {left}"
