"""Config checks (``config/checks.py``): shipped configs validate, every bad value names its key."""
from __future__ import annotations

import pytest
from conftest import compose

from lampseg.config import ConfigError, validate

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
    ("slices=[-1,0,0]", "slices"),
    ("slices=[1,2]", "slices"),
    ("optim.beta2=1.0", "optim.beta2"),
    ("tune.search=bayes", "tune.search"),
    ("tune.scheduler=hyperband", "tune.scheduler"),
    ("tune.num_samples=0", "tune.num_samples"),
    ("tune.resources.cpu=-1", "tune.resources"),
    ("tune.verbose=3", "tune.verbose"),
    ("data.num_workers=-1", "data.num_workers"),
    ("data.num_workers=many", "data.num_workers"),
])
def test_validate_names_the_key(override, key):
    cfg = compose("+exp=smoke", *override.split())
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert f"'{key}" in str(info.value), str(info.value)


@pytest.mark.parametrize("override,key", [
    ("split=test", "split"),
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
    cfg = compose("+exp=smoke", "parallel=pipeline", "split=train", "parallel.checkpoint=block")
    assert cfg.parallel.name == "pipeline" and cfg.split == "train"
    assert f"{cfg.parallel.name} {cfg.split} {cfg.parallel.checkpoint}" == "pipeline train block"
    assert {"train": 1}[cfg.split] == 1


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
