"""Shared fixtures: an isolated ``LAMPSEG_HOME``, a CLI runner, Hydra composition and one trained run.

Every test that trains uses ``+exp=smoke`` (6 synthetic cases of 32^3, a 3-level U-Net of 8-32 channels);
the synthetic dataset and its preprocessing cache are generated once per session under ``LAMPSEG_HOME``.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
CLI_TIMEOUT_S = 300
# pytorch-ignite is in the test extras for one extended test (MONAI's SupervisedEvaluator running an exported
# bundle), but MONAI imports it on `import monai` wherever it is installed: 1.5 s of every process's start
# (2-core Xeon: `import torch, monai` 6.7 s with it, 5.2 s without), in each of the hundreds of processes the
# suite starts. So they start as an install without the `bundle` extra would: this folder, first on their
# PYTHONPATH, holds an `ignite` that raises ImportError, which MONAI takes for "not installed".
ABSENT = REPO / "tests" / "absent"


def with_ignite(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a subprocess that needs the real pytorch-ignite: PYTHONPATH without ``ABSENT``."""
    path = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p) != ABSENT]
    return {**env, "PYTHONPATH": os.pathsep.join(path)}


@pytest.fixture(scope="session", autouse=True)
def without_ignite() -> None:
    """Every subprocess of the session starts with ``ABSENT`` first on its PYTHONPATH (see there)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ABSENT), os.environ.get("PYTHONPATH")])))
        yield


@pytest.fixture(scope="session", autouse=True)
def lampseg_home(tmp_path_factory) -> Path:
    """Point ``LAMPSEG_HOME`` (datasets, caches) at a session temp dir; subprocesses inherit it."""
    home = tmp_path_factory.mktemp("lampseg_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LAMPSEG_HOME", str(home))
        yield home


def lampseg(*args: str, cwd: str | Path | None = None, check: bool = True,
            timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run ``python -m lampseg ARGS`` and capture its text output (fails the test on a non-zero exit
    when ``check``, showing stdout and stderr)."""
    proc = subprocess.run([sys.executable, "-m", "lampseg", *map(str, args)], cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    if check and proc.returncode != 0:
        pytest.fail(f"lampseg {' '.join(map(str, args))} exited {proc.returncode}\n"
                    f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")
    return proc


def free_port() -> int:
    """A free TCP port on the loopback interface (for torchrun's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_addresses(pid: int) -> set[tuple[str, int]]:
    """(ip, port) of every listening TCP socket of process ``pid`` and its descendants."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return set()
    found = set()
    for process in processes:
        try:
            found |= {(c.laddr.ip, c.laddr.port) for c in process.net_connections(kind="inet")
                      if c.status == psutil.CONN_LISTEN}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def is_loopback(ip: str) -> bool:
    """Whether ``ip`` is a loopback address (IPv4-mapped IPv6 addresses by their IPv4 part)."""
    import ipaddress

    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def launch_command(nproc: int, *target: str | Path) -> list[str]:
    """``python -m lampseg.launch`` (torchrun, loopback-bound) with ``nproc`` processes on 127.0.0.1 and a
    free port, running ``target`` (``-m lampseg ARGS`` or a script): lampseg's own ``job_command``, for
    tests that drive the process themselves (``--master_port`` is its sixth word)."""
    from lampseg.runtime.launcher import job_command  # lazy: it imports torchrun, seconds for every test

    return job_command(target, nproc)


def _run_job(nproc: int, target: list, timeout: float, what: str):
    """``target`` as a job of ``nproc`` processes through lampseg's launcher (``runtime.launcher.run_job``:
    torchrun on loopback, one thread per process, every process ended when it outlives ``timeout``), the
    listening sockets of its whole process tree sampled while it runs (``.listening``); any not on loopback,
    or a timeout, fails the test."""
    # lazy: the launcher imports torchrun, seconds that every test would pay
    from lampseg.runtime.launcher import JobError, run_job

    listening: set[tuple[str, int]] = set()
    try:
        job = run_job(target, nproc, timeout_s=timeout, name=what, env={"OMP_NUM_THREADS": "1"}, cwd=REPO,
                      check=False, watch=lambda pid: listening.update(listening_addresses(pid)))
    except JobError as error:
        pytest.fail(str(error))
    job.listening = listening
    exposed = sorted(a for a in listening if not is_loopback(a[0]))
    if exposed:
        pytest.fail(f"{what} listened beyond loopback: {exposed}")
    return job


def torchrun(nproc: int, *args: str, check: bool = True, timeout: float = CLI_TIMEOUT_S
             ) -> subprocess.CompletedProcess:
    """``python -m lampseg.launch --nproc_per_node NPROC -m lampseg ARGS`` (torchrun, loopback-bound) on
    127.0.0.1 through lampseg's launcher, one thread per process. While it runs, the listening sockets of the
    whole process tree are sampled (``proc.listening``); any not on loopback fails the test, and so does
    outliving ``timeout`` (after every process of the job has ended)."""
    what = f"torchrun x{nproc} lampseg {' '.join(map(str, args))}"
    job = _run_job(nproc, ["-m", "lampseg", *args], timeout, what)
    proc = subprocess.CompletedProcess(job.args, job.returncode, job.stdout, job.stderr)
    proc.listening = job.listening
    if check and proc.returncode != 0:
        pytest.fail(f"{what} exited {proc.returncode}\n"
                    f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def worker_rows(nproc: int, script: Path, timeout: float = 300) -> list[dict]:
    """Run a test worker ``script`` under torchrun (lampseg's launcher, 127.0.0.1, one thread per process,
    loopback only as ``torchrun`` checks) and return the JSON lines it printed (failing the test, with its
    error output, when it fails)."""
    job = _run_job(nproc, [script], timeout, f"torchrun x{nproc} {script}")
    assert job.returncode == 0, job.stderr[-3000:]
    return [json.loads(line) for line in job.stdout.splitlines() if line.startswith("{")]


def compose(*overrides: str) -> DictConfig:
    """Compose the real ``conf/`` (schema-checked) with Hydra's compose API, as the CLI does."""
    from lampseg.__main__ import config_dir
    from lampseg.config import register_schema

    register_schema()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def train_here(run_dir: str | Path, *overrides: str, log=None) -> dict:
    """``run()`` in this process on the composed config, writing to ``run_dir``; returns the summary."""
    from omegaconf import OmegaConf

    from lampseg.engine.train import run

    cfg = compose(*overrides)
    OmegaConf.update(cfg, "run_dir", str(run_dir), merge=False)
    return run(cfg, log=log or (lambda _: None))


def train_losses(run_dir: Path) -> list[float]:
    """The ``train_loss`` column of a run's ``metrics.csv``."""
    import csv

    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        return [float(r["train_loss"]) for r in csv.DictReader(f)]


@pytest.fixture(autouse=True)
def restore_torch_globals():
    """``trainer.deterministic`` and ``trainer.num_threads`` set process-wide torch state; restore it."""
    import torch

    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    threads = torch.get_num_threads()
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    torch.set_num_threads(threads)


def replay_first(found: dict):
    """A decorator for a hypothesis test: every value of ``found`` (bugs a fuzzer found, by name) as an
    explicit example, run in the listed order before any drawn one."""
    from hypothesis import example

    def decorate(test):
        for value in reversed(found.values()):  # example() stacks: the last applied runs first
            test = example(value)(test)
        return test
    return decorate


def load_check_run_dir():
    """The run-directory contract checker (``tests/run_dir_contract.py``) as a module whose ``check(path)``
    is ``check_run_dir`` (for callers written before it; new code imports ``check_run_dir`` from there)."""
    import run_dir_contract

    return run_dir_contract


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, lampseg_home) -> Path:
    """One ``+exp=smoke`` training through the CLI, shared by the train/evaluate/predict tests."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    lampseg("train", "+exp=smoke", f"run_dir={run_dir}")
    return run_dir
