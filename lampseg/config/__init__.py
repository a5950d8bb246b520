"""The config: the typed schema Hydra checks every group and override against (``schema``), and the rules
types cannot express (``checks.validate``). Everything a caller needs is importable from here."""
from lampseg.config.checks import is_auto_patch, patch_size_of, validate
from lampseg.config.schema import (
    Config,
    ConfigError,
    enum_value,
    register_schema,
    to_container,
)

__all__ = ["Config", "ConfigError", "enum_value", "is_auto_patch", "patch_size_of", "register_schema",
           "to_container", "validate"]
