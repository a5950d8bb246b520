"""Reliability rows of docs/RELIABILITY.md: bad data and config get one clear error, faults lose nothing.

Each test here is named in that table. Bad inputs run the real CLI in-process (``lampseg.__main__.main``,
exit code and stderr as a user sees them); faults run training in-process or as a subprocess.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO, train_here
from test_msd import make_dataset

import lampseg.engine.build as engine_build
from lampseg.__main__ import main
from lampseg.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

# a deterministic fp32 CPU config: resumed and uninterrupted runs must agree
DETERMINISTIC = ["+exp=smoke", "trainer.precision=fp32", "trainer.deterministic=true", "trainer.val_every=1",
                 "trainer.hd95=false", "trainer.num_threads=1", "trainer.val_overlays=0"]


def cli(*args: str) -> tuple[int, str, str]:
    """``python -m lampseg ARGS`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


# ------------------------------------------------------------------------------------------- bad data


def _nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(path)
    return np.asarray(img.dataobj), img.affine


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for k in range(len(data) // 3, len(data), max(1, len(data) // 7)):
        data[k] ^= 0xA5
    path.write_bytes(bytes(data))


def _rewrite(path: Path, change) -> None:
    data, affine = _nifti(path)
    data, affine = change(data.copy(), affine.copy())
    nib.save(nib.Nifti1Image(data, affine), path)


def _with_nan(data, affine):
    data = data.astype(np.float32)
    data[5, 6, 4, 0] = np.nan
    data[6, 6, 4, 1] = np.inf
    return data, affine


# name -> (how to break the tiny dataset, the text the one-paragraph error must contain besides the file)
BAD_DATA = {
    "dataset-json-missing": (lambda r: (r / "dataset.json").unlink(), "dataset.json",
                             "dataset.json not found"),
    "dataset-json-malformed": (lambda r: (r / "dataset.json").write_text('{"name": "x", "modality": {'),
                               "dataset.json", "not valid JSON"),
    "dataset-json-field": (lambda r: (r / "dataset.json").write_text(
        (r / "dataset.json").read_text().replace('"labels": {"0"', '"labels": {"zero"')),
        "dataset.json", "key 'zero' is not an integer"),
    "listed-file-missing": (lambda r: (r / "labelsTr" / "case_001.nii.gz").unlink(), "case_001.nii.gz",
                            "does not exist"),
    "truncated-nifti": (lambda r: (r / "imagesTr" / "case_001.nii.gz").write_bytes(
        (r / "imagesTr" / "case_001.nii.gz").read_bytes()[:300]), "case_001.nii.gz", "corrupt or truncated"),
    "corrupt-nifti": (lambda r: _flip_bytes(r / "imagesTr" / "case_001.nii.gz"), "case_001.nii.gz",
                      "case_001.nii.gz: "),
    "shape-mismatch": (lambda r: _rewrite(r / "labelsTr" / "case_001.nii.gz", lambda d, a: (d[:-1], a)),
                       "case_001.nii.gz", "does not match image"),
    "affine-mismatch": (lambda r: _rewrite(r / "labelsTr" / "case_001.nii.gz",
                                           lambda d, a: (d, a + np.diag([0.1, 0, 0, 0]))),
                        "case_001.nii.gz", "label affine differs"),
    "undeclared-label": (lambda r: _rewrite(r / "labelsTr" / "case_001.nii.gz",
                                            lambda d, a: (np.where(d == 2, 7, d).astype(np.uint8), a)),
                         "case_001.nii.gz", "label values [7] are not declared"),
    "non-integer-label": (lambda r: _rewrite(r / "labelsTr" / "case_001.nii.gz",
                                             lambda d, a: (d.astype(np.float32) * 0.5, a)),
                          "case_001.nii.gz", "label values must be integers"),
    "channel-count": (lambda r: _rewrite(r / "imagesTr" / "case_001.nii.gz", lambda d, a: (d[..., :1], a)),
                      "case_001.nii.gz", "expected 2"),
    "nan-inf-voxels": (lambda r: _rewrite(r / "imagesTr" / "case_001.nii.gz", _with_nan),
                       "case_001.nii.gz", "2 NaN/Inf voxel(s)"),
}


@pytest.mark.parametrize("fault", sorted(BAD_DATA))
def test_bad_data_is_one_clear_error(tmp_path, fault):
    """``validate`` and ``train`` both exit non-zero with one paragraph naming the file, no traceback."""
    root = make_dataset(tmp_path / "data", n_cases=4)
    breakage, where, expected = BAD_DATA[fault]
    breakage(root)
    code, out, err = cli("validate", f"data.root={root}", f"run_dir={tmp_path / 'validate'}")
    assert code == 1, (out, err)
    assert "Traceback" not in err + out
    problems = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(problems) == 1 and where in problems[0] and expected in problems[0], out
    code, out, err = cli("train", "+exp=smoke", f"data.root={root}", "data.patch_size=[16,16,16]",
                         f"data.cache_dir={tmp_path / 'cache'}", f"run_dir={tmp_path / 'train'}")
    assert code == 1 and "Traceback" not in err
    message = err.strip().splitlines()
    assert message[0].startswith("lampseg train: error: ") and where in message[0] and expected in message[0]
    assert "lampseg validate" in err  # the hint to list every problem at once


def test_validate_lists_every_problem_at_once(tmp_path):
    """Three broken cases, a missing file, a small case and an empty one: every problem, one run."""
    root = make_dataset(tmp_path / "data", n_cases=6)
    BAD_DATA["truncated-nifti"][0](root)
    _rewrite(root / "labelsTr" / "case_002.nii.gz", lambda d, a: (np.where(d == 2, 9, d).astype(np.uint8), a))
    _rewrite(root / "imagesTr" / "case_003.nii.gz", _with_nan)
    (root / "imagesTr" / "case_004.nii.gz").unlink()
    _rewrite(root / "labelsTr" / "case_005.nii.gz", lambda d, a: (np.zeros_like(d), a))
    code, out, _ = cli("validate", f"data.root={root}", "data.patch_size=[16,16,16]",
                       f"run_dir={tmp_path / 'v'}")
    assert code == 1
    report = json.loads((tmp_path / "v" / "validate.json").read_text())
    assert len(report["errors"]) == 4 and report["cases"] == 5, report
    for name in ("case_001", "case_002", "case_003", "case_004"):
        assert sum(name in e for e in report["errors"]) == 1, name
    assert any("case_005" in w and "no foreground" in w for w in report["warnings"])
    assert any("smaller than data.patch_size [16, 16, 16]" in w for w in report["warnings"])
    assert sum(line.startswith("error: ") for line in out.splitlines()) == 4


def test_nonfinite_zero_small_volumes_and_empty_foreground_train(tmp_path):
    """``data.nonfinite=zero`` cleans NaN/Inf (with a warning), volumes smaller than the patch are padded
    (said once: here all of them are), a case without foreground is sampled at random: training
    completes."""
    root = make_dataset(tmp_path / "data", n_cases=6)
    _rewrite(root / "imagesTr" / "case_001.nii.gz", _with_nan)
    _rewrite(root / "labelsTr" / "case_002.nii.gz", lambda d, a: (np.zeros_like(d), a))
    code, out, err = cli("train", "+exp=smoke", f"data.root={root}", "data.nonfinite=zero",
                         "data.patch_size=[16,16,16]", "trainer.max_epochs=1", "trainer.hd95=false",
                         "data.foreground_ratio=1.0", f"data.cache_dir={tmp_path / 'cache'}",
                         f"run_dir={tmp_path / 'run'}")
    assert code == 0, err
    assert "warning: " in out and "2 NaN/Inf voxel(s) set to 0 (data.nonfinite=zero)" in out
    assert "info: all 6 case(s) are smaller than data.patch_size [16, 16, 16]" in out
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "completed"
    code, out, _ = cli("validate", f"data.root={root}", "data.nonfinite=zero", f"run_dir={tmp_path / 'v'}")
    assert code == 0 and "0 error(s)" in out and "set to 0" in out


# ---------------------------------------------------------------------------------------------- faults


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path):
    """Flipped bytes in latest.pt (which torch.load alone loads silently) fail its checksum; the same
    command warns, resumes from latest.prev.pt and ends exactly where an uninterrupted run ends."""
    clean, broken = tmp_path / "clean", tmp_path / "broken"
    train_here(clean, *DETERMINISTIC, "trainer.max_epochs=3")
    train_here(broken, *DETERMINISTIC, "trainer.max_epochs=3", "trainer.stop_after_epochs=2")
    latest = broken / "checkpoints" / "latest.pt"
    assert load_checkpoint(broken / "checkpoints" / "latest.prev.pt")["epoch"] == 1
    payload = torch.load(latest, weights_only=True)
    _flip_bytes(latest)
    silently = torch.load(latest, weights_only=True)  # why lampseg keeps a checksum
    assert any(not torch.equal(payload["model"][k], silently["model"][k]) for k in payload["model"])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(latest)
    lines: list[str] = []
    train_here(broken, *DETERMINISTIC, "trainer.max_epochs=3", log=lines.append)
    assert any("is corrupt" in line and "latest.prev.pt (epoch 1)" in line for line in lines), lines
    assert (broken / "checkpoints" / "latest.corrupt.pt").is_file()
    a = load_checkpoint(clean / "checkpoints" / "final.pt")
    b = load_checkpoint(broken / "checkpoints" / "final.pt")
    for name, tensor in a["model"].items():
        assert torch.allclose(tensor, b["model"][name], rtol=0, atol=1e-6), name


def test_both_checkpoints_corrupt_is_a_clear_error(tmp_path):
    run_dir = tmp_path / "run"
    train_here(run_dir, *DETERMINISTIC, "trainer.max_epochs=3", "trainer.stop_after_epochs=2")
    for name in ("latest.pt", "latest.prev.pt"):
        (run_dir / "checkpoints" / name).write_bytes(b"\0" * 64)
    code, _, err = cli("train", *DETERMINISTIC, "trainer.max_epochs=3", f"run_dir={run_dir}")
    assert code == 1 and "Traceback" not in err
    assert "no usable checkpoint to resume from" in err and "latest.prev.pt" in err


def _nan_loss_on(steps):
    """A ``build_loss`` whose loss is NaN on the given 1-based global steps (``steps(n) -> bool``)."""
    real = engine_build.build_loss
    calls = [0]

    def build(*args, **kwargs):
        loss_fn = real(*args, **kwargs)

        def loss(logits, target):
            calls[0] += 1
            value = loss_fn(logits, target)
            return value * math.nan if steps(calls[0]) else value
        return loss
    return build


def test_nan_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(engine_build, "build_loss", _nan_loss_on(lambda n: n in (2, 3, 5)))
    summary = train_here(tmp_path / "run", *DETERMINISTIC, "trainer.max_epochs=3", "trainer.max_nan_steps=3")
    assert summary["status"] == "completed" and summary["skipped_steps"] == 3
    weights = load_checkpoint(tmp_path / "run" / "checkpoints" / "final.pt")["model"]
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_nan_steps_abort_after_max_nan_steps(tmp_path, monkeypatch):
    """From step 3 on every loss is NaN: with trainer.max_nan_steps=4 the CLI stops at step 6 with one
    paragraph (exit 1); the checkpoint of epoch 1 is intact and the summary says failed."""
    monkeypatch.setattr(engine_build, "build_loss", _nan_loss_on(lambda n: n >= 3))
    run_dir = tmp_path / "run"
    code, _, err = cli("train", *DETERMINISTIC, "trainer.max_epochs=4", "trainer.max_nan_steps=4",
                       f"run_dir={run_dir}")
    assert code == 1 and "Traceback" not in err
    assert "training diverged: 4 consecutive steps (up to step 6, epoch 3)" in err, err
    assert "trainer.max_nan_steps=4" in err
    assert load_checkpoint(run_dir / "checkpoints" / "latest.pt")["epoch"] == 2
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.extended
def test_full_disk_while_writing_a_checkpoint_keeps_the_previous(tmp_path):
    """The real CLI with a file-size limit below the checkpoint's size (the kernel refuses the write as on a
    full disk): exit 1 with a message, the previous latest.pt byte-identical, no temp files; the same
    command without the limit resumes and completes."""
    run_dir = tmp_path / "run"
    train_here(run_dir, *DETERMINISTIC, "trainer.max_epochs=2", "trainer.stop_after_epochs=1")
    latest = run_dir / "checkpoints" / "latest.pt"
    before = latest.read_bytes()
    proc = subprocess.run([sys.executable, "-m", "lampseg", "train", *DETERMINISTIC, "trainer.max_epochs=2",
                           f"run_dir={run_dir}"], capture_output=True, text=True, cwd=REPO,
                          preexec_fn=_limit_file_size(len(before) // 2))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "could not write checkpoint" in proc.stderr
    assert "the previous checkpoint there is intact" in proc.stderr
    assert latest.read_bytes() == before
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))
    assert train_here(run_dir, *DETERMINISTIC, "trainer.max_epochs=2")["status"] == "completed"


def test_interrupted_checkpoint_write_keeps_the_previous(tmp_path, monkeypatch):
    """A write that dies half-way (here: an exception after half the bytes) leaves the old file."""
    path = tmp_path / "latest.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(1000)}, "epoch": 1})
    before = path.read_bytes()
    real_fdopen = os.fdopen

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr("lampseg.io.os.fdopen", lambda *a, **k: HalfWriter(real_fdopen(*a, **k)))
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_checkpoint(path, {"model": {"w": torch.zeros(1000)}, "epoch": 2}, keep_previous=True)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.prev.pt", "latest.pt"]


# ------------------------------------------------------------------------------------------------ config


def _tiny_root(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "data", n_cases=4)


# name -> (overrides, text the error must contain); each must fail before preprocessing starts
BAD_CONFIG = {
    "unknown-key": (["trainer.max_epoch=3"], "trainer.max_epoch"),
    "wrong-type": (["trainer.max_epochs=abc"], "trainer.max_epochs"),
    "dp-times-pp-not-world-size": (["parallel=ddp", "parallel.dp=2"],
                                   "2 processes needed, but WORLD_SIZE is 1"),
    "more-stages-than-blocks": (["parallel=pipeline", "parallel.engine=gpipe", "parallel.pp=6"],
                                "config key 'parallel.pp': expected at most 5 stages"),
    "impossible-memory-budget": (["parallel=pipeline", "parallel.engine=gpipe", "parallel.memory_gb=0.0001"],
                                 "fits parallel.memory_gb=0.0001 GB per stage"),
    "unknown-modality": (["data.modalities=[CT,MRI]"], "unknown modality 'MRI'"),
    "one-voxel-bottleneck": (["model.channels=[8,16,32,64,128]", "model.strides=[2,2,2,2]",
                              "model.norm=instance"], "cannot normalise the 1x1x1 bottleneck"),
}


@pytest.mark.parametrize("fault", sorted(BAD_CONFIG))
def test_bad_config_fails_before_any_heavy_work(tmp_path, fault):
    overrides, expected = BAD_CONFIG[fault]
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    code, out, err = cli("train", "+exp=smoke", f"data.root={_tiny_root(tmp_path)}",
                         "data.patch_size=[16,16,16]", f"data.cache_dir={cache}", *overrides,
                         f"run_dir={run_dir}")
    assert code != 0 and "Traceback" not in err
    assert expected in err, err
    assert not cache.exists() and "preprocessing" not in out  # nothing heavy ran
    assert not (run_dir / "summary.json").exists()


# ------------------------------------------------------------------------------------------------ safety


class _Payload:
    """Unpickling this creates a file: what a malicious checkpoint would do with code instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoints_never_unpickle_code(tmp_path):
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(1)}, "extra": _Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_checkpoint(evil)
    code, _, err = cli("evaluate", f"ckpt={evil}", f"run_dir={tmp_path / 'run'}")
    assert code == 1 and "weights_only=True" in err and "Traceback" not in err
    assert not marker.exists()


def test_config_and_metadata_files_construct_no_objects(tmp_path):
    """A YAML config with a Python tag is refused; ``_target_`` entries in dataset.json are plain data."""
    marker = tmp_path / "pwned"
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "evil.yaml").write_text(f"defaults:\n  - lampseg_schema\n  - _self_\nseed: !!python/object/apply:"
                                    f"pathlib.Path.touch [{marker}]\n")
    code, out, err = cli("train", "--config-path", str(conf), "--config-name", "evil",
                         f"run_dir={tmp_path / 'r'}")
    assert code != 0 and not marker.exists(), out + err
    root = _tiny_root(tmp_path)
    meta = json.loads((root / "dataset.json").read_text())
    meta["name"] = {"_target_": "pathlib.Path.touch", "_args_": [str(marker)]}
    meta["description"] = {"_target_": "os.system", "command": f"touch {marker}"}
    (root / "dataset.json").write_text(json.dumps(meta))
    code, out, err = cli("validate", f"data.root={root}", f"run_dir={tmp_path / 'v'}")
    assert code == 0 and not marker.exists(), out + err


def test_shared_artifacts_name_no_user_path_or_secret(tmp_path, monkeypatch):
    """With the dataset and the run under $HOME and secrets in the environment, nothing lampseg writes
    besides the run's own config (.hydra/) and console log names the home directory or a secret: summaries,
    metrics, eval.json, checkpoints (their embedded config), pictures, TensorBoard events."""
    home = tmp_path / "home" / "alice"
    secrets = {"AWS_SECRET_ACCESS_KEY": "s3cr3t-aws-Zx81", "HF_TOKEN": "hf_token_Qq77",
               "WANDB_API_KEY": "wb-K3y9"}
    monkeypatch.setenv("HOME", str(home))
    for key, value in secrets.items():
        monkeypatch.setenv(key, value)
    root = make_dataset(home / "data" / "Task99", n_cases=4)
    run_dir = home / "runs" / "r1"
    code, _, err = cli("train", "+exp=smoke", f"data.root={root}", "data.patch_size=[16,16,16]",
                       "trainer.max_epochs=1", f"run_dir={run_dir}")
    assert code == 0, err
    code, _, err = cli("evaluate", f"ckpt={run_dir / 'checkpoints' / 'final.pt'}",
                       f"run_dir={run_dir / 'eval'}")
    assert code == 0, err
    checked = 0
    for path in run_dir.rglob("*"):
        if not path.is_file() or ".hydra" in path.parts or path.suffix == ".log":
            continue
        data = path.read_bytes()
        assert str(home).encode() not in data, path
        for value in secrets.values():
            assert value.encode() not in data, path
        checked += 1
    assert checked >= 8
    config = load_checkpoint(run_dir / "checkpoints" / "final.pt")["config"]
    assert config["data"]["root"] == "~/data/Task99"  # portable, and Path.expanduser restores it


def test_debug_true_shows_the_traceback(tmp_path):
    """The one-paragraph errors hide Python's traceback; ``debug=true`` lets the exception through."""
    root = make_dataset(tmp_path / "data", n_cases=4)
    (root / "labelsTr" / "case_001.nii.gz").unlink()
    code, _, err = cli("train", "+exp=smoke", f"data.root={root}", "debug=true",
                       f"run_dir={tmp_path / 'run'}")
    assert code == 1 and "Traceback" in err and "DataError" in err and "case_001.nii.gz does not exist" in err


@pytest.mark.parametrize("argv,local", [
    (["--standalone", "--nproc_per_node=2"], True),
    (["--nproc_per_node=2"], True),  # torchrun's default master address is 127.0.0.1
    (["--master_addr=localhost", "--master_port=29500"], True),
    (["--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:29500"], True),
    (["--rdzv-endpoint=10.1.2.3:29500", "--nnodes=2"], False),
    (["--master_addr", "192.0.2.7"], False),
])
def test_launcher_knows_a_local_job(argv, local):
    """``python -m lampseg.launch`` binds to loopback exactly when the rendezvous address is loopback."""
    from lampseg.launch import is_local_job

    assert is_local_job(argv) is local


def test_launcher_binds_the_rendezvous_store_to_loopback():
    """The launcher's store listens on the loopback address only (torch's own ``TCPStore`` listens on every
    interface); every torchrun test of the suite also checks the listeners of the whole job (conftest)."""
    import psutil

    from lampseg.launch import LoopbackTCPStore

    store = LoopbackTCPStore("127.0.0.1", 0, 1, True, use_libuv=True)
    store.set("key", "value")
    assert store.get("key") == b"value"
    mine = {c.laddr for c in psutil.Process().net_connections(kind="inet") if c.status == psutil.CONN_LISTEN
            and c.laddr.port == store.port}
    assert mine and all(a.ip == "127.0.0.1" for a in mine), mine
    del store
