"""The one launcher below every multi-process job lampseg starts: torchrun kept on loopback, and jobs that end
whole.

* ``launch``: torchrun with every socket it opens on loopback when the job is local (``python -m
  lampseg.launch`` is this). torch's ``TCPStore`` (the rendezvous store torchrun's agent hosts) listens on
  every interface whatever address it is given (pytorch/pytorch#173909), and Gloo/NCCL pick an interface
  from the host name; for a loopback rendezvous address the store is bound to that address, the workers'
  store follows (``--local_addr``) and ``GLOO_SOCKET_IFNAME``/``NCCL_SOCKET_IFNAME`` name the loopback
  interface unless they are set.
* ``run_job``: ``python -m lampseg.launch --nproc_per_node N`` on 127.0.0.1 and a free port (doctor, bench,
  the tests' torchrun helpers); ``run_command``: any one command (a benchmark's ``lampseg train``). Both run
  the job in a session of its own with its output in files, and on a timeout, Ctrl-C or any error end every
  process of it (torchrun's workers sit in sessions of their own, so a process group would miss them; see
  ``processes.end_tree``). A timeout or failure is a ``JobError`` that says what, after how long, and the
  end of its output.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend, static_tcp_rendezvous
from torch.distributed.run import main as torchrun

from lampseg.errors import LampsegError
from lampseg.runtime.processes import alive, descendants, end_tree, free_port

LOCAL_FLAGS = ("--standalone",)
ADDRESS_FLAGS = ("--rdzv_endpoint", "--rdzv-endpoint", "--master_addr", "--master-addr")
TAIL_LINES = 12
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _prctl():
    """libc's ``prctl`` (Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()
ERROR_LINE = re.compile(r"^[\w.]*(Error|Exception|Interrupt)\b")


def loopback_ip(host: str) -> str | None:
    """The IPv4 loopback address ``host`` names (``127.0.0.1`` for ``localhost``), else None."""
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return None
    ips = {info[4][0] for info in infos}
    return min(ips) if ips and all(ipaddress.ip_address(ip).is_loopback for ip in ips) else None


class LoopbackTCPStore(dist.TCPStore):
    """``TCPStore`` whose server socket listens on the loopback address it was given, not on all
    interfaces (other hosts and clients are unchanged)."""

    def __init__(self, host_name: str, port: int, world_size: int | None = None, is_master: bool = False,
                 *args, **kwargs):
        names = ("timeout", "wait_for_workers", "multi_tenant", "master_listen_fd", "use_libuv")
        kwargs.update(zip(names, args))
        ip = loopback_ip(host_name) if is_master and kwargs.get("master_listen_fd") is None else None
        if ip is not None:
            try:
                server = socket.create_server((ip, port))  # SO_REUSEADDR, as TCPStore's own socket
            except OSError as e:  # torchrun retries, or joins as a client, on TCPStore's own error
                raise RuntimeError("Address already in use") from e
            kwargs.update(master_listen_fd=server.detach(), use_libuv=True)  # the store owns the fd now
        super().__init__(host_name, port, world_size, is_master, **kwargs)


def _value(argv: list[str], flags: tuple[str, ...]) -> str | None:
    for i, arg in enumerate(argv):
        for flag in flags:
            if arg == flag and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(flag + "="):
                return arg.split("=", 1)[1]
    return None


def is_local_job(argv: list[str]) -> bool:
    """Whether torchrun's arguments describe a job whose rendezvous is on this machine's loopback."""
    if any(a in LOCAL_FLAGS for a in argv):
        return True
    address = _value(argv, ADDRESS_FLAGS) or "127.0.0.1"  # torchrun's default master address
    if address.startswith("["):  # [IPv6]:port
        host = address[1:].split("]", 1)[0]
    else:
        host = address.rsplit(":", 1)[0] if address.count(":") == 1 else address
    return loopback_ip(host) is not None


def _loopback_interface() -> str | None:
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in ("lo", "lo0") if n in names), None)


def launch(argv: list[str]) -> None:
    """Run torchrun in this process with its command-line arguments ``argv``, loopback-bound when the job
    is local (see the module docstring); a multi-node job is left as torchrun makes it."""
    argv = list(argv)
    if is_local_job(argv):
        for module in (dist, static_tcp_rendezvous, c10d_rendezvous_backend):
            module.TCPStore = LoopbackTCPStore
        if _value(argv, ("--local_addr", "--local-addr")) is None:
            argv = ["--local_addr", "127.0.0.1", *argv]
        interface = _loopback_interface()
        if interface is not None:
            for key in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
                os.environ.setdefault(key, interface)
    torchrun(argv)


class JobError(LampsegError):
    """A job ``run_job``/``run_command`` started timed out or failed; every process of it has ended.

    Attributes:
        result: what it left: exit status, output so far, seconds, whether it timed out.
    """

    def __init__(self, message: str, result: JobResult):
        super().__init__(message)
        self.result = result


@dataclass
class JobResult:
    """A finished job: its command, exit status (negative: the signal that ended it), output and wall time."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False


def job_command(target: Sequence[str | Path], nproc: int, port: int | None = None) -> list[str]:
    """``python -m lampseg.launch --nproc_per_node=N --master_addr=127.0.0.1 --master_port=PORT TARGET``
    (``PORT`` a free one by default): a job of ``nproc`` processes on this machine's loopback. ``target``
    is what follows torchrun's options: ``-m MODULE ARGS`` or ``SCRIPT ARGS``."""
    return [sys.executable, "-m", "lampseg.launch", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={port or free_port()}", *map(str, target)]


def run_job(target: Sequence[str | Path], nproc: int, *, timeout_s: float, name: str | None = None,
            timeout_key: str | None = None, env: Mapping[str, str] | None = None,
            cwd: str | Path | None = None, log_dir: str | Path | None = None, check: bool = True,
            watch: Callable[[int], object] | None = None) -> JobResult:
    """Run ``target`` as a torchrun job of ``nproc`` processes on loopback (``job_command``) and wait for it.

    Args:
        target: what follows torchrun's options: ``["-m", MODULE, *ARGS]`` or ``[SCRIPT, *ARGS]``.
        nproc: processes (ranks) of the job.
        timeout_s: wall-clock limit; when it passes every process of the job is ended.
        name: what the job is, for messages (default: its target).
        timeout_key: the config key ``timeout_s`` came from, named in the timeout message.
        env: variables set for the job over this process's environment.
        cwd: the job's working directory (default this one).
        log_dir: where ``stdout.log`` and ``stderr.log`` are kept (default a temporary folder, removed).
        check: raise ``JobError`` when the job exits non-zero (else return its result).
        watch: called with the launcher's pid about twice a second while the job runs.

    Returns:
        The job's exit status, output and wall time.

    Raises:
        JobError: the job outlived ``timeout_s``, or (with ``check``) exited non-zero.
    """
    name = name or f"the {nproc}-process job {' '.join(map(str, target))[:120]}"
    return run_command(job_command(target, nproc), timeout_s=timeout_s, name=name, timeout_key=timeout_key,
                       env=env, cwd=cwd, log_dir=log_dir, check=check, watch=watch)


def run_command(command: Sequence[str | Path], *, timeout_s: float, name: str | None = None,
                timeout_key: str | None = None, env: Mapping[str, str] | None = None,
                cwd: str | Path | None = None, log_dir: str | Path | None = None, check: bool = True,
                watch: Callable[[int], object] | None = None, cpus: Iterable[int] | None = None
                ) -> JobResult:
    """Run ``command`` in a session of its own, its output in files, and end its whole process tree when it
    outlives ``timeout_s`` or waiting for it is interrupted (Ctrl-C, an error in ``watch``).

    Args:
        command: the program and its arguments.
        timeout_s: wall-clock limit; when it passes every process of the job is ended.
        name: what the command is, for messages (default: its first words).
        timeout_key: the config key ``timeout_s`` came from, named in the timeout message.
        env: variables set for the command over this process's environment.
        cwd: its working directory (default this one).
        log_dir: where ``stdout.log`` and ``stderr.log`` are kept (default a temporary folder, removed).
        check: raise ``JobError`` when it exits non-zero (else return its result).
        watch: called with the command's pid about twice a second while it runs.
        cpus: the CPUs it and its children may run on (Linux), e.g. to pin a data loader's workers too.

    Returns:
        Its exit status, output and wall time.

    Raises:
        JobError: it outlived ``timeout_s`` (every process of it ended first), or (with ``check``) it
            exited non-zero.
        KeyboardInterrupt: waiting was interrupted; its processes have ended.
    """
    args = list(map(str, command))
    name = name or " ".join(args[:6])
    folder = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="lampseg-job-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        result = _run(args, timeout_s, folder, {**os.environ, **(env or {})}, cwd, watch, cpus)
    finally:
        if log_dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    where = f" (output in {folder})" if log_dir is not None else ""
    if result.timed_out:
        limit = f"{timeout_key}={timeout_s:g} s" if timeout_key else f"{timeout_s:g} s"
        raise JobError(f"{name} did not finish within {limit}: stopped after {result.seconds:.1f} s, every "
                       f"process of it ended{where}.{_tail(result)}", result)
    if check and result.returncode != 0:
        raise JobError(f"{name} failed (exit {result.returncode}) after {result.seconds:.1f} s{where}."
                       f"{_tail(result)}", result)
    return result


def _child_start(parent: int, cpus: Iterable[int] | None) -> Callable[[], None]:
    """What the child runs before ``exec``: it gets SIGTERM when this process dies (Linux; the job sits in a
    session of its own, so a killed parent's group or terminal no longer reaches it, and torchrun ends its
    workers on SIGTERM), and is pinned to ``cpus``."""
    allowed = sorted(cpus) if cpus is not None and hasattr(os, "sched_setaffinity") else None

    def start() -> None:
        if _PRCTL is not None:
            _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != parent:  # the parent died before prctl: nobody would end this job
                os.kill(os.getpid(), signal.SIGTERM)
        if allowed is not None:
            os.sched_setaffinity(0, allowed)
    return start


def _run(args: list[str], timeout_s: float, folder: Path, env: dict, cwd, watch, cpus) -> JobResult:
    """Start ``args`` with its output in ``folder``, wait up to ``timeout_s``, end its tree when needed."""
    out_path, err_path = folder / "stdout.log", folder / "stderr.log"
    started = time.perf_counter()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, cwd=cwd,
                                start_new_session=True, preexec_fn=_child_start(os.getpid(), cpus))
    seen: dict[int, int] = {}  # every process of the tree, recorded while the root runs
    try:
        timed_out = _wait(proc, timeout_s, watch, seen)
    except BaseException:  # Ctrl-C or an error while waiting: nothing of the job may outlive it
        with _no_interrupts():
            if proc.returncode is None:
                end_tree(proc.pid)
            proc.wait()
            _end_left(seen)
        raise
    with _no_interrupts():
        if timed_out:
            end_tree(proc.pid)
            proc.wait()
        _end_left(seen)  # workers of a root that died (an OOM-killed torchrun agent) end too
    seconds = time.perf_counter() - started
    read = lambda path: path.read_text(errors="replace")  # noqa: E731
    return JobResult(args, proc.returncode, read(out_path), read(err_path), seconds, timed_out)


def _wait(proc: subprocess.Popen, timeout_s: float, watch, seen: dict[int, int]) -> bool:
    """Wait for ``proc`` up to ``timeout_s``, calling ``watch`` and recording its tree in ``seen`` in
    between; whether it timed out."""
    deadline = time.monotonic() + timeout_s
    while True:
        if watch is not None:
            watch(proc.pid)
        seen.update(descendants([proc.pid]))
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return proc.poll() is None
        try:
            proc.wait(timeout=min(0.5, remaining))
            return False
        except subprocess.TimeoutExpired:
            continue


def _end_left(seen: dict[int, int]) -> None:
    """End whatever of a finished job's recorded tree still runs (the same processes: pid and start time)."""
    for pid, started in seen.items():
        if alive((pid, started)):
            end_tree(pid)


@contextmanager
def _no_interrupts():
    """A second Ctrl-C must not cut the clean-up short (a worker ignoring SIGTERM would never get its
    SIGKILL); only the main thread can hold SIGINT back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _tail(result: JobResult) -> str:
    """The last error line of a job's output (torchrun ends a failed job with its own summary, below the
    worker's exception), then the end of its output and of its error output."""
    text = ""
    errors = [line.strip() for line in result.stderr.splitlines() if ERROR_LINE.match(line.strip())
              and "ChildFailedError" not in line]
    if errors:
        text += f" Last error: {errors[-1]}"
    sections = (("output", result.stdout, TAIL_LINES // 2), ("error output", result.stderr, TAIL_LINES))
    for what, output, count in sections:
        lines = [line.rstrip() for line in output.splitlines() if line.strip()][-count:]
        if lines:
            text += f"\nThe end of its {what}:\n" + "\n".join(f"  {line}" for line in lines)
    return text or " It printed nothing."
