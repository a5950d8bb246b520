"""Config checks (``config/checks.py``): shipped configs validate, every bad value names its key."""
from __future__ import annotations

import shutil

import pytest
from conftest import compose

from lampseg.config import BENCH_NAMES, DOCTOR_CHECKS, ConfigError, load, validate

# ------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("overrides", [[], ["+exp=smoke"], ["+exp=brats"],
                                       ["+exp=smoke", "trainer.max_epochs=1"],  # adamw: 1 warm-up epoch
                                       ["data.patch_size=whole"], ["inference=sliding", "model=unet32"]])
def test_shipped_configs_validate(overrides):
    validate(compose(*overrides))


@pytest.mark.parametrize("override,key", [
    ("data.fold=3", "data.fold"),
    ("data.folds=1", "data.folds"),
    ("data.batch_size=0", "data.batch_size"),
    ("data.foreground_ratio=1.5", "data.foreground_ratio"),
    ("data.patch_size=[32,32]", "data.patch_size"),
    ("data.patch_size=[30,32,32]", "data.patch_size"),
    ("data.patch_size=big", "data.patch_size"),
    ("data.synthetic.layout=5d", "data.synthetic.layout"),
    ("data=brats data.regions.TC=[]", "data.regions.TC"),
    ("data=brats data.regions.ET=[0]", "data.regions.ET"),
    ("model.strides=[2]", "model.strides"),
    ("model.dropout=1.0", "model.dropout"),
    ("optim.lr=0", "optim.lr"),
    ("optim.warmup_epochs=3", "optim.warmup_epochs"),
    ("trainer.resume=sometimes", "trainer.resume"),
    ("trainer.device=tpu", "trainer.device"),
    ("inference.overlap=1.0", "inference.overlap"),
    ("inference.patch_size=[8,8]", "inference.patch_size"),
    ("parallel.dp=0", "parallel.dp"),
    ("visualize.slices=[-1,0,0]", "visualize.slices"),
    ("visualize.slices=[1,2]", "visualize.slices"),
    ("optim.beta2=1.0", "optim.beta2"),
    ("tune.search=bayes", "tune.search"),
    ("tune.scheduler=hyperband", "tune.scheduler"),
    ("tune.num_samples=0", "tune.num_samples"),
    ("tune.resources.cpu=-1", "tune.resources"),
    ("tune.verbose=3", "tune.verbose"),
    ("data.num_workers=-1", "data.num_workers"),
    ("data.num_workers=many", "data.num_workers"),
    ("data.augment.flip_prob=1.5", "data.augment.flip_prob"),
    ("data.augment.rotate_degrees=nan", "data.augment.rotate_degrees"),
    ("data.modalities=[]", "data.modalities"),
    ("data.modalities=[0,0]", "data.modalities"),
    ("data.synthetic.seed=-1", "data.synthetic.seed"),
    ("seed=4294967296", "seed"),
    ("model.kernel_size=4", "model.kernel_size"),
    ("model.num_res_units=-1", "model.num_res_units"),
    ("optim.lr=nan", "optim.lr"),
    ("optim.lr=inf", "optim.lr"),
    ("optim.weight_decay=-1", "optim.weight_decay"),
    ("optim.momentum=1.0", "optim.momentum"),
    ("optim.poly_power=-1", "optim.poly_power"),
    ("optim.focal_weight=-0.5", "optim.focal_weight"),
    ("optim.grad_clip=nan", "optim.grad_clip"),
    ("trainer.num_threads=0", "trainer.num_threads"),
    ("trainer.stop_after_epochs=0", "trainer.stop_after_epochs"),
    ("trainer.fail_at_epoch=-1", "trainer.fail_at_epoch"),
    ("trainer.val_max_cases=0", "trainer.val_max_cases"),
    ("trainer.device=cuda:x", "trainer.device"),
    ("inference.patch_size=[30,32,32]", "inference.patch_size"),  # not a multiple of the divisor (4)
    ("inference.patch_size=[4,4,4]", "inference.patch_size"),  # a 1x1x1 bottleneck under instance norm
    ("inference.memory_gb=nan", "inference.memory_gb"),
    ("parallel.microbatches=0", "parallel.microbatches"),  # was a ZeroDivisionError in validate
    ("parallel.timeout_s=inf", "parallel.timeout_s"),
    ("parallel.timeout_s=0", "parallel.timeout_s"),
    ("parallel.devices=0", "parallel.devices"),
    ("parallel.device_tflops=0", "parallel.device_tflops"),
    ("bench.name=nosuch", "bench.name"),
    ("bench.steps=0", "bench.steps"),
    ("bench.warmup=-1", "bench.warmup"),
    ("bench.repeats=0", "bench.repeats"),
    ("bench.pp=[0]", "bench.pp"),
    ("bench.microbatches=[]", "bench.microbatches"),
    ("bench.memory_gb=0", "bench.memory_gb"),
    ("bench.timeout_s=-1", "bench.timeout_s"),
    ("bench.windows=[0]", "bench.windows"),
    ("bench.overlaps=[1.0]", "bench.overlaps"),
    ("bench.cases=-1", "bench.cases"),
    ("bench.auto_budgets_gb=[0]", "bench.auto_budgets_gb"),
    ("bench.patch_sizes=[big]", "bench.patch_sizes"),
    ("bench.widths=[0]", "bench.widths"),
    ("bench.processes=[]", "bench.processes"),
    ("bench.trials=0", "bench.trials"),
    ("bench.workers=0", "bench.workers"),
    ("bench.sp=[0]", "bench.sp"),
    ("bench.name=pipeline bench.pp=[9]", "bench.pp"),  # the smoke U-Net has 5 blocks
    ("bench.name=spatial bench.sp=[1,16]", "bench.sp"),  # 32 rows do not make 16 slabs of 4
    ("bench.name=context bench.patch_sizes=[4,whole]", "bench.patch_sizes"),
    ("doctor.checks=[]", "doctor.checks"),
    ("doctor.checks=[singel]", "doctor.checks"),
    ("doctor.timeout_s=0", "doctor.timeout_s"),
    ("tune.time_budget_s=0", "tune.time_budget_s"),
    ("tune.num_cpus=0", "tune.num_cpus"),
    ("tune.asha.reduction_factor=1", "tune.asha.reduction_factor"),
    ("tune.pbt.quantile_fraction=0.75", "tune.pbt.quantile_fraction"),
])
def test_validate_names_the_key(override, key):
    cfg = compose("+exp=smoke", *override.split())
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert f"'{key}" in str(info.value), str(info.value)


def test_optim_sgd_nesterov_needs_momentum():
    with pytest.raises(ConfigError, match="'optim.momentum'"):
        validate(compose("+exp=smoke", "optim=sgd", "optim.momentum=0"))
    validate(compose("+exp=smoke", "optim=sgd", "optim.momentum=0", "optim.nesterov=false"))


def test_spatial_windows_hold_a_divisor_per_slab():
    """Under parallel.sp=S every sliding window is split into S slabs, each a multiple of the model's size
    divisor (``split_rows``): the window's first size needs S divisors; other axes only one."""
    base = ("+exp=smoke", "parallel=spatial", "parallel.sp=2")  # divisor 4: first size >= 8
    validate(compose(*base, "inference.patch_size=[8,4,12]"))
    with pytest.raises(ConfigError, match="'inference.patch_size'.*at least 8"):
        validate(compose(*base, "inference.patch_size=[4,8,8]"))
    # with a checkpoint, the window is checked against the checkpoint's model
    validate(compose("+exp=smoke", "evaluate.ckpt=x.pt", "inference.patch_size=[6,6,6]"))


def test_tool_names_are_the_tools_own():
    """The config's lists of benchmarks and doctor checks are the ones bench/cli.py and doctor run."""
    from lampseg.bench.cli import BENCHMARKS
    from lampseg.doctor.checks import CHECKS

    assert set(BENCH_NAMES) == set(BENCHMARKS)
    assert tuple(DOCTOR_CHECKS) == tuple(CHECKS)


@pytest.mark.parametrize("overrides,key", [
    (["+exp=smoke", "+exp=brats"], "exp"),  # a second +exp
    (["trainer.max_epoch=3"], "trainer.max_epoch"),  # a typo
    (["+trainer.max_epoch=3"], "trainer.max_epoch"),  # added with +: used to be silently ignored
    (["trainer.max_epochs=abc"], "trainer.max_epochs"),  # a wrong type
    (["trainer.precision=fp64"], "trainer.precision"),  # not a choice
    (["model=unet3"], "model"),  # no such group option
    (["exp=brats"], "exp"),  # an +exp file without the +
    (["optim.lr=[1,"], "optim.lr"),  # Hydra cannot parse it
    (["optim.lr=1e-3,3e-4"], "optim.lr"),  # a sweep without -m
    (["optim.lr=${nosuch}"], "optim.lr"),  # an interpolation that does not resolve
    (["optim.lr=???"], "optim.lr"),  # a missing value
    (["~data.fold"], "data.fold"),  # deleted
    (["data.regions={WT:[1]}"], "data.regions"),  # merged into null: an AttributeError in OmegaConf
    (["data.regions.WT=[1]"], "data.regions.WT"),  # below null: an AssertionError in OmegaConf
    (["~model.channels.0"], "model.channels.0"),  # a list item deleted: a TypeError in OmegaConf
])
def test_load_names_the_key(overrides, key):
    from lampseg.__main__ import config_dir

    with pytest.raises(ConfigError) as info:
        load(overrides, config_dir())
    message = str(info.value)
    assert message.startswith(f"config key '{key}'") and "\n" not in message, message


@pytest.mark.parametrize("overrides", [[], ["+exp=smoke"], ["+exp=brats"], ["data=msd", "data.root=/data"],
                                       ["data=brats", "+data.regions.X=[1]"], ["hydra.run.dir=/tmp/x"],
                                       ["run_dir=${hydra:runtime.cwd}/x"]])
def test_load_accepts_the_shipped_configs(overrides):
    from lampseg.__main__ import config_dir

    assert load(overrides, config_dir()).model.kernel_size == 3


class _Joined(Exception):
    """Stands for the process group a torchrun worker would join."""


def _conf_with(tmp_path, files: dict[str, str]) -> str:
    """A copy of conf/ with these files written in it (relative path -> YAML)."""
    from lampseg.__main__ import config_dir

    conf = tmp_path / "conf"
    shutil.copytree(config_dir(), conf)
    for name, text in files.items():
        (conf / name).write_text(text)
    return str(conf)


def _torchrun_main(monkeypatch, conf: str, *argv: str) -> dict:
    """``lampseg.__main__.main(argv)`` as a torchrun worker would run it, up to joining the job: returns the
    arguments ``init_from_env`` got (raises SystemExit when the config is refused before that)."""
    import lampseg.__main__ as cli
    from lampseg.runtime import distributed
    from lampseg.tune.loopback import LOOPBACK_ENV

    joined: dict = {}

    def join(**kwargs) -> None:
        joined.update(kwargs)
        raise _Joined

    monkeypatch.setattr(cli, "config_dir", lambda: conf)
    monkeypatch.setattr(distributed, "launched_by_torchrun", lambda: True)
    monkeypatch.setattr(distributed, "init_from_env", join)
    monkeypatch.setenv(LOOPBACK_ENV, "0")
    monkeypatch.delenv("LAMPSEG_DIST_TIMEOUT", raising=False)
    with pytest.raises(_Joined):
        cli.main(list(argv))
    return joined


EXP = "# @package _global_\nparallel:\n  backend: gloo\n  timeout_s: 42\n"


def test_torchrun_joins_with_backend_and_timeout_from_config_files(monkeypatch, tmp_path):
    """``parallel.backend`` / ``parallel.timeout_s`` set in an +exp file or a parallel group file reach
    ``init_from_env`` (they used to be read from the command line only), the command line still wins."""
    import os

    conf = _conf_with(tmp_path, {"exp/slow_net.yaml": EXP,
                                 "parallel/ddp.yaml": "name: ddp\ndp: null\ntimeout_s: 77\n"})
    assert _torchrun_main(monkeypatch, conf, "train", "+exp=slow_net") == \
        {"timeout_s": 42.0, "backend": "gloo"}
    assert os.environ["LAMPSEG_DIST_TIMEOUT"] == "42"  # failure_message names it
    assert _torchrun_main(monkeypatch, conf, "train", "parallel=ddp") == \
        {"timeout_s": 77.0, "backend": "auto"}
    assert _torchrun_main(monkeypatch, conf, "train", "+exp=slow_net", "parallel.timeout_s=9") == \
        {"timeout_s": 9.0, "backend": "gloo"}


def test_torchrun_refuses_a_bad_config_file_before_joining(monkeypatch, tmp_path, capsys):
    conf = _conf_with(tmp_path, {"exp/bad_net.yaml": EXP.replace("42", "-5")})
    with pytest.raises(SystemExit) as info:
        _torchrun_main(monkeypatch, conf, "train", "+exp=bad_net")
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("lampseg train: config error: config key 'parallel.timeout_s'"), lines


@pytest.mark.parametrize("override,key", [
    ("evaluate.split=test", "evaluate.split"),
    ("trainer.progress=loud", "trainer.progress"),
    ("parallel.checkpoint=some", "parallel.checkpoint"),
    ("parallel.profile=guess", "parallel.profile"),
    ("parallel.engine=deepspeed", "parallel.engine"),
])
def test_the_schema_refuses_a_bad_choice_naming_the_key(override, key):
    """String choices with identifier values are enums of the schema: composition refuses a bad one."""
    with pytest.raises(Exception) as info:
        compose("+exp=smoke", override)
    assert key in str(info.value) and override.split("=")[1] in str(info.value), str(info.value)


def test_choices_read_and_print_as_their_values():
    cfg = compose("+exp=smoke", "parallel=pipeline", "evaluate.split=train", "parallel.checkpoint=block")
    assert cfg.parallel.name == "pipeline" and cfg.evaluate.split == "train"
    assert f"{cfg.parallel.name} {cfg.evaluate.split} {cfg.parallel.checkpoint}" == "pipeline train block"
    assert {"train": 1}[cfg.evaluate.split] == 1


def test_auto_loader_workers_leave_a_core_to_each_training_process(monkeypatch):
    import os

    from lampseg.runtime.device import MAX_LOADER_WORKERS, loader_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert loader_workers(3) == 3 and loader_workers("auto") == MAX_LOADER_WORKERS == 8  # 16 cores, 1 process
    assert loader_workers("auto", 8) == 1 and loader_workers("auto", 16) == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: 4 processes on this node share its cores
    assert loader_workers("auto") == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert loader_workers("auto") == 1  # this 2-core machine: one worker, one core for training
    validate(compose("data.num_workers=auto"))


def test_msd_data_without_a_root_is_a_config_error():
    """``data=msd`` leaves ``data.root`` to the user (``???``); without it lampseg must not quietly train on
    the synthetic dataset (OmegaConf keeps the schema's None when it merges ``???``)."""
    from lampseg.__main__ import config_dir
    from lampseg.config import ConfigError
    from lampseg.config.loading import load

    with pytest.raises(ConfigError, match="config key 'data.root': data=msd expected an MSD dataset folder"):
        load(["data=msd"], config_dir())
    given = load(["data=msd", "data.root=/data/Task04_Hippocampus"], config_dir())
    assert given.data.root.endswith("Hippocampus")


def test_a_misspelt_key_gets_the_closest_name():
    from lampseg.__main__ import config_dir
    from lampseg.config import ConfigError
    from lampseg.config.loading import load

    with pytest.raises(ConfigError, match=r"did you mean 'trainer.max_epochs'\?"):
        load(["trainer.max_epoch=3"], config_dir())
    with pytest.raises(ConfigError, match=r"did you mean 'seed'\?"):
        load(["sed=3"], config_dir())


def test_a_multirun_job_gets_the_same_checks(tmp_path):
    """``-m`` lets Hydra compose each job itself; ``_dispatch`` runs ``load``'s checks on it too, so
    ``train -m data=msd ...`` does not train on the synthetic data (nor ignore a typo)."""
    from conftest import lampseg

    proc = lampseg("train", "-m", "data=msd", "optim.lr=1e-3", f"run_dir={tmp_path}", check=False)
    assert "config key 'data.root': data=msd expected an MSD dataset folder" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr and not (tmp_path / "0" / "metrics.csv").exists()


def test_an_experiment_from_another_config_folder_loads(tmp_path):
    """``hydra.searchpath`` adds config folders (a lab's own ``+exp`` files): their options are not
    refused for missing from ``conf/``."""
    from lampseg.__main__ import config_dir
    from lampseg.config.loading import load

    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "mine.yaml").write_text("# @package _global_\ntrainer:\n  max_epochs: 3\n")
    cfg = load([f"hydra.searchpath=[file://{tmp_path}]", "+exp=mine"], config_dir())
    assert cfg.trainer.max_epochs == 3


def test_adding_an_existing_key_says_to_drop_the_plus():
    from lampseg.__main__ import config_dir
    from lampseg.config import ConfigError
    from lampseg.config.loading import load

    with pytest.raises(ConfigError, match=r"already in the config.*with trainer.max_epochs=3"):
        load(["+trainer.max_epochs=3"], config_dir())
