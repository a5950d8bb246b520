"""Property-based fuzzing of the config: random command lines over every config group and every key of the
schema must load or fail with one `ConfigError` that names a key, never another exception.

Each example is a set of group choices (``data=``, ``model=``, ``optim=``, ``trainer=``, ``inference=``,
``parallel=``, ``tune=``, ``+exp=``: every option of every group, some combinations, some bad choices)
plus zero to three key overrides drawn over every key of the schema: values of the key's type, boundary
values, wrong types, unknown keys, nonsense strings, nan and infinities, lists of the wrong length, null,
interpolations, ``+``/``++``/``~`` forms. It runs through `lampseg.config.load`, the function the CLI
calls before any work (Hydra's composition and override application, then every check):

* in-process (``LAMPSEG_CONFIG_FUZZ_EXAMPLES``, default 2000): success, or a `ConfigError` whose single
  line says ``config key '...'`` and names a drawn key or a section of the schema;
* as ``python -m lampseg plan`` / ``train`` subprocesses (``LAMPSEG_CONFIG_FUZZ_CLI_EXAMPLES``, default 20,
  run a few at a time): exit 0, 1 or 2, never a traceback; exit 2 with `load`'s very message whenever
  `load` refuses the config, and for ``train`` before anything is written.

`load` composes each combination of groups once (Hydra's compose API) and applies the key overrides with
Hydra's own function; `test_load_composes_as_hydra_does` checks that against Hydra's full composition.
`FOUND_BUGS` are replayed first in every run; docs/RELIABILITY.md ("Config fuzzing") has the counts. A
tally is written as JSON to ``$LAMPSEG_CONFIG_FUZZ_REPORT`` when set::

    LAMPSEG_CONFIG_FUZZ_EXAMPLES=10000 LAMPSEG_CONFIG_FUZZ_REPORT=/tmp/cfg.json \
        pytest tests/test_config_fuzz.py
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import typing
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, replay_first
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from lampseg.__main__ import config_dir
from lampseg.config import Config, ConfigError, load, register_schema
from lampseg.config.loading import compose_config, groups_of

EXAMPLES = int(os.environ.get("LAMPSEG_CONFIG_FUZZ_EXAMPLES", "2000"))
CLI_EXAMPLES = int(os.environ.get("LAMPSEG_CONFIG_FUZZ_CLI_EXAMPLES", "20"))
CLI_TRAIN = 3  # of the CLI examples, this many config errors go through `train` instead of `plan`
CLI_PROCESSES = 3
CLI_TIMEOUT_S = 180
CONF = config_dir()
GROUPS = {g: options for g, options in groups_of(CONF).items() if not g.startswith("hydra")}


# --------------------------------------------------------------------------------------------------
# What to draw: group choices, keys, values
# --------------------------------------------------------------------------------------------------

def _choice(group: str, option: str) -> str:
    return f"+exp={option}" if group == "exp" else f"{group}={option}"


def _group_sets() -> list[tuple[str, ...]]:
    """No choice, every option of every group alone, seeded random combinations, and bad choices."""
    sets: list[tuple[str, ...]] = [()]
    sets += [(_choice(g, o),) for g, options in GROUPS.items() for o in options]
    rng = random.Random(0)
    for _ in range(16):
        picked = rng.sample(sorted(GROUPS), rng.randint(2, 5))
        sets.append(tuple(_choice(g, rng.choice(GROUPS[g])) for g in picked))
    sets += [("model=nonsense",), ("exp=smoke",), ("+model=unet32",), ("~model",), ("model=[unet32,unet64]",),
             ("optim=",), ("data=null",), ("+exp=smoke", "+exp=brats"), ("hydra/launcher=nosuch",),
             ("tune=asha_random", "+tune=pbt"), ("parallel={name:ddp}",)]
    return sets


GROUP_SETS = _group_sets()


def _schema_keys(schema: Any = Config, prefix: str = "") -> dict[str, Any]:
    """Every leaf key of the schema (dotted) -> its type."""
    keys: dict[str, Any] = {}
    for name, tp in typing.get_type_hints(schema).items():
        if dataclasses.is_dataclass(tp):
            keys.update(_schema_keys(tp, f"{prefix}{name}."))
        else:
            keys[f"{prefix}{name}"] = tp
    return keys


KEYS = _schema_keys()
SECTIONS = tuple(typing.get_type_hints(Config))
UNKNOWN_KEYS = ("optim.foo", "trainer.max_epoch", "nosuch", "data.synthetic.nope", "model.channels.0",
                "bench", "parallel.backend.x", "data.regions.XX", "tune.asha.nope", "hydra.nosuch")
NONSENSE = ("abc", "null", "[]", "{}", "[1,2]", "{a: 1}", "1.5", "-1", "0", "nan", "inf", "-inf", "1e308",
            "true", "'x y'", "${seed}", "${nosuch}", "${optim}", "???", "[[1]]", "whole", "auto", "''", "1,2",
            "[1,", "${oc.env:HOME}", "ü", "[1,2,3]", "[null]", "2147483648", "18446744073709551616", "-0.0",
            "1e-320", "[a,b,c]", "{key: optim.lr, grid: [1]}", "[{key: 1}]", "x=y", "'[1,2]'",
            "${data.patch_size}")
WORDS = ("auto", "cpu", "cuda", "cuda:0", "cuda:x", "never", "last.pt", "grid", "random", "optuna", "fifo",
         "asha", "pbt", "max", "min", "gpipe", "1f1b", "gloo", "nccl", "cpu:gloo,cuda:nccl", "4d", "3d",
         "brats", "known_importance", "laterality", "none", "error", "zero", "wilcoxon", "ttest", "final",
         "best", "patients", "val_dice", "val_loss", "single", "ddp", "pipeline", "spatial", "inference",
         "overhead", "context", "whole", "FLAIR", "T1w", "/tmp/nosuch")
BOUNDARY_INTS = st.sampled_from(["-1", "0", "1", "2"])
INT_TEXT = BOUNDARY_INTS | st.sampled_from([3, 4, 5, 7, 8, 16, 24, 32, 48, 63, 64, 65, 96, 128, 2**31, 2**32,
                                            2**63]).map(str) | st.integers(-5, 200).map(str)
BOUNDARY_FLOATS = st.sampled_from(["0", "1", "nan", "inf", "-inf", "-0.5", "1e300"])
FLOAT_TEXT = BOUNDARY_FLOATS | st.sampled_from(["0.0", "1.0", "0.5", "0.25", "0.99", "1e-9", "2", "600",
                                                "1e-300"]) | st.floats(-10, 1000).map(repr)
WORD_TEXT = st.sampled_from(WORDS) | st.text("abcxyz019_-./:", max_size=8)
NONSENSE_TEXT = st.sampled_from(NONSENSE) | st.text(max_size=6)


def _listed(items: st.SearchStrategy[str], max_size: int = 5) -> st.SearchStrategy[str]:
    return st.lists(items, max_size=max_size).map(lambda xs: "[" + ",".join(xs) + "]")


def _value(tp: Any) -> st.SearchStrategy[str]:
    """Override text for a value of schema type ``tp``: often a value of the type, sometimes null."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if type(None) in typing.get_args(tp):
        return _value(args[0]) | st.just("null")
    if typing.get_origin(tp) is list:
        return _listed(_value(args[0]) if args and args[0] is not Any else _value(Any))
    if typing.get_origin(tp) is dict:
        return st.sampled_from(["{WT: [1, 2, 3]}", "{a: [1]}", "{}", "{a: []}", "{a: [0]}", "{TC: [2, 3]}"])
    if isinstance(tp, type) and issubclass(tp, Enum):
        return st.sampled_from([str(m.value) for m in tp]) | WORD_TEXT
    scalars = {bool: st.sampled_from(["true", "false", "True", "0", "1", "yes"]), int: INT_TEXT,
               float: FLOAT_TEXT, str: WORD_TEXT}
    if tp in scalars:
        return scalars[tp]
    return INT_TEXT | WORD_TEXT | _listed(INT_TEXT | st.just("whole"), 4)  # Any


@st.composite
def key_overrides(draw: st.DrawFn) -> str:
    """One key override: mostly ``key=value`` of the key's type, else nonsense, unknown keys, +/++/~."""
    known = draw(st.integers(0, 7)) > 0  # 1 in 8 an unknown key; 1 in 4 a nonsense value
    key = draw(st.sampled_from(sorted(KEYS) if known else UNKNOWN_KEYS))
    value = draw(_value(KEYS.get(key, Any)) if draw(st.integers(0, 3)) else NONSENSE_TEXT)
    form = draw(st.sampled_from(["{k}={v}"] * 20 + ["+{k}={v}", "++{k}={v}", "~{k}", "~{k}={v}", "{k}"]))
    return form.format(k=key, v=value)


overrides = st.tuples(st.sampled_from(GROUP_SETS), st.lists(key_overrides(), max_size=3))
Draw = tuple[tuple[str, ...], list[str]]

# --------------------------------------------------------------------------------------------------
# Bugs found (all fixed in lampseg.config): explicit examples, run before the random ones. Each comment
# says what used to escape (a traceback, or a value silently ignored).
# --------------------------------------------------------------------------------------------------

FOUND_BUGS: dict[str, Draw] = {
    # Found by this fuzzer. OmegaConf.update (Hydra's override application): an AssertionError for a key
    # below a null mapping (data.regions is null unless a data group sets it).
    "key below a null mapping": ((), ["data.regions.XX=-1"]),
    # ListConfig.__delitem__ (Hydra's ~ deletion): a TypeError for a list item.
    "deleted list item": ((), ["~model.channels.0"]),
    # validate: `batch_size % microbatches`, a ZeroDivisionError.
    "zero micro-batches": (("parallel={name:ddp}",), ["++parallel.microbatches=0"]),
    # An interpolation of the wrong type: InterpolationValidationError when validate (or a command) read it.
    "interpolated mapping": ((), ["parallel.sp=${oc.env:HOME}"]),
    "interpolated list": ((), ["split=${data.patch_size}"]),
    # Accepted nan and infinities: no check of these keys, or `x <= 0` (False for nan).
    "infinite tflops": (("model=unet_small",), ["++parallel.device_tflops=inf"]),
    "infinite doctor timeout": ((), ["doctor.timeout_s=inf"]),
    "nan budget": (("data=brats", "parallel=ddp"), ["bench.auto_budgets_gb=[nan,128.9,1e-9]"]),
    "nan stage budget": ((), ["bench.memory_gb=nan"]),
    "-inf quantile": (("tune=berral_grid",), ["tune.pbt.quantile_fraction=-inf"]),
    # A missing value (???): MissingMandatoryValue when validate read it.
    "missing value": ((), ["data.num_workers=???"]),
    # A message that named '~hydra.nosuch' instead of the key (in load itself, while it was written).
    "deleted hydra key": ((), ["~hydra.nosuch"]),
    # Found by reading the code (issue 25), replayed here too.
    "mapping into null": ((), ["data.regions={a:[1]}"]),  # an AttributeError in OmegaConf's merge
    "added typo": ((), ["+trainer.max_epoch=3"]),  # silently ignored
    "unresolved interpolation": ((), ["optim.lr=${nosuch}"]),  # InterpolationKeyError
    "even kernel": ((), ["model.kernel_size=4"]),  # MONAI's NotImplementedError when the model is built
    "zero bench steps": ((), ["bench.steps=0"]),  # statistics.median([]) in a benchmark's worker
    "no doctor checks": ((), ["doctor.checks=[]"]),  # "0 of 0 checks passed", exit 0
    "seed beyond 2**32": ((), ["seed=4294967296"]),  # a ValueError in Optuna's and Tune's samplers
    "negative data seed": ((), ["data.synthetic.seed=-1"]),  # a ValueError in numpy's SeedSequence
    "window not a multiple": ((), ["inference.patch_size=[36,32,32]"]),  # checked only for being positive
    "spacing resolving to a string": ((), ["data.target_spacing=${oc.env:HOME}"]),  # len(None) in validate
    "a section resolving to a list": ((), ["bench=${data.patch_size}"]),  # ConfigAttributeError in validate
}


# --------------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------------

TALLY: dict[str, dict[str, Any]] = {}


def _tally(test: str) -> dict[str, Any]:
    return TALLY.setdefault(test, {"examples": 0, "loaded": 0, "config_errors": 0, "seconds": 0.0,
                                   "keys": Counter(), "outcomes": Counter()})


def _write_report() -> None:
    path = os.environ.get("LAMPSEG_CONFIG_FUZZ_REPORT")
    if path:
        report = {name: {**t, "keys": dict(t["keys"].most_common()), "outcomes": dict(t["outcomes"])}
                  for name, t in TALLY.items()}
        Path(path).write_text(json.dumps(report, indent=2) + "\n")


def _key_of(line: str) -> str:
    return line.split("=", 1)[0].lstrip("+~")


def _assert_names_a_key(error: ConfigError, lines: list[str]) -> str:
    """One line, ``config key 'K'`` with K a drawn key, a group, or a key of the schema's sections."""
    message = str(error)
    assert "\n" not in message and "Traceback" not in message, message
    found = re.search(r"config key '([^']*)'", message)
    assert found, message
    key = found.group(1)
    drawn = {_key_of(line) for line in lines}
    section = re.split(r"[.\[]", key)[0]
    assert key in drawn or section in SECTIONS or key in GROUPS, f"{message}\n(drawn: {lines})"
    return key


def _floats(node: Any) -> Iterator[float]:
    if isinstance(node, dict):
        node = list(node.values())
    if isinstance(node, list):
        for item in node:
            yield from _floats(item)
    elif isinstance(node, float):
        yield node


def _assert_sane(cfg: Any, lines: list[str]) -> None:
    """What validation promises of every config it accepts: it resolves, and holds no nan or infinity (no
    key of lampseg takes one)."""
    values = OmegaConf.to_container(cfg, resolve=True)
    assert all(math.isfinite(v) for v in _floats(values)), f"accepted a nan or an infinity: {lines}"


def _load(lines: list[str]) -> ConfigError | None:
    """``load``'s verdict: None (loaded) or its ConfigError; any other exception propagates (a failure)."""
    try:
        cfg = load(lines, CONF)
    except ConfigError as e:
        return e
    _assert_sane(cfg, lines)
    return None


@pytest.fixture(autouse=True, scope="module")
def _hypothesis_storage() -> Iterator[None]:
    """Keep hypothesis's cache in a temporary folder instead of ``.hypothesis/`` in the repo."""
    from hypothesis.configuration import set_hypothesis_home_dir

    with tempfile.TemporaryDirectory(prefix="lampseg-config-fuzz-") as tmp:
        set_hypothesis_home_dir(tmp)
        try:
            yield
        finally:
            set_hypothesis_home_dir(None)


def test_every_valid_group_set_loads() -> None:
    """Every option of every group, alone and in the drawn combinations, loads as shipped (so the errors
    below come from the drawn overrides); ``data=msd`` needs ``data.root``."""
    for groups in GROUP_SETS[: GROUP_SETS.index(("model=nonsense",))]:
        error = _load([*groups, "data.root=/data"] if "data=msd" in groups else list(groups))
        assert error is None, f"{groups}: {error}"


def test_config_loads_or_names_the_key() -> None:
    """`load` succeeds or raises a one-line `ConfigError` naming a key; nothing else escapes."""
    tally = _tally("in_process")
    started = time.perf_counter()

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(overrides)
    @replay_first(FOUND_BUGS)
    def run(draw: Draw) -> None:
        lines = [*draw[0], *draw[1]]
        tally["examples"] += 1
        error = _load(lines)
        if error is None:
            tally["loaded"] += 1
            tally["outcomes"]["loaded"] += 1
            return
        key = _assert_names_a_key(error, lines)
        tally["config_errors"] += 1
        tally["keys"][key] += 1
        tally["outcomes"]["config error"] += 1

    try:
        run()
    finally:
        tally["seconds"] = round(time.perf_counter() - started, 1)
        _write_report()


def _hydra(lines: list[str]) -> Any:
    """Hydra's own full composition of ``lines`` (as ``@hydra.main`` would), or the exception it raised."""
    register_schema()
    try:
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            return hydra_compose("config", overrides=lines)
    except Exception as e:  # noqa: BLE001 - compared with compose_config's verdict below
        return e


@settings(max_examples=int(os.environ.get("LAMPSEG_CONFIG_FUZZ_HYDRA_EXAMPLES", "30")), derandomize=True,
          database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(overrides)
def test_load_composes_as_hydra_does(draw: Draw) -> None:
    """`compose_config` (groups composed once, key overrides applied one by one) gives the config Hydra's
    full composition gives, and fails exactly when it fails."""
    lines = [*draw[0], *draw[1]]
    expected = _hydra(lines)
    try:
        got = compose_config(lines, CONF)
    except ConfigError as e:
        assert isinstance(expected, Exception), f"Hydra composed {lines} but compose_config raised {e}"
        return
    assert not isinstance(expected, Exception), f"Hydra raised {expected!r} for {lines}, compose_config not"
    assert OmegaConf.to_container(got, resolve=False) == OmegaConf.to_container(expected, resolve=False)


# --------------------------------------------------------------------------------------------------
# The CLI: the same draws through `python -m lampseg plan|train` subprocesses
# --------------------------------------------------------------------------------------------------

CLI_KEYS = sorted(k for k in KEYS if not k.startswith(("data.synthetic.", "data.root", "data.cache_dir",
                                                       "run_dir", "debug")))


@st.composite
def cli_overrides(draw: st.DrawFn) -> list[str]:
    """A command line for the smoke dataset (generated once): group choices other than the data's, then
    key overrides of any key but the dataset's location and the run directory."""
    groups = draw(st.sampled_from([g for g in GROUP_SETS if not any(x.startswith(("data=", "+exp=", "exp="))
                                                                  for x in g)]))
    keys = draw(st.lists(st.sampled_from(CLI_KEYS).flatmap(
        lambda k: st.one_of(_value(KEYS[k]), NONSENSE_TEXT).map(lambda v, k=k: f"{k}={v}")), max_size=3))
    return ["+exp=smoke", *groups, *keys]


def _cli_draws(n: int) -> list[list[str]]:
    """``n`` command lines drawn by hypothesis (derandomized: the same ones in every run)."""
    drawn: list[list[str]] = []

    @settings(max_examples=n, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(cli_overrides())
    def collect(lines: list[str]) -> None:
        if lines not in drawn:
            drawn.append(lines)

    collect()
    return drawn[:n]


def _run_cli(subcommand: str, lines: list[str], run_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "lampseg", subcommand, *lines, f"run_dir={run_dir}"],
                          cwd=REPO, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, env=env)


def _assert_cli(subcommand: str, lines: list[str], proc: subprocess.CompletedProcess, run_dir: Path) -> None:
    output = proc.stdout + proc.stderr
    shown = f"lampseg {subcommand} {' '.join(lines)} exited {proc.returncode}:\n{output[-3000:]}"
    assert proc.returncode in (0, 1, 2), shown
    assert "Traceback" not in output and "Error executing job" not in output, shown
    if proc.returncode:
        errors = [line for line in proc.stderr.splitlines() if line.startswith(f"lampseg {subcommand}: ")]
        assert len(errors) == 1 and re.match(rf"lampseg {subcommand}: (config )?error: ", errors[0]), shown
    expected = _load(lines)
    if expected is not None:  # the CLI checks with load() before any work: the same message, nothing written
        line = f"lampseg {subcommand}: config error: {expected}"
        assert proc.returncode == 2 and line in proc.stderr, shown
        assert not (run_dir / "summary.json").exists() and not list(run_dir.glob("checkpoints/*.pt"))


def test_cli_exits_cleanly_on_any_config(tmp_path: Path) -> None:
    """``python -m lampseg plan`` (and ``train`` for drawn config errors): exit 0, 1 or 2 with one error line,
    never a traceback; a config `load` refuses exits 2 with its message before any work."""
    tally = _tally("cli")
    started = time.perf_counter()
    from lampseg.data.prepare import dataset_root

    dataset_root(load(["+exp=smoke"], CONF).data, log=lambda *_: None)  # the smoke dataset, generated once
    draws = _cli_draws(CLI_EXAMPLES)
    errors = [lines for lines in draws if _load(lines) is not None]
    jobs = [("train" if lines in errors[:CLI_TRAIN] else "plan", lines, tmp_path / f"run{k}")
            for k, lines in enumerate(draws)]
    with ThreadPoolExecutor(CLI_PROCESSES) as pool:
        procs = list(pool.map(lambda job: _run_cli(*job), jobs))
    try:
        for (subcommand, lines, run_dir), proc in zip(jobs, procs):
            tally["examples"] += 1
            tally["outcomes"][f"{subcommand} exit {proc.returncode}"] += 1
            _assert_cli(subcommand, lines, proc, run_dir)
    finally:
        tally["seconds"] = round(time.perf_counter() - started, 1)
        _write_report()
    assert len(draws) == CLI_EXAMPLES
