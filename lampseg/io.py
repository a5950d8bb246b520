"""Atomic file writes: a crash, a kill or a full disk leaves the old file or the new one, not half."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Stream into a temp file in the same folder, flush + fsync, then rename over ``path``.

    Args:
        path: the destination; its folder is created if needed.
        write: called with the open binary temp file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Atomic write of ``data``."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Atomic text write (UTF-8)."""
    atomic_write_bytes(path, text.encode())


def fsync_dir(directory: str | Path) -> None:
    """Make renames inside ``directory`` durable (best effort; not supported on every platform)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_csv(path: str | Path, rows: list[dict], columns: list[str] | None = None) -> None:
    """``rows`` as a CSV file, written atomically: ``columns`` (default: every key, in first-seen order);
    keys outside ``columns`` are left out."""
    columns = columns if columns is not None else list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(portable(rows))
    atomic_write_text(path, buffer.getvalue())


def portable(value):
    """``value`` with the user's home directory written as ``~`` in every string, recursively (dicts,
    lists, tuples), so that shared artifacts (summaries, results, checkpoints' configs) name no user path;
    ``Path.expanduser``, which lampseg applies to every path it reads from a config, undoes it."""
    home = os.path.expanduser("~").rstrip("/")
    if len(home) < 2:  # no home, or "/": nothing user-specific to hide
        return value
    pattern = re.compile(re.escape(home) + r"(?![^/\s'\",;:)\]}])")

    def walk(v):
        if isinstance(v, str):
            return pattern.sub("~", v)
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(walk(x) for x in v)
        return v

    return walk(value)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: str | Path, data: dict) -> None:
    """Atomic JSON write; NaN/inf become null so the file is strict JSON; the home directory becomes ``~``
    (``portable``)."""
    atomic_write_text(path, json.dumps(_json_safe(portable(data)), indent=2) + "\n")
