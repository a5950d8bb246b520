"""Local processes as Linux shows them in /proc: a process's start time (so that a recorded pid is known to
be the same process, not a reused number), its descendants by parent links, and ending a whole tree.

A tree is walked through parent links, not process groups or sessions, because torchrun starts each worker
in a session of its own and Ray's processes outlive their parent: signalling a group misses them. Where
/proc is missing (macOS, Windows) the walks find nothing and ``end_tree`` ends the root process only.
"""
from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterable
from pathlib import Path

PROC = Path("/proc")
Process = tuple[int, int]  # (pid, start time in clock ticks after boot): one process, whatever reuses its pid


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a torchrun rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat(pid: int) -> list[str] | None:
    """Fields 3 onwards of /proc/PID/stat (state first), or None when the process is gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()  # the command name in (...) may hold spaces and ')'


def start_time(pid: int) -> int | None:
    """When process ``pid`` started (/proc/PID/stat field 22, clock ticks after boot); None when it is gone
    or a zombie (it has ended; only its exit status is left)."""
    fields = _stat(pid)
    return int(fields[19]) if fields and fields[0] != "Z" else None


def alive(process: Process) -> bool:
    """Whether ``process`` still runs: its pid exists, is not a zombie and started when it was recorded."""
    return start_time(process[0]) == process[1]


def parents() -> dict[int, int]:
    """Every live process's parent: ``{pid: ppid}``."""
    links = {}
    for entry in PROC.iterdir() if PROC.is_dir() else ():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) and fields[0] != "Z":
            links[int(entry.name)] = int(fields[1])
    return links


def descendants(pids: Iterable[int]) -> list[Process]:
    """The live children of ``pids``, their children and so on (not ``pids`` themselves), with start times."""
    links, found, frontier = parents(), {}, set(pids)
    while frontier:
        children = {pid for pid, parent in links.items() if parent in frontier and pid not in found}
        for pid in children:
            if (started := start_time(pid)) is not None:
                found[pid] = started
        frontier = children
    return sorted(found.items())


def ancestors(pid: int | None = None) -> set[int]:
    """``pid`` (default this process) and every process above it."""
    pid = os.getpid() if pid is None else pid
    chain = set()
    while pid > 0 and pid not in chain:
        chain.add(pid)
        fields = _stat(pid)
        pid = int(fields[1]) if fields else 0
    return chain


def signal_all(processes: Iterable[Process], sig: int) -> None:
    """Send ``sig`` to every process of ``processes`` that is still the one recorded (never a reused pid)."""
    for pid, started in processes:
        if start_time(pid) == started:
            try:
                os.kill(pid, sig)
            except OSError:  # ended meanwhile
                pass


def end_tree(root: int, grace_s: float = 3.0) -> list[Process]:
    """End process ``root`` and every process below it, SIGTERM first, SIGKILL after ``grace_s``.

    The tree is recorded before the first signal (a worker whose parent is gone is no longer linked to it)
    and walked again until it is empty, so children started meanwhile end too. ``root`` itself is not
    waited for (its parent reaps it).

    Returns:
        Every process seen in the tree, ``root`` first (those already gone included).
    """
    seen = {root: start_time(root) or 0}
    seen.update(descendants([root]))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        _signal_group(root, sig)
        signal_all(seen.items(), sig)
        if sig == signal.SIGTERM:  # a stopped process handles its SIGTERM only once it runs again
            signal_all(seen.items(), signal.SIGCONT)
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline:
            running = [pid for pid, started in seen.items() if start_time(pid) == started]
            if not running:
                return list(seen.items())
            new = dict(descendants(running))
            signal_all(((p, s) for p, s in new.items() if p not in seen), sig)
            seen.update(new)
            time.sleep(0.05)
    return list(seen.items())


def _signal_group(root: int, sig: int) -> None:
    """Signal ``root``'s process group when ``root`` leads one of its own (its session's other members)."""
    try:
        if os.getpgid(root) == root:
            os.killpg(root, sig)
    except OSError:  # gone, or not a group leader
        pass
