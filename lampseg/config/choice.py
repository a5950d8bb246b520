"""The one enum style of the schema: a ``Choice`` is a string Hydra checks."""
from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """A string choice Hydra checks (a bad value fails at composition, naming the key and the options); its
    members compare, hash and format as their values on every Python version."""

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, spec: str) -> str:
        return str.__format__(str.__str__(self), spec)
