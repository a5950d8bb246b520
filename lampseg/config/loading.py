"""Compose a command line's config as the CLI does and check all of it before any work: ``load``.

    cfg = load(["+exp=smoke", "optim.lr=1e-3"], config_dir)   # composed, resolved, checked

Every failure is one ``ConfigError`` naming the key (``config key 'optim.lr': expected a number, got
'abc' ...``), whether Hydra's override parser, its composition, the schema's types, an interpolation or
``validate`` found it. The config groups (``data=``, ``model=``, ``+exp=``, ...) are composed by Hydra's
compose API and kept per combination; the key overrides are then applied one by one with the function
Hydra applies them with (``ConfigLoaderImpl._apply_overrides_to_config``: the same parser, merge and type
checks), so that each error names its override and a second config with the same groups costs
milliseconds, not a composition (tests/test_config_fuzz.py checks both paths give the same config).
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import pickle
import typing
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lampseg.config.checks import validate
from lampseg.config.commands import SHORT_ARGUMENTS
from lampseg.config.schema import Config, ConfigError, register_schema

# A group option whose YAML leaves a key to the user (``???``): OmegaConf keeps the schema's default when it
# merges ``???`` onto it, so ``data=msd`` without ``data.root`` would train on the synthetic data instead.
REQUIRED = {("data", "msd"): ("data.root", "an MSD dataset folder (dataset.json, imagesTr/, labelsTr/)")}
CACHED_GROUP_SETS = 128  # compositions kept (one per combination of group overrides)
_composed: dict[tuple[str, tuple[str, ...]], bytes | ConfigError] = {}  # pickled: 5x faster than deepcopy
_PARSER = OverridesParser.create()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _key_of(line: str) -> str:
    return line.split("=", 1)[0].lstrip("+~")


def _parse(line: str) -> Override:
    """One override, parsed by Hydra's grammar (as ``@hydra.main`` parses the command line)."""
    try:
        override = _PARSER.parse_overrides([line])[0]
        ConfigLoaderImpl.validate_sweep_overrides_legal([override], run_mode=RunMode.RUN, from_shell=True)
    except HydraException as e:
        raise ConfigError(f"config key '{_key_of(line)}': the override {line!r} is not valid: "
                          f"{' '.join(str(e).split())}") from e
    if not override.key_or_group:
        raise ConfigError(f"config key '': expected KEY=VALUE, got {line!r}")
    return override


@functools.lru_cache(maxsize=16)
def groups_of(config_dir: str) -> dict[str, list[str]]:
    """The config groups of ``config_dir`` (``model``, ``hydra/launcher``, ...) -> their options (read once
    per folder and process: callers must not change the returned dict)."""
    root = Path(config_dir)
    return {str(d.relative_to(root)): sorted(p.stem for p in d.glob("*.yaml"))
            for d in sorted(root.rglob("*")) if d.is_dir() and any(d.glob("*.yaml"))}


def _is_group(override: Override, groups: dict[str, list[str]]) -> bool:
    """Whether Hydra composes it into the defaults list (a group choice) rather than merging a value."""
    key = override.key_or_group
    hydra = key == "hydra" or key.startswith(("hydra/", "hydra."))
    return hydra or "/" in key or (key in groups and not isinstance(override.value(), dict))


def _check_choice(override: Override, groups: dict[str, list[str]]) -> None:
    key, value = override.key_or_group, override.value()
    if key in groups and not key.startswith("hydra") and not override.is_delete() \
            and isinstance(value, str) and value not in groups[key]:
        raise ConfigError(f"config key '{key}': expected one of {'|'.join(groups[key])} "
                          f"(conf/{key}/*.yaml), got {value!r}")


def _group_error(lines: tuple[str, ...], error: Exception) -> ConfigError:
    """A composition error, attributed to the group override it names (else the first one)."""
    text = " ".join(str(error).split())
    named = [_key_of(line) for line in lines if f"'{_key_of(line)}" in text or f"{_key_of(line)}/" in text]
    key = (named or [_key_of(line) for line in lines] or ["defaults"])[0]
    return ConfigError(f"config key '{key}': {text.split(' Config search path:')[0]}")


def _compose_groups(config_dir: str, lines: tuple[str, ...]) -> DictConfig:
    """``config_dir``'s config with these group overrides, composed by Hydra once per combination."""
    cache_key = (config_dir, lines)
    if cache_key not in _composed:
        register_schema()
        try:
            with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
                _composed[cache_key] = pickle.dumps(compose("config", overrides=list(lines)))
        except (HydraException, OmegaConfBaseException, ValueError) as e:  # ValueError: Hydra's own checks
            _composed[cache_key] = _group_error(lines, e)
        while len(_composed) > CACHED_GROUP_SETS:
            _composed.pop(next(iter(_composed)))
    outcome = _composed[cache_key]
    if isinstance(outcome, ConfigError):
        raise ConfigError(str(outcome))
    return pickle.loads(outcome)


@functools.cache
def _fields(schema: Any) -> dict[str, Any]:
    """A schema dataclass's field name -> type (resolved annotations)."""
    return typing.get_type_hints(schema)


def _schema_type(key: str) -> Any:
    """The schema's type of a dotted key (None when the schema has no such key)."""
    node: Any = Config
    for part in key.split("."):
        if not dataclasses.is_dataclass(node):
            return None
        node = _fields(node).get(part)
    return node


def describe(tp: Any) -> str:
    """A schema type in words: ``int | None`` -> "an integer or null"."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if type(None) in typing.get_args(tp):
        return f"{describe(args[0])} or null"
    if typing.get_origin(tp) is list:
        plural = {"an integer": "integers", "a number": "numbers", "a string": "strings", "a value": "values"}
        return "a list of " + plural.get(describe(args[0]), "values") if args else "a list"
    if isinstance(tp, type) and issubclass(tp, Enum):
        return "one of " + "|".join(str(m.value) for m in tp)
    if dataclasses.is_dataclass(tp):
        return "a mapping of " + ", ".join(f.name for f in dataclasses.fields(tp))
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return words.get(tp, "a mapping" if typing.get_origin(tp) is dict else "a value")


def _did_you_mean(key: str) -> str:
    """``; did you mean 'trainer.max_epochs'?`` for a misspelt key whose section exists, else ``''``."""
    section, _, name = key.rpartition(".")
    node = _schema_type(section) if section else Config
    if not dataclasses.is_dataclass(node):
        return ""
    close = difflib.get_close_matches(name, list(_fields(node)), n=1)
    return f"; did you mean '{section + '.' if section else ''}{close[0]}'?" if close else ""


def _apply_error(override: Override, error: Exception) -> ConfigError:
    """Hydra's (or OmegaConf's) error applying one key override, as a ``ConfigError`` naming the key."""
    key, value = override.key_or_group, override.input_line.split("=", 1)[-1]
    reason = _first_line(error.__cause__ or error)
    known = _schema_type(key)
    if override.is_delete():
        return ConfigError(f"config key '{key}': cannot be deleted ({reason}); set it instead")
    if known is None:
        return ConfigError(f"config key '{key}': no such key in the config{_did_you_mean(key)} ({reason})")
    if override.is_add():
        return ConfigError(f"config key '{key}': already in the config, so '+' cannot add it: set it with "
                           f"{key}={value} ({reason})")
    return ConfigError(f"config key '{key}': expected {describe(known)}, got {value!r} ({reason})")


def _is_mapping(tp: Any) -> bool:
    return any(typing.get_origin(t) is dict for t in (tp, *typing.get_args(tp)))


def _unresolved(cfg: DictConfig, key: str) -> Any:
    """The value at ``key`` without failing (0 when absent or an interpolation that does not resolve)."""
    return OmegaConf.select(cfg, key, default=0, throw_on_resolution_failure=False)


def _check_applicable(override: Override, cfg: DictConfig) -> None:
    """What Hydra's override application fails at with an exception of Python's own (refused first): merging
    into a null value (``data.regions={a: [1]}`` or ``data.regions.a=[1]`` while ``data.regions`` is null:
    an AttributeError or an AssertionError), deleting a list item (``~model.channels.0``: a TypeError)."""
    key, parts = override.key_or_group, override.key_or_group.split(".")
    parent = ".".join(parts[:-1])
    if override.is_delete():
        if parent and isinstance(_unresolved(cfg, parent), ListConfig):
            raise ConfigError(f"config key '{key}': a list item cannot be deleted (~); set the whole list "
                              f"instead, e.g. {parent}=[...]")
        return
    for depth in range(1, len(parts) + 1 if isinstance(override.value(), dict) else len(parts)):
        prefix = ".".join(parts[:depth])
        if _unresolved(cfg, prefix) is not None:
            continue
        tp = _schema_type(prefix)
        if _is_mapping(tp):
            raise ConfigError(f"config key '{key}': '{prefix}' is null here and Hydra cannot merge into a "
                              f"null mapping; set '{prefix}' in a config file (a data group or an +exp file)")
        raise ConfigError(f"config key '{key}': expected {describe(tp)} at '{prefix}', got "
                          f"{override.input_line!r} (a mapping or a key below it)")


def _apply(override: Override, cfg: DictConfig) -> None:
    """One key override, applied as Hydra applies it; its error names its key."""
    _check_applicable(override, cfg)
    try:
        ConfigLoaderImpl._apply_overrides_to_config([override], cfg)
    except (HydraException, OmegaConfBaseException) as e:
        raise _apply_error(override, e) from e


def _leaves(node: Any, path: str = "") -> list[tuple[str, Any]]:
    """``(dotted key, raw value)`` of every leaf of a plain container (list items as ``key[i]``)."""
    if isinstance(node, dict):
        return [leaf for k, v in node.items() for leaf in _leaves(v, f"{path}.{k}" if path else str(k))]
    if isinstance(node, list):
        return [leaf for i, v in enumerate(node) for leaf in _leaves(v, f"{path}[{i}]")]
    return [(path, node)]


def _check_resolves(cfg: DictConfig, raw: dict) -> None:
    """Every interpolation resolves to a value of the key's type; no value is missing (``???``)."""
    for key, value in _leaves(raw):
        if value == "???":
            raise ConfigError(f"config key '{key}': expected {describe(_schema_type(key))}, got '???' "
                              f"(a missing value)")
        if isinstance(value, str) and "${" in value and "${hydra:" not in value:  # hydra: under @hydra.main
            try:
                resolved = OmegaConf.select(cfg, key, throw_on_resolution_failure=True, throw_on_missing=True)
            except OmegaConfBaseException as e:
                raise ConfigError(f"config key '{key}': {value!r} does not resolve ({_first_line(e)})") from e
            tp = _schema_type(key)
            if dataclasses.is_dataclass(tp) and not isinstance(resolved, DictConfig):  # a whole section
                raise ConfigError(f"config key '{key}': expected {describe(tp)}, got {value!r} (resolves to "
                                  f"{resolved!r})")


def _check_keys(raw: dict, schema: Any, path: str = "") -> None:
    """The config has exactly the schema's keys: none added (``+key=``), none deleted (``~key``)."""
    fields = _fields(schema)
    prefix = f"{path}." if path else ""
    for key in raw:
        if key not in fields:
            raise ConfigError(f"config key '{prefix}{key}': not a key of {path or 'the config'} (a typo?); "
                              f"its keys: {', '.join(fields)}")
    for key, tp in fields.items():
        if key not in raw:
            raise ConfigError(f"config key '{prefix}{key}': expected {describe(tp)}, got nothing (deleted "
                              f"with ~{prefix}{key}?); set it instead")
        if dataclasses.is_dataclass(tp) and isinstance(raw[key], dict):
            _check_keys(raw[key], tp, prefix + key)


def compose_config(overrides: Sequence[str], config_dir: str) -> DictConfig:
    """The config Hydra composes for ``overrides`` (its parser, defaults list, merge and type checks), its
    errors as ``ConfigError``s naming the key; not checked further (``load`` does that).

    Args:
        overrides: Hydra overrides (``key=value``, ``group=option``, ``+exp=name``, ``~key``).
        config_dir: the path of ``conf/``.

    Raises:
        ConfigError: an override Hydra cannot parse or apply, a group option that does not exist, a wrong
            type.
    """
    parsed = [_parse(line) for line in overrides]
    groups = groups_of(config_dir)
    if not any(o.key_or_group == "hydra.searchpath" for o in parsed):  # else other folders add options
        for override in parsed:
            _check_choice(override, groups)
    chosen = tuple(o.input_line for o in parsed if _is_group(o, groups))
    cfg = _compose_groups(str(Path(config_dir).resolve()), chosen)
    for override in parsed:
        if not _is_group(override, groups):
            _apply(override, cfg)
    return cfg


def _check_required(overrides: Sequence[str], cfg: DictConfig) -> None:
    """The keys a chosen group option leaves to the user (``REQUIRED``) are set."""
    for line in overrides:
        group, _, option = line.lstrip("+~").partition("=")
        if (group, option) in REQUIRED:
            key, what = REQUIRED[(group, option)]
            if OmegaConf.select(cfg, key) is None:
                raise ConfigError(f"config key '{key}': {group}={option} expected {what}: {key}=PATH, got "
                                  f"None (the default {group} generates a synthetic dataset instead)")


def qualify(subcommand: str, overrides: Sequence[str]) -> list[str]:
    """The command line with ``subcommand``'s own arguments in their section (``commands.SHORT_ARGUMENTS``):
    ``evaluate ckpt=PATH`` -> ``evaluate.ckpt=PATH``, ``bench inference ckpt=PATH`` -> ``bench.ckpt=PATH``."""
    short = SHORT_ARGUMENTS.get(subcommand, ())
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        out.append(f"{subcommand}.{key}={value}" if sep and key in short else item)
    return out


def load(overrides: Sequence[str], config_dir: str) -> DictConfig:
    """The config of ``python -m lampseg SUBCOMMAND OVERRIDES``, composed and checked as the CLI does.

    Args:
        overrides: Hydra overrides (``key=value``, ``group=option``, ``+exp=name``, ``~key``).
        config_dir: the path of ``conf/``.

    Returns:
        The composed config (struct mode, without the ``hydra`` node), which ``validate`` accepted;
        read-only, as every checked config is (``derived.is_checked``).

    Raises:
        ConfigError: naming the first key at fault: an override Hydra cannot parse or apply, a group option
            that does not exist, a wrong type, an unknown or deleted key, an interpolation that does not
            resolve, or a value ``validate`` refuses.
    """
    cfg = compose_config(overrides, config_dir)
    check(cfg, overrides)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def check(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """What ``load`` checks once the config is composed, for a config Hydra composed itself (each job of a
    ``-m`` multirun): required keys of the chosen groups, interpolations, no added or deleted keys, and
    ``validate``.

    Raises:
        ConfigError: naming the first key at fault.
    """
    _check_required(overrides, cfg)
    raw = OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)
    _check_resolves(cfg, raw)
    _check_keys(raw, Config)
    validate(cfg)
