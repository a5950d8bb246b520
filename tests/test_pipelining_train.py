"""parallel.engine=pipelining end to end: ``torchrun -m lampseg`` with one U-Net stage per process (gloo,
CPU). Training follows the unsplit model's trajectory, resumes, and its checkpoints load under any pp and
either engine; evaluate and predict run pipelined; misuse is a clear config error."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO, compose, free_port, lampseg, load_check_run_dir, torchrun, train_here, train_losses

# fp32 + SGD (see test_gpipe_train.py); a small clip norm so the all-reduced global norm matters.
BASE = ["+exp=smoke", "optim=sgd", "optim.grad_clip=0.1", "trainer.precision=fp32",
        "trainer.deterministic=true", "trainer.max_epochs=2", "trainer.hd95=false", "data.batch_size=4",
        "data.samples_per_epoch=8"]
PIPE = ["parallel=pipeline", "parallel.engine=pipelining"]


def _train_here(run_dir: Path, *overrides: str) -> dict:
    return train_here(run_dir, *BASE, "trainer.num_threads=1", *overrides)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def _assert_same_weights(got: dict, ref: dict) -> None:
    assert got.keys() == ref.keys()  # unsplit parameter names
    for name, tensor in ref.items():
        assert torch.allclose(got[name], tensor, rtol=1e-4, atol=1e-5), name


@pytest.fixture(scope="module")
def unsplit(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("unsplit")
    _train_here(run_dir)
    return run_dir


# The default suite trains two stages under 1F1B (four micro-batches: warm-up, steady 1F1B and cool-down
# phases): as long as GPipe with one micro-batch took, which the extended tests keep; the pipelining engine's
# GPipe schedule stays in the default suite through tests/test_spatial.py's stages of slabs.
@pytest.mark.parametrize("pp,schedule,microbatches", [
    (2, "1f1b", 4),
    pytest.param(2, "gpipe", 1, marks=pytest.mark.extended),
    pytest.param(4, "gpipe", 2, marks=pytest.mark.extended),
])
def test_pipelining_training_matches_unsplit(tmp_path, unsplit, pp, schedule, microbatches):
    torchrun(pp, "train", *BASE, *PIPE, f"parallel.pp={pp}", f"parallel.schedule={schedule}",
             f"parallel.microbatches={microbatches}", f"run_dir={tmp_path}")
    summary = json.loads((tmp_path / "summary.json").read_text())
    plan = summary["plan"]
    assert (summary["status"], summary["world_size"], summary["pp"], summary["engine"]) == (
        "completed", pp, pp, "pipelining")
    assert (len(plan["stages"]), plan["microbatches"], plan["schedule"]) == (pp, microbatches, schedule)
    memory = summary["stage_memory"]  # measured on the second step, next to the plan
    assert [m["stage"] for m in memory] == list(range(pp))
    assert all(0 < m["static_gb"] < m["measured_gb"] and m["planned_gb"] > 0 for m in memory), memory
    assert train_losses(tmp_path) == pytest.approx(train_losses(unsplit), rel=1e-5)
    _assert_same_weights(_weights(tmp_path / "checkpoints" / "final.pt"),
                         _weights(unsplit / "checkpoints" / "final.pt"))
    assert load_check_run_dir().check(tmp_path) == []


@pytest.mark.extended
def test_pipelining_resumes_and_checkpoints_are_portable(tmp_path, unsplit):
    """Stop after one epoch, relaunch the same command: it resumes (weights and name-keyed optimiser state)
    and ends where the unsplit run ends. Its checkpoint then continues under pp=1 and under gpipe pp=4
    with the same result, and evaluates and predicts pipelined as it does unsplit."""
    first = tmp_path / "pp2"
    command = ["train", *BASE, *PIPE, "parallel.pp=2", "parallel.microbatches=2", f"run_dir={first}"]
    torchrun(2, *command, "trainer.stop_after_epochs=1")
    assert json.loads((first / "summary.json").read_text())["epochs"] == 1
    proc = torchrun(2, *command)
    assert "resumed from" in proc.stdout and proc.stdout.count("resumed from") == 1  # printed by rank 0 only
    final = first / "checkpoints" / "final.pt"
    _assert_same_weights(_weights(final), _weights(unsplit / "checkpoints" / "final.pt"))

    single = _train_here(tmp_path / "pp1", "trainer.max_epochs=3", f"trainer.resume={final}")
    gpipe = _train_here(tmp_path / "gpipe4", "trainer.max_epochs=3", f"trainer.resume={final}",
                        "parallel=pipeline", "parallel.engine=gpipe", "parallel.pp=4")
    assert (single["epochs"], gpipe["epochs"], gpipe["pp"]) == (3, 3, 4)
    _assert_same_weights(_weights(tmp_path / "gpipe4" / "checkpoints" / "final.pt"),
                         _weights(tmp_path / "pp1" / "checkpoints" / "final.pt"))

    torchrun(2, "evaluate", f"ckpt={final}", f"run_dir={tmp_path / 'ev_split'}")
    lampseg("evaluate", f"ckpt={final}", "parallel=single", f"run_dir={tmp_path / 'ev_single'}")
    split = json.loads((tmp_path / "ev_split" / "eval.json").read_text())
    whole = json.loads((tmp_path / "ev_single" / "eval.json").read_text())
    assert (split["parallel"]["engine"], split["parallel"]["pp"]) == ("pipelining", 2)
    assert split["mean"]["dice"] == pytest.approx(whole["mean"]["dice"], abs=1e-6)

    from lampseg.data.prepare import dataset_root

    image = sorted((dataset_root(compose("+exp=smoke").data) / "imagesTr").glob("*.nii.gz"))[0]
    torchrun(2, "predict", f"ckpt={final}", f"input={image}", f"output={tmp_path / 'pred_split'}")
    lampseg("predict", f"ckpt={final}", "parallel=single", f"input={image}",
            f"output={tmp_path / 'pred_one'}")
    got = np.asarray(nib.load(tmp_path / "pred_split" / image.name).dataobj)
    ref = np.asarray(nib.load(tmp_path / "pred_one" / image.name).dataobj)
    assert got.shape == ref.shape and (got == ref).mean() > 0.999


@pytest.mark.extended
def test_pipelining_misuse_is_a_config_error(tmp_path):
    proc = lampseg("train", "+exp=smoke", *PIPE, "parallel.pp=2", f"run_dir={tmp_path / 'a'}", check=False)
    assert proc.returncode == 2 and "torchrun --nproc_per_node 2" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = torchrun(2, "train", "+exp=smoke", *PIPE, "parallel.pp=4", f"run_dir={tmp_path / 'b'}",
                    check=False)
    assert proc.returncode != 0 and "WORLD_SIZE is 2" in proc.stderr and "parallel.pp" in proc.stderr
    proc = torchrun(2, "train", "+exp=smoke", f"run_dir={tmp_path / 'c'}", check=False)
    assert proc.returncode != 0 and "WORLD_SIZE is 2" in proc.stderr
    assert not (tmp_path / "c" / "checkpoints").exists()


@pytest.mark.extended
def test_pipelining_across_two_nodes(tmp_path, unsplit):
    """Two torchrun 'nodes' (one process each) meeting at a c10d rendezvous on 127.0.0.1: one stage per
    node, the unsplit model's losses."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "lampseg.launch", "--nnodes=2", "--nproc_per_node=1",
               "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}", "--rdzv_id=lampseg-test",
               "-m", "lampseg", "train", *BASE, *PIPE, "parallel.pp=2", "parallel.microbatches=2",
               f"run_dir={tmp_path / 'mn'}"]
    nodes = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    try:
        outputs = [node.communicate(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    summary = json.loads((tmp_path / "mn" / "summary.json").read_text())
    assert (summary["status"], summary["world_size"], summary["pp"]) == ("completed", 2, 2)
    assert train_losses(tmp_path / "mn") == pytest.approx(train_losses(unsplit), rel=1e-5)


@pytest.mark.extended
def test_pipelining_curriculum_up_to_whole_volumes_via_launch_script(tmp_path):
    """``launch/pipeline_local.sh`` (torchrun --standalone, one stage per process) with LAMP's curriculum:
    each phase's input size gets its own schedule and buffers; the run ends on whole volumes."""
    env = {**os.environ, "PP": "2", "RUN_DIR": str(tmp_path), "OMP_THREADS": "1"}
    proc = subprocess.run(["bash", "launch/pipeline_local.sh", *BASE, "parallel.microbatches=2",
                           "trainer.curriculum=[[16,16,16],whole]", "trainer.curriculum_epochs=[1,1]"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    phases = [line for line in proc.stdout.splitlines() if line.startswith("curriculum:")]
    assert phases[0] == "curriculum: from epoch 1, patches [16, 16, 16]"
    assert phases[1].startswith("curriculum: from epoch 2, whole volumes [")
    summary = json.loads((tmp_path / "summary.json").read_text())
    whole = json.loads(phases[1].split("whole volumes ")[1])
    assert summary["status"] == "completed" and summary["plan"]["input_shape"][1:] == whole  # planned for it
