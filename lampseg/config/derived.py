"""Configs made from configs, never changed in place: ``derive(cfg, {"dotted.key": value})``.

A command that needs a variant of its config (a Tune trial's parameters, a benchmark's arms, the resolved
``run_dir``, ``parallel=auto``'s layout) derives a new one. A derived config is checked (``validate``) and
read-only, and read-only means checked: ``is_checked`` tells the run builder it need not check it again, so
a config is validated once per command, where it is made.

    trial = derive(study, {"optim.lr": 3e-4, "run_dir": str(trial_dir)})
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lampseg.config.checks import validate
from lampseg.config.schema import Config


def derive(cfg: DictConfig, changes: Mapping[str, Any] | None = None, check: bool = True) -> DictConfig:
    """A new read-only config: ``cfg`` with ``changes`` applied (``cfg`` itself is left as it was).

    Args:
        cfg: the config to start from (read-only or not).
        changes: dotted keys -> values; a mapping value is merged into the section it names.
        check: validate the result (only a caller that made every change from an already checked config,
            such as the run builder resolving ``auto`` values, passes False).

    Returns:
        The derived config, read-only.

    Raises:
        ConfigError: naming the key, when the result breaks a rule of ``validate``.
    """
    out = copy.deepcopy(cfg)
    OmegaConf.set_readonly(out, False)
    for key, value in (changes or {}).items():
        OmegaConf.update(out, key, value, merge=isinstance(value, Mapping))
    if check:
        validate(out)
    OmegaConf.set_readonly(out, True)
    return out


def checked(cfg: DictConfig) -> DictConfig:
    """``cfg`` as a checked config: itself when already checked (read-only), else a checked copy."""
    return cfg if is_checked(cfg) else derive(cfg)


def is_checked(cfg: DictConfig) -> bool:
    """Whether ``cfg`` was made by ``load`` or ``derive`` (read-only configs are checked ones)."""
    return bool(OmegaConf.is_readonly(cfg))


def writable(cfg: DictConfig) -> DictConfig:
    """A changeable copy of ``cfg`` (for code that builds a config key by key; ``derive`` it when done)."""
    out = copy.deepcopy(cfg)
    OmegaConf.set_readonly(out, False)
    return out


# arguments of a command, not settings
COMMAND_SECTIONS = ("evaluate", "predict", "visualize", "synth", "export")


def restore(saved: Mapping[str, Any], changes: Mapping[str, Any] | None = None, check: bool = True
            ) -> DictConfig:
    """A checked, read-only config from one a run saved (a checkpoint's ``config``, a study's base), with
    ``changes`` applied (``check=False``: for a caller that derives and checks the final config itself).
    Root keys the schema no longer has (subcommand arguments that sat at the root
    before they moved into their sections) are dropped, so older checkpoints still load.

    Raises:
        ConfigError: naming the key, when the result breaks a rule of ``validate``.
    """
    known = {f.name for f in dataclasses.fields(Config)}
    kept = {k: v for k, v in saved.items() if k in known and k not in COMMAND_SECTIONS}
    return derive(OmegaConf.merge(OmegaConf.structured(Config), kept), changes, check)


def changes_from(cfg: DictConfig, overrides: Sequence[str]) -> dict[str, Any]:
    """The settings a command line changed (``key=value`` and ``group=option``), with their values in the
    composed ``cfg``: what ``evaluate``/``predict`` apply to a checkpoint's config. Hydra's own keys,
    ``+exp=`` files and the subcommands' arguments are not settings of the run."""
    changes = {}
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if key.startswith("hydra") or key == "exp" or key.split(".")[0] in COMMAND_SECTIONS \
                or key == "bench.ckpt":
            continue
        value = OmegaConf.select(cfg, key)
        changes[key] = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    return changes
