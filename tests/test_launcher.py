"""The launcher below every multi-process job (``lampseg.runtime.launcher``): a job that hangs ends whole at
its timeout (torchrun and workers in sessions of their own, SIGKILL for a worker that ignores SIGTERM), with
its output so far readable and a ``LampsegError`` that says what timed out; a failing job names its error;
a passing one returns its output; no socket of a job listens beyond loopback."""
from __future__ import annotations

import sys
import time

import psutil
import pytest
from conftest import REPO, is_loopback, listening_addresses

from lampseg.errors import LampsegError
from lampseg.runtime.launcher import JobError, run_command, run_job

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="trees are read in /proc")
WORKER = REPO / "tests" / "workers" / "launcher_job.py"
HANG_TIMEOUT_S = 15  # both workers join their group in ~6 s on 2 busy cores (load 5): time to spare
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


class Tree:
    """A ``run_job`` watcher: every process of the job's tree it saw (pid -> start time) and every address
    one of them listened on, sampled about twice a second."""

    def __init__(self):
        self.seen: dict[int, float] = {}
        self.listening: set[tuple[str, int]] = set()

    def __call__(self, pid: int) -> None:
        try:
            root = psutil.Process(pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for process in processes:
            try:
                self.seen.setdefault(process.pid, process.create_time())
            except psutil.NoSuchProcess:
                pass
        self.listening |= listening_addresses(pid)

    def running(self, extra: list[int] = ()) -> list[str]:
        """The processes seen (and ``extra`` pids) that still run, zombies (ended, not reaped) aside."""
        left = []
        for pid in {*self.seen, *extra}:
            try:
                process = psutil.Process(pid)
                if (pid not in self.seen or process.create_time() == self.seen[pid]) and \
                        process.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{pid} {' '.join(process.cmdline())[:100]}")
            except psutil.NoSuchProcess:
                pass
        return left


def test_a_hung_job_ends_whole_at_its_timeout(tmp_path):
    """Two workers join their process group, each starts a child in a session of its own and hangs (rank 1
    ignoring SIGTERM): at the timeout every process of the job ends, the error says what timed out and
    after how long, what the workers printed is readable, and nothing listened beyond loopback."""
    tree = Tree()
    with pytest.raises(JobError) as raised:
        run_job([WORKER, "hang", tmp_path], 2, timeout_s=HANG_TIMEOUT_S, name="the hanging job",
                timeout_key="test.timeout_s", env=ONE_THREAD, watch=tree)
    error = raised.value
    assert isinstance(error, LampsegError)
    message = str(error)
    assert f"the hanging job did not finish within test.timeout_s={HANG_TIMEOUT_S} s" in message, message
    pids = [int(p) for f in sorted(tmp_path.glob("rank*.pids")) for p in f.read_text().split()]
    assert len(pids) == 4, f"the workers had not joined their group before the timeout:\n{message}"
    assert set(pids) <= set(tree.seen), (pids, tree.seen)  # workers and their children were in the tree
    assert not tree.running(pids), f"left running after the timeout: {tree.running(pids)}"
    assert error.result.timed_out and error.result.seconds >= HANG_TIMEOUT_S
    for rank in (0, 1):
        assert f"rank {rank} joined a group of 2 and hangs" in error.result.stdout
    assert "rank 1 joined a group of 2 and hangs" in message  # the end of its output, in the message
    assert tree.listening, "no listening socket of the job was sampled"
    exposed = sorted(a for a in tree.listening if not is_loopback(a[0]))
    assert not exposed, f"the job listened beyond loopback: {exposed}"


def test_a_failing_job_names_its_error(tmp_path):
    with pytest.raises(JobError) as raised:
        run_job([WORKER, "fail", tmp_path], 2, timeout_s=120, name="the failing job", env=ONE_THREAD,
                log_dir=tmp_path / "logs")
    message = str(raised.value)
    assert message.startswith("the failing job failed (exit 1) after ")
    assert "Last error: ValueError: rank 1 fails on purpose" in message, message
    assert "rank 1 starts" in message and str(tmp_path / "logs") in message
    assert "rank 0 starts" in (tmp_path / "logs" / "stdout.log").read_text()
    assert raised.value.result.returncode == 1


def test_a_passing_job_returns_its_output(tmp_path):
    result = run_job([WORKER, "pass", tmp_path], 2, timeout_s=120, env=ONE_THREAD)
    assert result.returncode == 0 and not result.timed_out
    assert sorted(line for line in result.stdout.splitlines() if line.startswith("rank")) == \
        ["rank 0 of 2 done", "rank 1 of 2 done"]


def test_one_command_and_its_detached_child_end_at_the_timeout_or_on_ctrl_c(tmp_path):
    """``run_command`` (a benchmark's single process) gives the same guarantee: its child, in a session of
    its own, ends with it, whether the timeout passes or waiting is interrupted (Ctrl-C)."""
    script = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', "
              "'import time; time.sleep(600)'], start_new_session=True); print(c.pid, flush=True); "
              "time.sleep(600)")
    tree = Tree()
    with pytest.raises(JobError, match=r"did not finish within bench.timeout_s=3 s") as raised:
        run_command([sys.executable, "-c", script], timeout_s=3, timeout_key="bench.timeout_s", watch=tree)
    child = int(raised.value.result.stdout.split()[0])
    assert child in tree.seen and not tree.running([child])

    def interrupt(pid: int) -> None:
        tree(pid)
        if len(tree.seen) == 2:  # the command and its child
            raise KeyboardInterrupt

    tree = Tree()
    with pytest.raises(KeyboardInterrupt):
        run_command([sys.executable, "-c", script], timeout_s=60, watch=interrupt)
    assert len(tree.seen) == 2 and not tree.running(), tree.running()


def test_a_benchmark_job_that_times_out_is_a_lampseg_error_naming_the_key(tmp_path):
    """``bench``'s torchrun jobs go through the launcher: a timeout is a ``LampsegError`` naming
    ``bench.timeout_s`` (the CLI prints it as one paragraph), not ``subprocess.TimeoutExpired``."""
    from lampseg.bench.workers import launch_workers

    with pytest.raises(LampsegError, match=r"^bench: the 2-process job of lampseg.bench.data_parallel did "
                                           r"not finish within bench.timeout_s=1 s"):
        launch_workers("lampseg.bench.data_parallel", 2, tmp_path / "spec.json", tmp_path / "out.json", 1)


DETACHED_CHILD = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', "
                  "'import time; time.sleep(600)'], start_new_session=True); print(c.pid, flush=True); ")


def test_a_failed_commands_detached_child_ends_too(tmp_path):
    """A root that dies on its own (an OOM-killed torchrun agent) must not leave its workers, which sit in
    sessions of their own, running."""
    tree = Tree()
    with pytest.raises(JobError, match=r"failed \(exit 3\)") as raised:
        run_command([sys.executable, "-c", DETACHED_CHILD + "time.sleep(2); sys.exit(3)"], timeout_s=60,
                    watch=tree)
    child = int(raised.value.result.stdout.split()[0])
    assert child in tree.seen and not tree.running([child])


def test_a_job_ends_when_the_process_that_started_it_is_killed(tmp_path):
    """A ``doctor`` or ``bench`` killed with SIGKILL cannot clean up: the job's root gets SIGTERM from the
    kernel (PR_SET_PDEATHSIG) and ends its tree, as torchrun ends its workers."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    pids = tmp_path / "pids"
    root = ("import signal, subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(600)']); print(c.pid, flush=True); "
            "signal.signal(signal.SIGTERM, lambda *_: (c.kill(), sys.exit(0))); time.sleep(600)")
    parent = ("import sys; from pathlib import Path; from lampseg.runtime.launcher import run_command; "
              f"run_command([sys.executable, '-c', {root!r}], timeout_s=600, log_dir={str(pids)!r})")
    starter = psutil.Popen([sys.executable, "-c", parent])
    job: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (pids / "stdout.log").is_file() or \
                not (pids / "stdout.log").read_text().strip():
            time.sleep(0.2)
        job = starter.children(recursive=True)
        assert job, "the job did not start"
        starter.kill()
        starter.wait(10)
        gone, alive = psutil.wait_procs(job, timeout=15)
        assert not alive, [p.cmdline() for p in alive]
    finally:  # whatever the outcome, nothing of the test's may outlive it
        for process in [starter, *job]:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
