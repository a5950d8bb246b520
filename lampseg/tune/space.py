"""Search spaces over any config key (``tune.space`` in ``conf/tune/*.yaml``) and their Ray Tune form.

    tune:
      space:
        - {key: optim.lr, loguniform: [1.0e-4, 1.0e-2]}
        - {key: model.norm, grid: [batch, group]}

    python -m lampseg tune 'tune.space=[{key:optim.lr,grid:[1e-3,3e-3]},{key:model.norm,grid:[batch,group]}]'

Each entry names a dotted config key and one domain: ``grid`` (every value, crossed with the other grid
keys), ``choice`` (one value drawn per sample), ``uniform``, ``loguniform`` or ``randint`` (``[low, high]``).
A list, not a mapping, so that a command-line ``tune.space=[...]`` replaces a preset's space (Hydra merges
mappings key by key).
``check_space`` rejects unknown keys, bad domains and values the typed schema would reject, before Ray
starts; ``to_ray`` builds the ``param_space`` and ``apply_params`` writes a trial's values into a config.
"""
from __future__ import annotations

import itertools
import math
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lampseg.config import ConfigError, derive, writable

DOMAINS = ("grid", "choice", "uniform", "loguniform", "randint")


def _domain(index: int, entry: Any) -> tuple[str, str, list]:
    """``(key, kind, values)`` of one space entry, or a ConfigError naming ``tune.space[index]``."""
    where = f"config key 'tune.space[{index}]'"
    kinds = [k for k in DOMAINS if isinstance(entry, dict) and k in entry]
    if not isinstance(entry, dict) or not isinstance(entry.get("key"), str) or len(kinds) != 1 \
            or set(entry) != {"key", kinds[0]}:
        raise ConfigError(f"{where}: expected {{key: CONFIG.KEY, {'|'.join(DOMAINS)}: [...]}}, got {entry!r}")
    key, kind = entry["key"], kinds[0]
    where = f"config key 'tune.space[{index}]' ({key})"
    values = entry[kind]
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: expected a non-empty list for '{kind}', got {values!r}")
    if kind in ("uniform", "loguniform", "randint"):
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if len(values) != 2 or not numbers or not values[0] < values[1]:
            raise ConfigError(f"{where}: expected [low, high] with low < high for '{kind}', got {values!r}")
        if kind == "loguniform" and values[0] <= 0:
            raise ConfigError(f"{where}: expected low > 0 for 'loguniform', got {values!r}")
        if kind == "randint" and not all(isinstance(v, int) for v in values):
            raise ConfigError(f"{where}: expected integers for 'randint', got {values!r}")
    return key, kind, values


def space_of(cfg: DictConfig) -> dict[str, tuple[str, list]]:
    """``tune.space`` as ``{key: (kind, values)}`` (plain Python values, in the listed order)."""
    entries = OmegaConf.to_container(cfg.tune.space, resolve=True) if cfg.tune.space is not None else []
    space: dict[str, tuple[str, list]] = {}
    for index, entry in enumerate(entries):
        key, kind, values = _domain(index, entry)
        if key in space:
            raise ConfigError(f"config key 'tune.space[{index}]': '{key}' is listed twice")
        space[key] = (kind, values)
    return space


def apply_params(cfg: DictConfig, params: dict[str, Any]) -> DictConfig:
    """A new, checked and read-only config (``config.derive``): ``cfg`` with each dotted key set to its value
    (type-checked by the schema, then ``validate``).

    Raises:
        ConfigError: naming the ``tune.space`` key whose value the schema or ``validate`` refuses.
    """
    out = writable(cfg)
    for key, value in params.items():
        if OmegaConf.select(out, key, default=_MISSING) is _MISSING:
            raise ConfigError(f"config key 'tune.space' ({key}): there is no config key '{key}'")
        try:
            OmegaConf.update(out, key, value, merge=False)
        except OmegaConfBaseException as e:
            raise ConfigError(f"config key 'tune.space' ({key}): {value!r} is not a valid '{key}': "
                              f"{str(e).splitlines()[0]}") from e
    return derive(out)


_MISSING = object()


def _probes(kind: str, values: list) -> list:
    """Values of a domain that a config check should try: each listed value, or both ends of a range."""
    if kind in ("grid", "choice"):
        return values
    if kind == "randint":
        return [values[0], values[1] - 1]
    return [float(values[0]), float(values[1])]


def check_space(cfg: DictConfig) -> dict[str, tuple[str, list]]:
    """Validate the study before any trial starts: every key exists, every value type-checks, the config
    with each probe value passes ``validate``, and the search algorithm supports the domains.

    Raises:
        ConfigError: naming the ``tune.space`` entry or ``tune.*`` key at fault.
    """
    space = space_of(cfg)
    search, scheduler = cfg.tune.search, cfg.tune.scheduler
    grid = [k for k, (kind, _) in space.items() if kind == "grid"]
    if search == "optuna" and grid:
        raise ConfigError(f"config key 'tune.space' ({grid[0]}): Optuna samples its own points; use choice "
                          "instead of grid with tune.search=optuna")
    if scheduler in ("asha", "pbt") and cfg.trainer.val_every != 1:
        raise ConfigError(f"config key 'trainer.val_every': tune.scheduler={scheduler} compares trials on "
                          f"every epoch's {cfg.tune.metric}; expected 1, got {cfg.trainer.val_every}")
    if scheduler == "pbt" and not space:
        raise ConfigError("config key 'tune.space': PBT needs at least one hyperparameter to perturb")
    if cfg.tune.metric != "val_dice" and not cfg.tune.metric.startswith(("val_", "train_loss")):
        raise ConfigError(f"config key 'tune.metric': expected val_dice, val_dice_<name>, val_hd95_<name> or "
                          f"train_loss, got {cfg.tune.metric!r}")
    for key, (kind, values) in space.items():
        for value in _probes(kind, values):
            apply_params(cfg, {key: value})  # checked as every trial will be
    return space


def grid_size(space: dict[str, tuple[str, list]]) -> int:
    """Trials per sample of the space: the product of the grid lengths (1 without grid keys)."""
    return math.prod(len(values) for kind, values in space.values() if kind == "grid")


def grid_points(space: dict[str, tuple[str, list]]) -> list[dict[str, Any]]:
    """Every combination of the grid keys (for listing a study's trials)."""
    keys = [k for k, (kind, _) in space.items() if kind == "grid"]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(space[k][1] for k in keys))]


def to_ray(space: dict[str, tuple[str, list]]) -> dict[str, Any]:
    """Ray Tune's ``param_space`` (keys stay dotted: a trial's config is ``{key: value}``)."""
    from ray import tune  # lazy: Ray/Optuna take seconds to import

    make = {"grid": tune.grid_search, "choice": tune.choice,
            "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
            "randint": lambda v: tune.randint(*v)}
    return {key: make[kind](values) for key, (kind, values) in space.items()}


def pbt_mutations(space: dict[str, tuple[str, list]]) -> dict[str, Any]:
    """PBT's ``hyperparam_mutations``: lists stay lists (neighbours are picked), ranges resample."""
    from ray import tune  # lazy: Ray/Optuna take seconds to import

    make = {"grid": list, "choice": list, "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(*v)}
    return {key: make[kind](values) for key, (kind, values) in space.items()}
