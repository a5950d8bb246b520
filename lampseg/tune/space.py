"""Search spaces over any config key (``tune.space`` in ``conf/tune/*.yaml``) and their Ray Tune form.

    tune:
      space:
        optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
        model.norm: {grid: [batch, group]}

Each entry maps a dotted config key to one domain: ``grid`` (every value, crossed with the other grid
keys), ``choice`` (one value drawn per sample), ``uniform``, ``loguniform`` or ``randint`` (``[low, high]``).
``check_space`` rejects unknown keys, bad domains and values the typed schema would reject, before Ray
starts; ``to_ray`` builds the ``param_space`` and ``apply_params`` writes a trial's values into a config.
"""
from __future__ import annotations

import itertools
import math
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lampseg.config import ConfigError, validate

DOMAINS = ("grid", "choice", "uniform", "loguniform", "randint")


def _domain(key: str, spec: Any) -> tuple[str, list]:
    """``(kind, values)`` of one space entry, or a ConfigError naming ``tune.space.KEY``."""
    where = f"config key 'tune.space.{key}'"
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DOMAINS:
        raise ConfigError(f"{where}: expected one of {{{'|'.join(DOMAINS)}: ...}}, got {spec!r}")
    kind, values = next(iter(spec.items()))
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
    return kind, values


def space_of(cfg: DictConfig) -> dict[str, tuple[str, list]]:
    """``tune.space`` as ``{key: (kind, values)}`` (plain Python values)."""
    space = OmegaConf.to_container(cfg.tune.space, resolve=True)
    return {key: _domain(key, spec) for key, spec in space.items()}


def apply_params(cfg: DictConfig, params: dict[str, Any]) -> DictConfig:
    """A copy of ``cfg`` with each dotted key set to its value (type-checked by the schema)."""
    out = cfg.copy()
    for key, value in params.items():
        if OmegaConf.select(out, key, default=_MISSING) is _MISSING:
            raise ConfigError(f"config key 'tune.space.{key}': there is no config key '{key}'")
        try:
            OmegaConf.update(out, key, value, merge=False)
        except OmegaConfBaseException as e:
            raise ConfigError(f"config key 'tune.space.{key}': {value!r} is not a valid '{key}': "
                              f"{str(e).splitlines()[0]}") from e
    return out


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
        raise ConfigError(f"config key 'tune.space.{grid[0]}': Optuna samples its own points; use choice "
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
            validate(apply_params(cfg, {key: value}))
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
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice,
            "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
            "randint": lambda v: tune.randint(*v)}
    return {key: make[kind](values) for key, (kind, values) in space.items()}


def pbt_mutations(space: dict[str, tuple[str, list]]) -> dict[str, Any]:
    """PBT's ``hyperparam_mutations``: lists stay lists (neighbours are picked), ranges resample."""
    from ray import tune

    make = {"grid": list, "choice": list, "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(*v)}
    return {key: make[kind](values) for key, (kind, values) in space.items()}
