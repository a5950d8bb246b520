"""Command line: ``python -m lampseg <subcommand> [hydra overrides]``.

    python -m lampseg train                                   # synthetic data, minutes on a CPU
    python -m lampseg train +exp=brats data.root=/data/Task01_BrainTumour
    python -m lampseg train -m optim.lr=1e-3,3e-4              # Hydra multirun sweep
    python -m lampseg evaluate ckpt=RUN/checkpoints/best.pt
    python -m lampseg predict ckpt=RUN/checkpoints/best.pt input=DIR_OR_FILE output=DIR
    python -m lampseg synth out=PATH data.synthetic.cases=10
    python -m lampseg validate data.root=/data/Task01_BrainTumour   # every problem in a dataset at once
    python -m lampseg tune tune=berral_grid                    # Ray Tune study (experiment parallelism)
    python -m lampseg bench overhead
    python -m lampseg doctor --json doctor.json                # will it work here, and how to split?
"""
from __future__ import annotations

import errno
import importlib
import os
import sys
import time
import warnings
from importlib import resources
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

SUBCOMMANDS = {
    "train": "train a model (writes metrics.csv, summary.json, checkpoints/, progress.png, tb/)",
    "evaluate": "Dice/HD95 of a checkpoint on a data split -> eval.json (ckpt=PATH [split=val|train|all])",
    "predict": "segment NIfTI images in their original space (ckpt=PATH input=FILE_OR_DIR output=DIR)",
    "synth": "write the synthetic BraTS-like MSD dataset (out=PATH, data.synthetic.*)",
    "plan": "split the model into pipeline stages for parallel.pp / parallel.memory_gb -> plan.json",
    "tune": "Ray Tune study: every trial a train run (tune=berral_grid|asha_random|optuna|pbt) -> tune/",
    "loo": "leave-one-modality-out study: which modality matters (loo.folds=K|patients) -> loo/",
    "validate": "check every file of a dataset and list every problem at once (data.root=PATH)",
    "visualize": "a case's modalities, label/prediction overlays, error map (case=, ckpt=|prediction=)",
    "bench": "benchmarks: bench overhead|pipeline|inference|context|data_parallel|experiment_parallel",
    "doctor": "versions, devices, a check of every parallel mode, the planner's layout here [--json PATH]",
}
# subcommand -> (module, function, whether it takes the command line's overrides besides the config)
RUNNERS = {
    "train": ("lampseg.engine.train", "run", False),
    "evaluate": ("lampseg.commands.evaluate", "run_evaluate", True),
    "predict": ("lampseg.commands.predict", "run_predict", True),
    "plan": ("lampseg.commands.plan", "run_plan", False),
    "tune": ("lampseg.tune.search", "run_tune", False),
    "loo": ("lampseg.tune.loo", "run_loo", False),
    "validate": ("lampseg.commands.validate", "run_validate", False),
    "visualize": ("lampseg.commands.visualize", "run_visualize", True),
    "bench": ("lampseg.bench.cli", "run_bench", True),
    "doctor": ("lampseg.doctor.report", "run_doctor", False),
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
# they pull in torch, and `python -m lampseg --help` should answer at once.


def _dispatch(subcommand: str, cfg, checked: bool) -> None:
    from hydra.core.hydra_config import HydraConfig  # lazy: see above

    from lampseg.config.loading import check

    hydra_cfg = HydraConfig.get()
    OmegaConf.update(cfg, "run_dir", hydra_cfg.runtime.output_dir, merge=False)
    overrides = list(hydra_cfg.overrides.task)
    if not checked:  # a -m multirun's jobs (and --cfg, ...) were composed by Hydra alone
        check(cfg, overrides)
    if subcommand == "synth":
        print(f"synthetic dataset at {_synth_to(cfg)}")
        return
    module, function, with_overrides = RUNNERS[subcommand]
    runner = getattr(importlib.import_module(module), function)  # imported late: `--help` stays fast
    runner(cfg, overrides) if with_overrides else runner(cfg)


def _synth_to(cfg) -> Path:
    """``synth``: write to ``out=PATH``, or the default location ``data.root=null`` trains on."""
    from lampseg.data.prepare import dataset_root  # lazy: see above
    from lampseg.data.synth import generate_dataset

    s = cfg.data.synthetic
    if cfg.out is None:
        return dataset_root(OmegaConf.merge(cfg.data, {"root": None}))
    return generate_dataset(cfg.out, cases=s.cases, shape=tuple(s.shape), seed=s.seed, layout=s.layout,
                            context=s.context)


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


def main(argv: list[str] | None = None) -> None:
    """Entry point: strip the subcommand, then let Hydra parse the overrides."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        _print_help()
        sys.exit(0 if argv else 2)
    subcommand = argv.pop(0)
    if subcommand not in SUBCOMMANDS:
        print(f"lampseg: unknown subcommand {subcommand!r}\n", file=sys.stderr)
        _print_help()
        sys.exit(2)
    if subcommand == "bench":
        if not argv or "=" in argv[0] or argv[0].startswith("-"):
            print("usage: python -m lampseg bench NAME [overrides]; "
                  "NAME: overhead, pipeline, inference, context, data_parallel, experiment_parallel",
                  file=sys.stderr)
            sys.exit(2)
        argv = [f"bench.name={argv[0]}"] + argv[1:]
    if subcommand == "doctor":
        argv = _json_flag(argv)

    # lazy: see above
    import hydra

    from lampseg.config import ConfigError, register_schema
    from lampseg.errors import LampsegError
    from lampseg.runtime import distributed

    # conf/hydra/launcher/ray.yaml sets lampseg's defaults for hydra-ray-launcher and is deliberately checked
    # against the plugin's schema of the same name; Hydra calls that pattern deprecated on every run.
    warnings.filterwarnings("ignore", message=r"(?s)\s*'hydra/launcher/ray' is validated against ConfigStore")
    register_schema()

    @hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")
    def app(cfg) -> None:
        try:
            _dispatch(subcommand, cfg, checked)
        except (LampsegError, FileNotFoundError) as e:
            if cfg.debug:
                raise
            kind = "config error" if isinstance(e, ConfigError) else "error"
            print(f"lampseg {subcommand}: {kind}: {e}", file=sys.stderr)
            sys.exit(2 if isinstance(e, ConfigError) else 1)
        except OSError as e:  # a full disk or quota outside a checkpoint write (those say more, above)
            if cfg.debug or e.errno not in DISK_FULL:
                raise
            print(f"lampseg {subcommand}: error: {e.filename or 'a file'}: {e.strerror}; lampseg writes "
                  f"every file atomically, so what was written before is intact: free space and rerun the "
                  f"same command to resume", file=sys.stderr)
            sys.exit(1)
        except RuntimeError as e:  # a peer died or stalled: say so, and how to resume, instead of a traceback
            if cfg.debug or not distributed.collective_failure(e):
                raise
            message = distributed.failure_message(e, cfg.run_dir)
            print(f"lampseg {subcommand}: error: {message}", file=sys.stderr)
            sys.exit(1)

    if not (_override(argv, "tune.address") or _override(argv, "hydra.launcher.ray.init.address")):
        from lampseg.tune.loopback import LOOPBACK_ENV  # lazy: see above

        os.environ.setdefault(LOOPBACK_ENV, "0")  # a Ray started here (tune, hydra/launcher=ray): loopback
    try:
        cfg = _checked(argv)  # before any work: a config error is one line, exit 2
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
