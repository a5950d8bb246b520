"""parallel=pipeline with the torchgpipe engine: the same training trajectory as the unsplit model
(fp32), portable checkpoints, and pipelined evaluation."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import compose, lampseg, train_here, train_losses

# SGD, not AdamW: conv biases before instance norm get ~1e-9 gradients that Adam would scale up to
# full-size steps of random sign, so tiny summation-order differences would not stay tiny.
BASE = ["+exp=smoke", "optim=sgd", "trainer.precision=fp32", "trainer.deterministic=true",
        "trainer.max_epochs=2", "trainer.hd95=false", "trainer.num_threads=1", "data.samples_per_epoch=4"]
GPIPE = ["parallel=pipeline", "parallel.engine=gpipe"]


def _train(run_dir: Path, *overrides: str) -> dict:
    return train_here(run_dir, *BASE, *overrides)


@pytest.fixture(scope="module")
def unsplit(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("unsplit")
    _train(run_dir)
    return run_dir


@pytest.mark.parametrize("pp,microbatches", [(2, 1), (2, 2), (4, 2)])
def test_gpipe_training_matches_unsplit(tmp_path, unsplit, pp, microbatches):
    summary = _train(tmp_path, *GPIPE, f"parallel.pp={pp}",
                     f"parallel.microbatches={microbatches}")
    plan = summary["plan"]
    assert summary["pp"] == pp and len(plan["stages"]) == pp and plan["microbatches"] == microbatches
    assert sum(len(s["blocks"]) for s in plan["stages"]) == 5
    assert train_losses(tmp_path) == pytest.approx(train_losses(unsplit), rel=1e-5)
    ref = torch.load(unsplit / "checkpoints" / "final.pt", weights_only=True)["model"]
    got = torch.load(tmp_path / "checkpoints" / "final.pt", weights_only=True)["model"]
    assert got.keys() == ref.keys()  # unsplit parameter names
    for name, tensor in ref.items():
        assert torch.allclose(got[name], tensor, rtol=1e-4, atol=1e-5), name


@pytest.mark.extended
def test_pipeline_checkpoint_is_portable(tmp_path, unsplit):
    """A pp=2 checkpoint resumes under pp=4 and evaluates (whole volume) with or without stages."""
    first = tmp_path / "pp2"
    _train(first, *GPIPE, "parallel.pp=2")
    latest = first / "checkpoints" / "latest.pt"
    summary = _train(tmp_path / "pp4", *GPIPE, "parallel.pp=4", "trainer.max_epochs=3",
                     f"trainer.resume={latest}")
    assert summary["epochs"] == 3 and summary["pp"] == 4
    ckpt = first / "checkpoints" / "final.pt"
    lampseg("evaluate", f"ckpt={ckpt}", f"run_dir={tmp_path / 'ev_split'}")
    lampseg("evaluate", f"ckpt={ckpt}", "parallel=single", f"run_dir={tmp_path / 'ev_single'}")
    split = json.loads((tmp_path / "ev_split" / "eval.json").read_text())
    single = json.loads((tmp_path / "ev_single" / "eval.json").read_text())
    assert (split["parallel"]["name"], split["parallel"]["pp"]) == ("pipeline", 2)
    assert single["parallel"]["name"] == "single"
    assert split["mean"]["dice"] == pytest.approx(single["mean"]["dice"], abs=1e-6)


def test_curriculum_small_patches_then_whole_volumes_pipelined(tmp_path):
    """LAMP's curriculum: phases of growing inputs up to whole volumes, pipelined, resumable mid-way."""
    curriculum = ["trainer.curriculum=[[16,16,16],[32,32,32],whole]", "trainer.curriculum_epochs=[1,1,1]",
                  "trainer.max_epochs=4", *GPIPE, "parallel.pp=2"]
    lines: list[str] = []
    train_here(tmp_path, *BASE, *curriculum, "trainer.stop_after_epochs=2", log=lines.append)
    phases = [line for line in lines if line.startswith("curriculum:")]
    assert phases == ["curriculum: from epoch 1, patches [16, 16, 16]",
                      "curriculum: from epoch 2, patches [32, 32, 32]"]
    lines = []
    summary = train_here(tmp_path, *BASE, *curriculum, log=lines.append)
    phases = [line for line in lines if line.startswith("curriculum:")]
    assert len(phases) == 1 and phases[0].startswith("curriculum: from epoch 3, whole volumes [")
    assert summary["status"] == "completed" and summary["epochs"] == 4


@pytest.mark.parametrize("overrides,key", [
    (["trainer.curriculum=[[16,16,16],whole]"], "trainer.curriculum_epochs"),
    (["trainer.curriculum=[[16,16,16],whole]", "trainer.curriculum_epochs=[1]"], "trainer.curriculum_epochs"),
    (["trainer.curriculum=[[18,16,16]]", "trainer.curriculum_epochs=[1]"], "trainer.curriculum[0]"),
    (["trainer.curriculum=[all]", "trainer.curriculum_epochs=[1]"], "trainer.curriculum[0]"),
])
def test_curriculum_config_errors_name_the_key(overrides, key):
    from lampseg.config import ConfigError, validate

    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        validate(compose("+exp=smoke", *overrides))
