"""The rules ``checks`` applies to single config values: each raises ``ConfigError`` naming the key, what
would work, and what it got (``config key 'optim.lr': expected a finite number > 0, got nan``)."""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from omegaconf import ListConfig

from lampseg.config.schema import ConfigError

MAX_SECONDS = 1e9  # timeouts and budgets: beyond this Python's timedelta and thread waits overflow


def fail(key: str, expected: str, got: Any) -> None:
    """Raise the ``ConfigError`` of one key."""
    raise ConfigError(f"config key '{key}': expected {expected}, got {got!r}")


def is_int(value: Any) -> bool:
    """An integer that is not a bool (``true`` reaches ``Any`` fields as a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool, not nan or inf)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def as_list(value: Any) -> list | None:
    """A list or ListConfig as a plain list of its items; None for anything else."""
    return list(value) if isinstance(value, (list, tuple, ListConfig)) else None


def at_least(checks: Iterable[tuple[str, Any, int]], null: bool = False) -> None:
    """Each ``(key, value, lowest)``: an integer >= lowest (or null when ``null``)."""
    for key, value, lo in checks:
        if value is None and null:
            continue
        if not is_int(value) or value < lo:
            fail(key, f"an integer >= {lo}" + (" or null" if null else ""), value)


def one_of(checks: Iterable[tuple[str, Any, tuple]]) -> None:
    """Each ``(key, value, allowed)``: one of the allowed values."""
    for key, value, allowed in checks:
        if value not in allowed:
            fail(key, "one of " + "|".join(str(a) for a in allowed), value)


def _interval(low: float | None, high: float | None, open_low: bool, open_high: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
    if low is not None:
        return f"{'>' if open_low else '>='} {low:g}"
    return f"{'<' if open_high else '<='} {high:g}" if high is not None else ""


def in_range(key: str, value: Any, low: float | None = None, high: float | None = None, *,
             open_low: bool = False, open_high: bool = False, null: bool = False) -> None:
    """A finite number in the interval (bounds closed unless ``open_*``), or null when ``null``.

    Args:
        key: the dotted config key (for the message).
        value: its value.
        low: the lowest value, or None for no lower bound.
        high: the highest value, or None for no upper bound.
        open_low: exclude ``low`` itself.
        open_high: exclude ``high`` itself.
        null: null is allowed.

    Raises:
        ConfigError: naming the key and the interval.
    """
    if value is None and null:
        return
    ok = is_number(value) and (low is None or value > low or (value == low and not open_low)) and \
        (high is None or value < high or (value == high and not open_high))
    if not ok:
        fail(key, f"a finite number {_interval(low, high, open_low, open_high)}".rstrip()
             + (" or null" if null else ""), value)


def seconds(key: str, value: Any, null: bool = False) -> None:
    """A positive number of seconds, at most ``MAX_SECONDS`` (or null when ``null``)."""
    in_range(key, value, 0, MAX_SECONDS, open_low=True, null=null)


def positive_ints(key: str, value: Any, length: int | None = None) -> list[int]:
    """A non-empty list of integers >= 1 (of ``length`` entries when given), as a plain list."""
    items = as_list(value)
    if items is None or not items or not all(is_int(v) and v > 0 for v in items):
        fail(key, "a list of positive integers" + (f" ({length} entries)" if length else ""), value)
    if length is not None and len(items) != length:
        fail(key, f"{length} entries", value)
    return items


def numbers_in(key: str, value: Any, low: float, high: float | None = None, *, open_low: bool = False,
               open_high: bool = False) -> list[float]:
    """A non-empty list of finite numbers, each in the interval."""
    items = as_list(value)
    if not items:
        fail(key, f"a non-empty list of numbers {_interval(low, high, open_low, open_high)}", value)
    for k, item in enumerate(items):
        in_range(f"{key}[{k}]", item, low, high, open_low=open_low, open_high=open_high)
    return items
