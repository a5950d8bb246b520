"""``python -m lampseg tune`` and ``train -m`` as users run them: each starts and stops its own Ray."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import REPO, free_port, is_loopback, lampseg, listening_addresses

pytestmark = pytest.mark.slow
STUDY = ["+exp=smoke", "trainer.hd95=false", "trainer.max_epochs=3", "tune.max_concurrent=1",
         "tune.space=[{key:optim.lr,grid:[0.001,0.002,0.003]}]"]


def _ray_pids() -> set[int]:
    return {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] in ("raylet", "gcs_server")}


def _completed(study: Path) -> dict[str, int]:
    """Trial directory -> mtime of its summary.json, for trials whose summary says completed."""
    done = {}
    for path in study.glob("trial_*/summary.json"):
        try:
            if json.loads(path.read_text())["status"] == "completed":
                done[path.parent.name] = path.stat().st_mtime_ns
        except (OSError, ValueError):
            continue  # being written
    return done


def _tree_commands(pid: int) -> set[str]:
    try:
        return {" ".join(p.cmdline()) for p in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return set()


# Extended: two CLI studies, each starting its own Ray, take ~50 s even at 2 trials of 2 tiny epochs; the
# default suite resumes a study in process (tests/test_tune.py,
# test_unfinished_study_resumes_without_retraining_finished_trials), without the Ctrl-C and Ray's clean-up.
@pytest.mark.extended
def test_interrupted_study_resumes_without_rerunning_finished_trials(tmp_path):
    """Ctrl-C (SIGINT) after the first trial finished; the same command with tune.resume=true runs the
    rest and leaves the finished trial alone. No Ray process outlives either command. While the first
    runs, the Ray it started listens on loopback only and runs no dashboard."""
    before = _ray_pids()
    run_dir = tmp_path / "study"
    command = [sys.executable, "-m", "lampseg", "tune", *STUDY, f"run_dir={run_dir}"]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=os.environ.copy())
    listening, commands = set(), set()
    try:
        deadline = time.monotonic() + 240
        for tick in range(10**6):
            if time.monotonic() > deadline or proc.poll() is not None or _completed(run_dir / "tune"):
                break
            if tick % 5 == 0:  # once a second: sampling the process tree costs CPU the trials need
                listening |= listening_addresses(proc.pid)
                commands |= _tree_commands(proc.pid)
            time.sleep(0.2)
        assert proc.poll() is None, "the study ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    # lampseg's own Ray: every listener (GCS, raylet, agents, workers) on loopback; Ray's dashboard head runs
    # without its web frontend (Ray keeps a minimal head for usage stats even with include_dashboard=False)
    assert listening and all(is_loopback(ip) for ip, _ in listening), listening
    heads = [c for c in commands if "dashboard/dashboard.py" in c]
    assert any("raylet" in c for c in commands) and all("--disable-frontend" in c for c in heads), commands
    finished = _completed(run_dir / "tune")
    assert 1 <= len(finished) < 3, output[-3000:]
    assert "tune.resume=true" in output
    assert _ray_pids() <= before

    again = lampseg("tune", *STUDY, f"run_dir={run_dir}", "tune.resume=true", timeout=300)
    assert "resuming the study" in again.stdout
    with open(run_dir / "tune" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and {r["status"] for r in rows} == {"completed"}
    after = _completed(run_dir / "tune")
    assert all(after[name] == mtime for name, mtime in finished.items())  # not retrained
    assert _ray_pids() <= before


@pytest.mark.parametrize("launcher", ["basic", pytest.param("ray", marks=pytest.mark.extended)])
def test_multirun_writes_multirun_results(tmp_path, launcher):
    """``train -m`` over two learning rates, with Hydra's basic launcher and with hydra-ray-launcher:
    both jobs train and multirun_results.csv gathers their summaries."""
    before = _ray_pids()
    extra = ["hydra/launcher=ray"] if launcher == "ray" else ["trainer.num_threads=1"]
    lampseg("train", "-m", *extra, "+exp=smoke", "trainer.max_epochs=1", "trainer.hd95=false",
            "optim.lr=0.001,0.003", f"run_dir={tmp_path}")
    with open(tmp_path / "multirun_results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["job"] for r in rows] == ["0", "1"]
    assert "optim.lr=0.001" in rows[0]["overrides"] and "optim.lr=0.003" in rows[1]["overrides"]
    for row in rows:
        summary = json.loads((tmp_path / row["job"] / "summary.json").read_text())
        assert row["status"] == summary["status"] == "completed"
        assert float(row["best_val_dice"]) == pytest.approx(summary["best_val_dice"])
    assert _ray_pids() <= before


@pytest.mark.extended
def test_slurm_ray_script_runs_a_study_on_the_cluster_it_starts(tmp_path):
    """launch/slurm_ray.sbatch under stand-ins for srun and scontrol (a one-node allocation on 127.0.0.1):
    it starts a Ray head, `lampseg tune tune.address=...` joins it and runs the study, and the script's exit
    stops the head."""
    before = _ray_pids()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho 127.0.0.1\n")
    (bin_dir / "srun").write_text(  # one task: drop srun's options (and -w's node), run the command here
        "#!/usr/bin/env bash\nwhile [[ $1 == -* ]]; do [[ $1 == -w ]] && shift; shift; done\nexec \"$@\"\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    run_dir = tmp_path / "study"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable,
           "SLURM_JOB_NODELIST": "node0", "SLURM_JOB_ID": "4343", "SLURM_CPUS_PER_TASK": "2",
           "HEAD_IP": "127.0.0.1", "RAY_PORT": str(free_port()), "RAY_WAIT": "30", "RUN_DIR": str(run_dir),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # Ray's single-machine mode: 127.0.0.1 only
    proc = subprocess.run(["bash", "launch/slurm_ray.sbatch", "+exp=smoke", "trainer.hd95=false",
                           "trainer.max_epochs=1", "tune.space=[{key:optim.lr,grid:[0.001,0.003]}]"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "joined the Ray cluster at 127.0.0.1:" in proc.stdout
    with open(run_dir / "tune" / "results.csv", newline="") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["completed", "completed"]
    deadline = time.monotonic() + 30
    while _ray_pids() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _ray_pids() <= before
