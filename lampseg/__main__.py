"""Command line: ``python -m lampseg <subcommand> [hydra overrides]``.

    python -m lampseg train                                   # synthetic data, minutes on a CPU
    python -m lampseg train +exp=brats data.root=/data/Task01_BrainTumour
    python -m lampseg train -m optim.lr=1e-3,3e-4              # Hydra multirun sweep
    python -m lampseg evaluate ckpt=RUN/checkpoints/best.pt
    python -m lampseg predict ckpt=RUN/checkpoints/best.pt input=DIR_OR_FILE output=DIR
    python -m lampseg export ckpt=RUN/checkpoints/best.pt out=BUNDLE    # a MONAI bundle
    python -m lampseg synth out=PATH data.synthetic.cases=10
    python -m lampseg validate data.root=/data/Task01_BrainTumour   # every problem in a dataset at once
    python -m lampseg tune tune=berral_grid                    # Ray Tune study (experiment parallelism)
    python -m lampseg bench overhead
    python -m lampseg doctor --json doctor.json                # will it work here, and how to split?
"""
from __future__ import annotations

import errno
import os
import sys
import time
import warnings
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from omegaconf import DictConfig

SUBCOMMANDS = {
    "train": "train a model (writes metrics.csv, summary.json, checkpoints/, progress.png, tb/)",
    "evaluate": "Dice/HD95 of a checkpoint on a data split -> eval.json (ckpt=PATH [split=val|train|all])",
    "predict": "segment NIfTI images in their original space (ckpt=PATH input=FILE_OR_DIR output=DIR)",
    "export": "a checkpoint as a MONAI bundle: configs/, models/model.pt|model.ts, docs/ (ckpt=PATH out=DIR)",
    "synth": "write the synthetic BraTS-like MSD dataset (out=PATH, data.synthetic.*)",
    "plan": "split the model into pipeline stages for parallel.pp / parallel.memory_gb -> plan.json",
    "tune": "Ray Tune study: every trial a train run (tune=berral_grid|asha_random|optuna|pbt) -> tune/",
    "loo": "leave-one-modality-out study: which modality matters (loo.folds=K|patients) -> loo/",
    "validate": "check every file of a dataset and list every problem at once (data.root=PATH)",
    "visualize": "a case's modalities, label/prediction overlays, error map (case=, ckpt=|prediction=)",
    "bench": "benchmarks: bench overhead|pipeline|inference|context|data_parallel|experiment_parallel",
    "doctor": "versions, devices, a check of every parallel mode, the planner's layout here [--json PATH]",
}
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
USAGE = "usage: python -m lampseg <subcommand> [key=value ...]   (Hydra overrides; --help per subcommand)"


def config_dir() -> str:
    """The ``conf/`` folder: the installed ``lampseg.conf`` package (a mapping of the repo's ``conf/``), or
    the checkout's ``conf/`` when lampseg runs from source without being installed."""
    source = Path(__file__).resolve().parent.parent / "conf"
    if (source / "config.yaml").is_file():
        return str(source)
    return str(Path(str(resources.files("lampseg.conf"))).resolve())


def _print_help() -> None:
    print(USAGE + "\n\nsubcommands:")
    for name, text in SUBCOMMANDS.items():
        print(f"  {name:<9} {text}")
    print("\nEvery subcommand takes run_dir=PATH. Config groups: data model optim trainer inference parallel "
          "tune exp;\nsee `python -m lampseg train --help` and docs/.")


# lampseg's own modules and Hydra are imported inside the functions below, once a subcommand is known:
# they pull in torch, and `python -m lampseg --help` should answer at once. Each runner takes the checked,
# read-only config and the command line's overrides (the settings evaluate/predict apply to a checkpoint's).


def _train(cfg: DictConfig, overrides: list[str]) -> None:
    from lampseg.engine.train import run  # lazy: see above

    run(cfg)


def _evaluate(cfg: DictConfig, overrides: list[str]) -> None:
    from lampseg.commands.evaluate import run_evaluate  # lazy: see above

    run_evaluate(cfg, overrides)


def _predict(cfg: DictConfig, overrides: list[str]) -> None:
    from lampseg.commands.predict import run_predict  # lazy: see above

    run_predict(cfg, overrides)


def _export(cfg: DictConfig, overrides: list[str]) -> None:
    from lampseg.commands.export import run_export  # lazy: see above

    run_export(cfg, overrides)


def _synth(cfg: DictConfig, overrides: list[str]) -> None:
    from lampseg.commands.synth import run_synth  # lazy: see above

    print(f"synthetic dataset at {run_synth(cfg)}")


def _plan(cfg: DictConfig, overrides: list[str]) -> None:
    from lampseg.commands.plan import run_plan  # lazy: see above

    run_plan(cfg)


def _tune(cfg: DictConfig, overrides: list[str]) -> None:
    from lampseg.tune.search import run_tune  # lazy: see above

    run_tune(cfg)


def _loo(cfg: DictConfig, overrides: list[str]) -> None:
    from lampseg.tune.loo import run_loo  # lazy: see above

    run_loo(cfg)


def _validate(cfg: DictConfig, overrides: list[str]) -> None:
    from lampseg.commands.validate import run_validate  # lazy: see above

    run_validate(cfg)


def _visualize(cfg: DictConfig, overrides: list[str]) -> None:
    from lampseg.commands.visualize import run_visualize  # lazy: see above

    run_visualize(cfg, overrides)


def _bench(cfg: DictConfig, overrides: list[str]) -> None:
    from lampseg.bench.cli import run_bench  # lazy: see above

    run_bench(cfg, overrides)


def _doctor(cfg: DictConfig, overrides: list[str]) -> None:
    from lampseg.doctor.report import run_doctor  # lazy: see above

    run_doctor(cfg)


RUNNERS: dict[str, Callable[[DictConfig, list[str]], None]] = {
    "train": _train, "evaluate": _evaluate, "predict": _predict, "export": _export, "synth": _synth,
    "plan": _plan, "tune": _tune, "loo": _loo, "validate": _validate, "visualize": _visualize,
    "bench": _bench, "doctor": _doctor,
}


def _dispatch(subcommand: str, cfg: DictConfig, checked: bool) -> None:
    """Run ``subcommand`` on Hydra's config: checked (unless ``load`` already checked the same composition),
    with the run directory Hydra chose, read-only from here on."""
    from hydra.core.hydra_config import HydraConfig  # lazy: see above

    from lampseg.config import derive
    from lampseg.config.loading import check

    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    if not checked:  # a -m multirun's jobs (and --cfg, ...) were composed by Hydra alone
        check(cfg, overrides)
    cfg = derive(cfg, {"run_dir": hydra_cfg.runtime.output_dir}, check=False)  # checked above or by load
    RUNNERS[subcommand](cfg, overrides)


def _override(argv: list[str], key: str) -> str | None:
    """The value of a ``key=value`` override on the command line (None when absent)."""
    values = [a.split("=", 1)[1] for a in argv if a.split("=", 1)[0].lstrip("+") == key and "=" in a]
    return values[-1] if values else None


def _json_flag(argv: list[str]) -> list[str]:
    """``doctor --json PATH`` (or ``--json=PATH``) as the override ``doctor.json=PATH``."""
    out, args = [], iter(argv)
    for arg in args:
        if arg == "--json":
            path = next(args, None)
            if path is None:
                print("usage: python -m lampseg doctor [--json PATH] [overrides]", file=sys.stderr)
                sys.exit(2)
            out.append(f"doctor.json={Path(path).resolve()}")
        elif arg.startswith("--json="):
            out.append(f"doctor.json={Path(arg.split('=', 1)[1]).resolve()}")
        else:
            out.append(arg)
    return out


def _checked(argv: list[str]) -> DictConfig | None:
    """The command line's config, composed and checked before any work (``lampseg.config.load``: the same
    composition as Hydra's, every failure a ``ConfigError`` naming the key); None when a Hydra flag (``-m``,
    ``--cfg``, ``--help``, ...) asks Hydra to compose it its own way (each multirun job is then checked
    by ``_dispatch`` with ``config.loading.check``)."""
    from lampseg.config import load  # lazy: see above

    if any(arg.startswith("-") for arg in argv):
        return None
    return load(argv, config_dir())


def _torchrun_argv(argv: list[str], cfg: DictConfig | None = None) -> list[str]:
    """Under torchrun: join the job with the composed config's ``parallel.backend`` and
    ``parallel.timeout_s`` (from YAML files, ``+exp`` files or the command line alike; without a composed
    config, under a Hydra flag, from the command line), give every rank rank 0's run directory (each would
    otherwise stamp its own time) and let only rank 0 write Hydra's files and log."""
    from lampseg.runtime import distributed  # lazy: see above

    if cfg is not None:
        backend, timeout = str(cfg.parallel.backend), float(cfg.parallel.timeout_s)
        os.environ["LAMPSEG_DIST_TIMEOUT"] = f"{timeout:g}"  # failure_message names it
        distributed.init_from_env(timeout_s=timeout, backend=backend)
    else:
        timeout = _override(argv, "parallel.timeout_s")
        if timeout is not None:
            os.environ["LAMPSEG_DIST_TIMEOUT"] = timeout
        distributed.init_from_env(backend=_override(argv, "parallel.backend"))
    if _override(argv, "run_dir") is None:
        argv = argv + [f"run_dir={distributed.broadcast_object(time.strftime('outputs/%Y-%m-%d/%H-%M-%S'))}"]
    if distributed.rank() > 0:
        argv = argv + ["hydra.output_subdir=null", "hydra/job_logging=disabled",
                       "hydra/hydra_logging=disabled"]
    return argv


def _command_line(argv: list[str]) -> tuple[str, list[str]]:
    """The subcommand and its Hydra overrides (``bench NAME`` as ``bench.name=NAME``, ``doctor --json PATH``
    as ``doctor.json=PATH``, a subcommand's own arguments in their section: ``config.loading.qualify``);
    exits with the usage for no, an unknown or an incomplete subcommand."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        _print_help()
        sys.exit(0 if argv else 2)
    subcommand, argv = argv[0], argv[1:]
    if subcommand not in SUBCOMMANDS:
        print(f"lampseg: unknown subcommand {subcommand!r}\n", file=sys.stderr)
        _print_help()
        sys.exit(2)
    if subcommand == "bench":
        if not argv or "=" in argv[0] or argv[0].startswith("-"):
            print("usage: python -m lampseg bench NAME [overrides]; "
                  "NAME: overhead, pipeline, inference, context, data_parallel, experiment_parallel, spatial",
                  file=sys.stderr)
            sys.exit(2)
        argv = [f"bench.name={argv[0]}"] + argv[1:]
    if subcommand == "doctor":
        argv = _json_flag(argv)
    from lampseg.config.loading import qualify  # lazy: see above

    return subcommand, qualify(subcommand, argv)


def _report_failure(subcommand: str, cfg: DictConfig, error: BaseException) -> None:
    """A failure as one line on stderr and the exit status (2: the config, 1: anything else), where it is one
    lampseg can explain; anything else (and everything under ``debug=true``) is raised with its traceback."""
    from lampseg.config import ConfigError  # lazy: see above
    from lampseg.errors import LampsegError
    from lampseg.runtime import distributed

    if cfg.debug:
        raise error
    if isinstance(error, (LampsegError, FileNotFoundError)):
        kind = "config error" if isinstance(error, ConfigError) else "error"
        print(f"lampseg {subcommand}: {kind}: {error}", file=sys.stderr)
        sys.exit(2 if isinstance(error, ConfigError) else 1)
    if isinstance(error, OSError) and error.errno in DISK_FULL:  # outside a checkpoint write (those say more)
        print(f"lampseg {subcommand}: error: {error.filename or 'a file'}: {error.strerror}; lampseg writes "
              f"every file atomically, so what was written before is intact: free space and rerun the "
              f"same command to resume", file=sys.stderr)
        sys.exit(1)
    if isinstance(error, RuntimeError) and distributed.collective_failure(error):  # a peer died or stalled
        message = distributed.failure_message(error, cfg.run_dir)
        print(f"lampseg {subcommand}: error: {message}", file=sys.stderr)
        sys.exit(1)
    raise error


def main(argv: list[str] | None = None) -> None:
    """Entry point: the subcommand and its overrides, checked before any work (a config error is one line,
    exit 2), then Hydra composes the config (its run directory, multirun sweeps, launchers) and ``_dispatch``
    runs the subcommand."""
    subcommand, argv = _command_line(list(sys.argv[1:] if argv is None else argv))

    # lazy: see above
    import hydra

    from lampseg.config import ConfigError, register_schema
    from lampseg.runtime import distributed

    # conf/hydra/launcher/ray.yaml sets lampseg's defaults for hydra-ray-launcher and is deliberately checked
    # against the plugin's schema of the same name; Hydra calls that pattern deprecated on every run.
    warnings.filterwarnings("ignore", message=r"(?s)\s*'hydra/launcher/ray' is validated against ConfigStore")
    register_schema()

    from lampseg.errors import LampsegError  # lazy: see above

    @hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")
    def app(cfg) -> None:
        try:
            _dispatch(subcommand, cfg, checked)
        except (LampsegError, OSError, RuntimeError) as e:
            _report_failure(subcommand, cfg, e)

    if not (_override(argv, "tune.address") or _override(argv, "hydra.launcher.ray.init.address")):
        from lampseg.tune.loopback import LOOPBACK_ENV  # lazy: see above

        os.environ.setdefault(LOOPBACK_ENV, "0")  # a Ray started here (tune, hydra/launcher=ray): loopback
    try:
        cfg = _checked(argv)
        checked = cfg is not None  # then _dispatch need not check Hydra's copy of the same composition
        if distributed.launched_by_torchrun():
            argv = _torchrun_argv(argv, cfg)
    except ConfigError as e:
        print(f"lampseg {subcommand}: config error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [f"lampseg-{subcommand}"] + argv
    failed = True
    try:
        app()
        failed = False
    finally:
        distributed.shutdown(failed)


if __name__ == "__main__":
    main()
