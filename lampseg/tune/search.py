"""``python -m lampseg tune``: a Ray Tune study in which every trial is one ``lampseg train`` run.

    python -m lampseg tune tune=berral_grid                       # 32 trials, as many at once as cores allow
    python -m lampseg tune tune=asha_random tune.num_samples=16 tune.resources.cpu=2
    python -m lampseg tune tune=optuna parallel=pipeline parallel.pp=2   # every trial split over 2 devices
    python -m lampseg tune tune=berral_grid tune.address=auto            # on a running Ray cluster
    python -m lampseg tune tune=berral_grid run_dir=RUN tune.resume=true # continue an interrupted study

Experiment parallelism (Berral et al.): each trial gets its own resources (``tune.resources`` per pipeline
stage) and trials run side by side. A pipelined trial (``parallel.pp=K``) reserves its K devices as one
placement-group bundle (so they are on one node) and runs its stages in its own process with the torchgpipe
engine: no second process group or rendezvous per trial, and Tune's checkpointing, retries and schedulers
treat it like any other trial. DDP inside a trial is not offered: on a cluster, experiment parallelism
already occupies the devices that data parallelism would. The study lives in ``run_dir/tune``: Ray's
experiment state and one directory per trial (a lampseg run directory), then ``results.csv``,
``best_config.yaml``, ``curves.png`` and ``params.png`` (``lampseg.tune.results``).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig

from lampseg.config import ConfigError, checked, derive, enum_value, to_container
from lampseg.engine.metrics import metric_key
from lampseg.engine.setup import load_data
from lampseg.errors import LampsegError
from lampseg.io import atomic_write_text, write_json
from lampseg.runtime.processes import Process, alive, ancestors, descendants, signal_all, start_time
from lampseg.tune.loopback import local_ray_on_loopback
from lampseg.tune.results import write_results
from lampseg.tune.space import check_space, grid_size, pbt_mutations, to_ray
from lampseg.tune.trial import train_trial, trial_dirname

# Ray's socket paths under its temp dir must stay below the OS limit (107 bytes): it adds up to ~62 characters
# (session_YYYY-MM-DD_HH-MM-SS_micros_pid/sockets/plasma_store), so a longer temp dir moves to a short one.
RAY_TEMP_MAX = 40
SESSION_RECORD = "lampseg-session.json"  # in the Ray temp dir: the Ray processes this study's driver started


def study_config(cfg: DictConfig, log=print) -> tuple[dict, int]:
    """The base config every trial starts from (absolute paths, per-trial threads, the in-process pipeline
    engine) and the number of devices (pipeline stages) one trial uses.

    Raises:
        ConfigError: for parallel settings a single trial cannot run.
    """
    p = cfg.parallel
    if p.name == "ddp" or (p.dp or 1) > 1:
        raise ConfigError("config key 'parallel': a Tune trial is one process; use parallel=single, or "
                          "parallel=pipeline parallel.pp=K for trials split over K devices (DDP runs under "
                          "torchrun with `lampseg train`)")
    stages = p.pp if p.name == "pipeline" else 1
    base = to_container(cfg)
    if stages > 1 and p.engine != "gpipe":
        log(f"tune: each trial runs its {stages} pipeline stages in its own process (parallel.engine=gpipe)")
        base["parallel"]["engine"] = "gpipe"
    base["parallel"]["dp"] = 1
    base["run_dir"] = str(Path(cfg.run_dir).resolve())
    for key in ("root", "cache_dir"):
        if base["data"][key]:
            base["data"][key] = str(Path(base["data"][key]).expanduser().resolve())
    if base["trainer"]["num_threads"] is None:  # one intra-op team per stage, as many threads as its CPUs
        base["trainer"]["num_threads"] = max(1, int(cfg.tune.resources.cpu))
    if base["data"]["num_workers"] == "auto":  # the trial's CPUs, not the machine's: trials share it
        base["data"]["num_workers"] = max(0, int(cfg.tune.resources.cpu * stages) - 1)
    base["trainer"]["progress"] = "line"
    return base, stages


def record_session(temp: Path, processes: list[Process], driver: Process | None = None) -> None:
    """Write down, in the Ray temp dir, the Ray processes a study's driver started (``(pid, start time)``
    pairs) and the driver itself (default this process): what ``reap_orphans`` may stop later. Atomic, so a
    driver killed while writing leaves the earlier record or this one, never half of one."""
    driver = driver or (os.getpid(), start_time(os.getpid()))
    temp.mkdir(parents=True, exist_ok=True)  # Ray makes it, unless it failed first
    atomic_write_text(temp / SESSION_RECORD, json.dumps({"driver": list(driver),
                                                         "processes": [list(p) for p in processes]}))


def _recorded(temp: Path) -> tuple[Process, list[Process]] | None:
    """The driver and processes ``record_session`` wrote in ``temp``, or None (no record, or not one)."""
    try:
        record = json.loads((temp / SESSION_RECORD).read_text())
        driver = (int(record["driver"][0]), int(record["driver"][1] or 0))
        return driver, [(int(pid), int(started)) for pid, started in record["processes"]]
    except (OSError, ValueError, TypeError, KeyError, IndexError):
        return None


def reap_orphans(temp: Path, log=print) -> list[int]:
    """Stop processes left behind by an earlier Ray session in this run dir: a study whose driver was
    killed (SIGKILL) leaves some of Ray's processes running. Only that session's processes are touched:
    those its driver recorded when it started Ray (``record_session``) that still are the same processes
    (the pid and its start time match, so a reused pid is spared), and the processes now below them (Ray's
    workers are the raylet's children); never this process or its ancestors, and nothing while the driver
    that recorded them still runs (its study is not over). Linux (/proc) only.

    Returns:
        The process ids that were killed (SIGKILL: they belong to a dead session).

    Raises:
        LampsegError: the study that recorded the session still runs.
    """
    record = _recorded(temp)
    if record is None:
        return []
    driver, processes = record
    if driver[0] != os.getpid() and alive(driver):  # two studies in one Ray dir would wreck each other
        raise LampsegError(f"another study still runs in this run directory (pid {driver[0]}, its Ray "
                           f"session in {temp}): wait for it, stop it, or give this study another run_dir")
    spared = ancestors()
    targets = dict(p for p in processes if alive(p) and p[0] not in spared)
    targets.update(descendants(targets))
    targets = {pid: started for pid, started in targets.items() if pid not in spared}
    signal_all(targets.items(), signal.SIGKILL)  # stale: nothing of theirs is kept
    if targets:
        log(f"tune: stopped {len(targets)} process(es) an earlier Ray session in {temp} left running")
    return sorted(targets)


def ray_temp_dir(run_dir: Path) -> Path:
    """Where a local Ray keeps its session: ``RUN/ray``, or, when that path is too long for Ray's socket
    names (``RAY_TEMP_MAX``), a short temp dir that ``RUN/ray`` links to (an earlier study's link is
    followed, so a resumed study finds its session)."""
    temp = run_dir / "ray"
    if temp.is_symlink():  # an earlier session's short dir (a killed study leaves its link behind)
        temp = temp.resolve()
        temp.mkdir(parents=True, exist_ok=True)
    elif len(str(temp.resolve())) > RAY_TEMP_MAX:  # too long for Ray's sockets: a short dir, linked here
        short = Path(tempfile.mkdtemp(prefix="lampseg-ray-"))
        temp.parent.mkdir(parents=True, exist_ok=True)
        temp.symlink_to(short, target_is_directory=True)
        temp = short
    return temp


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast when nothing listens at ``tune.address`` (Ray itself retries for minutes)."""
    if address == "auto":
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"config key 'tune.address': expected auto or HOST:PORT, got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConfigError(f"config key 'tune.address': nothing answers at {address} ({e}); start the head "
                          "with `ray start --head --port PORT` first (docs/CLUSTER.md)") from e


def _ray_init(cfg: DictConfig, run_dir: Path, log) -> None:
    """Start a local Ray (temp dir under the run dir, dashboard off, loopback) or join ``tune.address``."""
    import ray  # lazy: Ray/Optuna take seconds to import

    if ray.is_initialized():
        return
    t = cfg.tune
    env = {k: v for k, v in os.environ.items() if k.startswith("LAMPSEG_")}
    if t.address:
        try:
            ray.init(address=t.address, runtime_env={"env_vars": env} if env else None,
                     log_to_driver=t.verbose >= 2)
        except ConnectionError as e:
            raise ConfigError(f"config key 'tune.address': no Ray cluster at {t.address!r} ({e}); start one "
                              "with `ray start --head` (docs/CLUSTER.md)") from e
        log(f"tune: joined the Ray cluster at {t.address}")
        return
    temp = ray_temp_dir(run_dir)
    reap_orphans(temp, log)
    local_ray_on_loopback()
    if t.verbose < 2:  # Ray turns token authentication on for a new local cluster and says so each start
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    before = {pid for pid, _ in descendants([os.getpid()])}
    try:
        ray.init(num_cpus=t.num_cpus, num_gpus=t.num_gpus, include_dashboard=t.dashboard,
                 dashboard_host="127.0.0.1", _temp_dir=str(temp), configure_logging=False,
                 log_to_driver=t.verbose >= 2)  # below 2 the trials' output is in their log.txt
    finally:  # what Ray started, even if it failed half-way, is this study's to stop
        record_session(temp, [p for p in descendants([os.getpid()]) if p[0] not in before])


@contextmanager
def _quiet_ray(verbose: int):
    """Below ``tune.verbose=2`` the study's console is lampseg's (``StudyConsole``): Ray's experiment
    header is off (its legacy reporter prints nothing at verbose 0; the new one always prints the header),
    and so is its warning, at every checkpoint of short epochs, that snapshots "may become a bottleneck"."""
    quiet = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}
    saved = {key: os.environ.get(key) for key in quiet}
    if verbose < 2:
        os.environ.update({k: v for k, v in quiet.items() if saved[k] is None})  # the user's values win
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)


def _scheduler(cfg: DictConfig, space: dict):
    # lazy: Ray takes seconds to import
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    t = cfg.tune
    if t.scheduler == "asha":
        return ASHAScheduler(time_attr="epoch", max_t=t.asha.max_t or cfg.trainer.max_epochs,
                             grace_period=t.asha.grace_period, reduction_factor=t.asha.reduction_factor)
    if t.scheduler == "pbt":
        return PopulationBasedTraining(time_attr="epoch", perturbation_interval=t.pbt.perturbation_interval,
                                       hyperparam_mutations=pbt_mutations(space),
                                       quantile_fraction=t.pbt.quantile_fraction,
                                       resample_probability=t.pbt.resample_probability)
    return FIFOScheduler()


def _search(cfg: DictConfig):
    if cfg.tune.search == "optuna":
        import optuna  # lazy: Ray/Optuna take seconds to import
        from ray.tune.search.optuna import OptunaSearch  # lazy: Ray/Optuna take seconds to import

        return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=cfg.seed))
    from ray.tune.search import BasicVariantGenerator  # lazy: Ray/Optuna take seconds to import

    # seeded random draws; it limits concurrency itself (Tune ignores max_concurrent_trials for it)
    return BasicVariantGenerator(random_state=cfg.seed, max_concurrent=cfg.tune.max_concurrent)


def run_tune(cfg: DictConfig, log=print, held_out: str | None = None,
             describe: Callable[[dict], str] | None = None) -> dict:
    """Run (or resume) the study ``cfg.tune`` describes and write its results.

    Args:
        cfg: the checked config; ``cfg.tune`` is the study, everything else each trial's base config.
        log: where progress lines go.
        held_out: also evaluate each trial's ``final`` or ``best`` checkpoint on its validation fold
            (``eval.json`` per trial; ``lampseg loo``).
        describe: names a trial on the console from its parameters (default: ``key=value`` pairs);
            picklable, as Tune saves it with the study.

    Returns:
        The study summary (also in ``run_dir/tune/study.json``).

    Raises:
        ConfigError: a bad space, scheduler or parallel setting, or an existing study without
            ``tune.resume=true``.
    """
    import ray  # lazy: Ray/Optuna take seconds to import

    from lampseg.tune.console import StudyConsole  # lazy: a Ray Tune callback

    # one spelling of the metric for every logger (``val_dice_enhancing tumour`` too)
    cfg = derive(checked(cfg), {"tune.metric": metric_key(cfg.tune.metric)}, check=False)
    space, base, bundle, exists = _prepare(cfg, log)
    run_dir = Path(base["run_dir"])
    started = time.perf_counter()
    ours = not ray.is_initialized()  # a session the caller started (tests share one) stays up
    _ray_init(cfg, run_dir, log)
    ray_s = time.perf_counter() - started
    console = StudyConsole(grid_size(space) * cfg.tune.num_samples, cfg.tune.metric, cfg.tune.mode,
                           cfg.trainer.max_epochs, describe, cfg.tune.verbose, log)
    tuner = _tuner(cfg, space, base, bundle, exists, held_out, console, log)
    with _quiet_ray(cfg.tune.verbose):
        grid = tuner.fit()
    wall_s = time.perf_counter() - started
    study_dir = run_dir / "tune"
    summary = write_results(grid, cfg, base, study_dir, log)
    summary.update(wall_s=round(wall_s, 2), ray_start_s=round(ray_s, 2), resources_per_trial=bundle,
                   scheduler=enum_value(cfg.tune.scheduler))
    write_json(study_dir / "study.json", summary)
    if ours:
        ray.shutdown()
    temp = run_dir / "ray"
    if temp.is_symlink() and not ray.is_initialized():
        shutil.rmtree(temp.resolve(), ignore_errors=True)
        temp.unlink()
    log(f"tune: wrote {study_dir / 'results.csv'} and {study_dir / 'best_config.yaml'} ({wall_s:.1f} s)")
    unfinished = summary["status"].get("stopped", 0) if cfg.tune.scheduler == "fifo" else 0
    if unfinished or summary["status"].get("error"):
        failed = summary["status"].get("error", 0)
        log(f"tune: {unfinished} trial(s) unfinished and {failed} failed; continue the study with the same "
            "command plus tune.resume=true")
    return summary


def _prepare(cfg: DictConfig, log) -> tuple[dict, dict, dict, bool]:
    """Everything checked before Ray starts: the space, the trials' base config, one trial's resources, and
    whether the study exists (to resume); the data generated/preprocessed once, so that data errors surface
    here and trials find the cache.

    Raises:
        ConfigError: as ``run_tune``.
    """
    from ray import tune  # lazy: see run_tune

    space = check_space(cfg)
    base, stages = study_config(cfg, log)
    if cfg.tune.address:
        _check_reachable(cfg.tune.address)
    run_dir = Path(base["run_dir"])
    study_dir = run_dir / "tune"
    exists = tune.Tuner.can_restore(str(study_dir))
    if exists and not cfg.tune.resume:
        raise ConfigError(f"config key 'tune.resume': {study_dir} already holds a study; pass "
                          "tune.resume=true to continue it, or choose another run_dir")
    load_data(derive(cfg, {"data": base["data"]}, check=False), run_dir, log)
    r = cfg.tune.resources
    bundle = {k: v for k, v in {"CPU": r.cpu * stages, "GPU": r.gpu * stages}.items() if v > 0}
    trials = grid_size(space) * cfg.tune.num_samples
    log(f"tune: study '{cfg.tune.name}' in {study_dir}: {cfg.tune.search} search, {cfg.tune.scheduler} "
        f"scheduler, {trials} trial(s) over {', '.join(space) or 'no keys'}; each trial {bundle}; "
        f"metric {cfg.tune.metric} ({cfg.tune.mode})")
    return space, base, bundle, exists


def _tuner(cfg: DictConfig, space: dict, base: dict, bundle: dict, exists: bool, held_out: str | None,
           console, log):
    """The ``Tuner`` of the study: restored (finished trials kept, unfinished ones continued) or new."""
    from ray import tune  # lazy: see run_tune

    run_dir = Path(base["run_dir"])
    study_dir = run_dir / "tune"
    trainable = tune.with_resources(tune.with_parameters(train_trial, base=base, held_out=held_out),
                                    tune.PlacementGroupFactory([bundle]))
    param_space = to_ray(space)
    if exists:
        log(f"tune: resuming the study in {study_dir} (finished trials are kept, unfinished ones continue "
            "from their last checkpoint)")
        return tune.Tuner.restore(str(study_dir), trainable, resume_unfinished=True, resume_errored=True,
                                  param_space=param_space)
    limit = (cfg.tune.max_concurrent or None) if cfg.tune.search == "optuna" else None  # else: _search
    # PBT restores a trial from another trial's checkpoint of some epochs ago: keep them all
    keep = None if cfg.tune.scheduler == "pbt" else cfg.tune.keep_checkpoints
    return tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=cfg.tune.metric, mode=cfg.tune.mode, search_alg=_search(cfg),
            scheduler=_scheduler(cfg, space), num_samples=cfg.tune.num_samples,
            max_concurrent_trials=limit, time_budget_s=cfg.tune.time_budget_s,
            trial_dirname_creator=lambda trial: trial_dirname(trial.trial_id),
            reuse_actors=True),  # the next trial runs in a warm worker: no second torch/MONAI import
        run_config=tune.RunConfig(
            name="tune", storage_path=str(run_dir), verbose=1 if cfg.tune.verbose >= 2 else 0,
            callbacks=[console],
            failure_config=tune.FailureConfig(max_failures=cfg.tune.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=keep)))
