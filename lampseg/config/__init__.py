"""The config: the typed schema Hydra checks every group and override against (``schema``), the rules
types cannot express (``checks.validate``), ``load``: a command line's config composed and checked as
the CLI does, every failure a ``ConfigError`` naming the key, and ``derive``: a checked, read-only variant of
a config. Everything a caller needs is importable from
here."""
from lampseg.config.checks import is_auto_patch, patch_size_of, validate
from lampseg.config.derived import changes_from, checked, derive, is_checked, restore, writable
from lampseg.config.loading import load
from lampseg.config.schema import (
    Config,
    ConfigError,
    enum_value,
    register_schema,
    to_container,
)
from lampseg.config.studies import BENCH_NAMES, DOCTOR_CHECKS

__all__ = ["BENCH_NAMES", "DOCTOR_CHECKS", "Config", "ConfigError", "changes_from", "checked", "derive",
           "enum_value", "is_auto_patch", "is_checked", "load", "patch_size_of", "register_schema", "restore",
           "to_container", "validate", "writable"]
