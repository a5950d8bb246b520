"""Ray Tune studies (``lampseg.tune``), in one Ray session shared by this module (2 CPUs, loopback,
dashboard off, short temp dir). Every trial is a real ``run(cfg, reporter)`` on ``+exp=smoke``."""
from __future__ import annotations

import csv
import json
import math
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest
import ray  # a required dependency; read at import, the loopback setting is re-applied before ray.init
from conftest import compose, is_loopback, lampseg
from omegaconf import OmegaConf

from lampseg.config import ConfigError
from lampseg.errors import LampsegError

pytestmark = pytest.mark.slow
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def ray_session(lampseg_home):
    """One local Ray for the module, as lampseg starts it (loopback only); it must listen on nothing else,
    and afterwards no Ray process of it may be left."""
    from lampseg.tune.loopback import local_ray_on_loopback

    local_ray_on_loopback()
    temp = tempfile.mkdtemp(prefix="lampseg-ray-test-")  # short: Ray's socket paths live under it
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, configure_logging=False,
             log_to_driver=False)
    yield
    listening = {(p.name(), c.laddr.ip) for p in psutil.Process().children(recursive=True)
                 for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    assert listening and all(is_loopback(ip) for _, ip in listening), listening
    ray.shutdown()
    left = subprocess.run(["pgrep", "-f", temp], capture_output=True, text=True).stdout.split()
    assert not left, f"Ray processes left running: {left}"


def _study(run_dir: Path, *overrides: str, log=None) -> dict:
    from lampseg.tune.search import run_tune

    cfg = compose("+exp=smoke", "trainer.hd95=false", *overrides)
    OmegaConf.update(cfg, "run_dir", str(run_dir), merge=False)
    return run_tune(cfg, log=log or (lambda _: None))


def _results(run_dir: Path) -> list[dict]:
    with open(run_dir / "tune" / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def _progress_epochs(trial_dir: Path) -> list[int]:
    """The epochs a trial reported to Tune, in order (Ray's own record, ``progress.csv``)."""
    with open(trial_dir / "progress.csv", newline="") as f:
        return [int(float(r["epoch"])) for r in csv.DictReader(f)]


def test_grid_study_writes_outputs_and_its_best_config_reruns(tmp_path, ray_session):
    """A 2 x 1 grid over two keys: two trials, results.csv, best_config.yaml, plots, a table; the best
    config reruns through ``train --config-path`` to the same Dice."""
    lines: list[str] = []
    space = "tune.space=[{key:optim.lr,grid:[0.001,0.003]},{key:optim.amsgrad,grid:[true]}]"
    summary = _study(tmp_path, space, log=lines.append)
    rows = _results(tmp_path)
    assert len(rows) == 2 and {r["status"] for r in rows} == {"completed"}
    assert {(r["optim.lr"], r["optim.amsgrad"]) for r in rows} == {("0.001", "True"), ("0.003", "True")}
    for r in rows:  # each trial is a lampseg run directory trained with its own values
        trial = Path(r["trial_dir"])
        trained = json.loads((trial / "summary.json").read_text())
        assert trained["status"] == "completed" and trained["epochs"] == 2
        assert float(r["best_val_dice"]) == pytest.approx(trained["best_val_dice"])
        config = OmegaConf.load(trial / ".hydra" / "config.yaml")
        assert (config.optim.lr, config.optim.amsgrad) == (float(r["optim.lr"]), r["optim.amsgrad"] == "True")
        assert _progress_epochs(trial) == [1, 2]
    best = max(rows, key=lambda r: float(r["best_val_dice"]))
    assert rows[0] == best and summary["best"]["trial_id"] == best["trial_id"]
    for name in ("curves.png", "params.png"):
        assert (tmp_path / "tune" / name).read_bytes()[:8] == PNG
    assert any(line.startswith("rank") and "optim.lr" in line for line in "\n".join(lines).splitlines())
    # the console names each trial by its values and says how the study stands
    for lr in ("0.001", "0.003"):
        assert sum(f"started   lr={lr} amsgrad=True" in line for line in lines) == 1, lines
        assert sum("finished  lr=" + lr in line and "best val Dice" in line for line in lines) == 1, lines
    assert any(line.startswith("study: 2/2 finished, 0 running, 0 pending; best val Dice") for line in lines)
    for r in rows:  # each trial's own output is in its log.txt
        assert "epoch 2/2" in (Path(r["trial_dir"]) / "log.txt").read_text()

    rerun = tmp_path / "rerun"
    lampseg("train", "--config-path", tmp_path / "tune", "--config-name", "best_config", f"run_dir={rerun}",
            "trainer.num_threads=1")
    again = json.loads((rerun / "summary.json").read_text())
    assert again["best_val_dice"] == pytest.approx(float(best["best_val_dice"]), abs=1e-4)

    with pytest.raises(ConfigError, match="tune.resume"):  # the study exists: refuse to mix a second one in
        _study(tmp_path, "tune.space=[{key:optim.lr,grid:[0.001]}]")


@pytest.mark.extended
def test_asha_stops_the_bad_trial_early(tmp_path, ray_session):
    """ASHA on train_loss: the trial with a useless learning rate is stopped at the first rung."""
    _study(tmp_path, "tune.scheduler=asha", "tune.metric=train_loss", "tune.mode=min",
           "tune.max_concurrent=1", "tune.asha.grace_period=1", "trainer.max_epochs=4",
           "data.samples_per_epoch=8",
           "tune.space=[{key:optim.lr,grid:[0.003,1.0e-9]}]")
    rows = {r["optim.lr"]: r for r in _results(tmp_path)}
    assert rows["0.003"]["status"] == "completed" and int(rows["0.003"]["epochs"]) == 4
    assert rows["1e-09"]["status"] == "stopped" and int(rows["1e-09"]["epochs"]) < 4


def test_failed_trial_retries_from_its_checkpoint(tmp_path, ray_session):
    """A trial that raises after epoch 1 is restarted by Tune from its epoch-1 checkpoint and finishes:
    epochs are reported 1, 2 (a restart from scratch would report epoch 1 twice). Two short epochs: the
    default suite's size (one more epoch would prove nothing more)."""
    lines: list[str] = []
    _study(tmp_path, "trainer.max_epochs=2", "trainer.fail_at_epoch=1", "tune.max_failures=1",
           "data.samples_per_epoch=2", "trainer.val_overlays=0",
           "tune.space=[{key:optim.lr,grid:[0.003]}]", log=lines.append)
    assert any("failed    lr=0.003: RuntimeError: trainer.fail_at_epoch=1" in line
               and "retrying from its last checkpoint" in line for line in lines), lines
    (row,) = _results(tmp_path)
    trial = Path(row["trial_dir"])
    assert row["status"] == "completed" and (trial / ".failed_at_epoch").is_file()
    assert _progress_epochs(trial) == [1, 2]
    with open(trial / "metrics.csv", newline="") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]


def test_pipelined_trial_runs_two_stages_in_one_bundle(tmp_path, ray_session):
    """parallel=pipeline parallel.pp=2: the trial reserves 2 CPUs as one bundle and trains two stages
    in its own process (torchgpipe over ['cpu', 'cpu']); one short epoch, the default suite's size."""
    summary = _study(tmp_path, "parallel=pipeline", "parallel.pp=2", "trainer.max_epochs=1",
                     "data.samples_per_epoch=2", "trainer.val_overlays=0",
                     "tune.space=[{key:optim.lr,grid:[0.003]}]")
    assert summary["resources_per_trial"] == {"CPU": 2.0}
    (row,) = _results(tmp_path)
    trained = json.loads((Path(row["trial_dir"]) / "summary.json").read_text())
    assert row["status"] == "completed" and trained["engine"] == "gpipe" and trained["epochs"] == 1
    assert len(trained["plan"]["stages"]) == 2


def test_unfinished_study_resumes_without_retraining_finished_trials(tmp_path, ray_session):
    """``tune.resume=true`` continues a study that its first command left unfinished (the default suite's
    in-process stand-in for tests/test_tune_cli.py's Ctrl-C test): of a 2-trial grid of 2 epochs, one trial
    completes and the other stops after epoch 1 (``trainer.fail_at_epoch=1``, no retry allowed; the other's
    drill is set past its last epoch); the first command says how to continue, and the same study with
    tune.resume=true continues that trial from its epoch-1 checkpoint (epochs 1, 2 reported, none twice)
    and leaves the finished trial alone."""
    study = ["tune.max_failures=0", "data.samples_per_epoch=2", "trainer.val_overlays=0",
             "tune.space=[{key:trainer.fail_at_epoch,grid:[3,1]}]"]
    lines: list[str] = []
    _study(tmp_path, *study, log=lines.append)
    hint = "continue the study with the same command plus tune.resume=true"
    assert any(hint in line for line in lines), lines
    first = {r["trainer.fail_at_epoch"]: r for r in _results(tmp_path)}
    assert (first["3"]["status"], first["1"]["status"]) == ("completed", "error"), first
    done = Path(first["3"]["trial_dir"]) / "summary.json"
    kept = done.stat().st_mtime_ns

    lines.clear()
    _study(tmp_path, *study, "tune.resume=true", log=lines.append)
    assert any(line.startswith("tune: resuming the study") for line in lines), lines
    rows = {r["trainer.fail_at_epoch"]: r for r in _results(tmp_path)}
    assert {k: r["status"] for k, r in rows.items()} == {"3": "completed", "1": "completed"}
    assert done.stat().st_mtime_ns == kept  # not retrained
    resumed = Path(rows["1"]["trial_dir"])
    assert resumed == Path(first["1"]["trial_dir"]) and int(rows["1"]["epochs"]) == 2
    assert _progress_epochs(resumed) == [1, 2]
    with open(resumed / "metrics.csv", newline="") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]


def test_tiny_loo_study_writes_its_tables_from_every_held_out_case(tmp_path, ray_session):
    """``loo`` end to end at the default suite's size (tests/test_loo.py has the larger studies), in process
    (``run_loo``, what ``python -m lampseg loo`` calls; here to share this module's Ray session): 2 modalities
    of the smoke data, so 3 conditions (all, without FLAIR, without t1gd) x 2 folds = 6 one-epoch trials in
    one Tune study; every case is held out once per condition, summary.csv ranks the two modalities from
    the paired per-case Dice, summary.md and the plots are written."""
    from statistics import fmean

    from lampseg.tune.loo import run_loo

    cfg = compose("+exp=smoke", "data.modalities=[FLAIR,t1gd]", "data.patch_size=[16,16,16]",
                  "trainer.hd95=false", "trainer.max_epochs=1", "data.samples_per_epoch=2", "loo.folds=2",
                  "trainer.val_overlays=0")
    run_dir = tmp_path / "study"
    OmegaConf.update(cfg, "run_dir", str(run_dir), merge=False)
    lines: list[str] = []
    result = run_loo(cfg, log=lines.append)
    assert "loo: 3 conditions (none, FLAIR, t1gd) x 2 folds = 6 trials" in lines
    out = run_dir / "loo"
    with open(out / "summary.csv", newline="") as f:
        summary = list(csv.DictReader(f))
    assert [r["left_out"] for r in summary][0] == "none" and {r["left_out"] for r in summary} == {
        "none", "FLAIR", "t1gd"}
    assert sorted(r["rank"] for r in summary) == ["", "1", "2"] and summary[0]["rank"] == ""
    assert result["folds"] == 2 and sorted(result["ranking"]) == ["FLAIR", "t1gd"]
    with open(out / "results.csv", newline="") as f:
        results = list(csv.DictReader(f))
    cases = sorted({r["case"] for r in results})
    assert len(cases) == result["cases"] == 6 and {r["fold"] for r in results} == {"0", "1"}
    for row in summary:
        rows = [r for r in results if r["left_out"] == row["left_out"]]
        assert sorted(r["case"] for r in rows) == cases  # each case held out once per condition
        dice = [float(r["dice"]) for r in rows]
        assert all(0 <= d <= 1 for d in dice) and float(row["mean_dice"]) == pytest.approx(fmean(dice))
        assert int(row["cases"]) == 6
    markdown = (out / "summary.md").read_text()
    assert markdown.startswith("# Leave-one-modality-out study (2 folds, 6 held-out cases)")
    assert f"Importance (largest Dice drop when left out first): {' > '.join(result['ranking'])}." in markdown
    for name in ("importance.png", "per_case.png"):
        assert (out / name).read_bytes()[:8] == PNG
    trials = sorted((run_dir / "tune").glob("trial_*"))
    assert len(trials) == 6 and all((t / "eval.json").is_file() for t in trials)


@pytest.mark.extended
def test_optuna_search_and_pbt(tmp_path, ray_session):
    """The optuna preset samples the space with TPE; PBT exploits a better trial's checkpoint."""
    _study(tmp_path / "optuna", "tune=optuna", "tune.num_samples=2",
           "tune.space=[{key:optim.lr,loguniform:[0.0001,0.01]},{key:model.norm,choice:[instance,batch]}]")
    rows = _results(tmp_path / "optuna")
    assert len(rows) == 2 and all(1e-4 <= float(r["optim.lr"]) <= 1e-2 for r in rows)
    assert all(r["status"] in ("completed", "stopped") for r in rows)

    _study(tmp_path / "pbt", "tune=pbt", "tune.num_samples=2", "tune.pbt.perturbation_interval=1",
           "tune.pbt.quantile_fraction=0.5", "trainer.max_epochs=3")
    rows = _results(tmp_path / "pbt")
    assert len(rows) == 2 and {r["status"] for r in rows} == {"completed"}
    assert all(not math.isnan(float(r["best_val_dice"])) for r in rows)


@pytest.mark.parametrize("overrides, message", [
    (["tune.space=[{key:optim.nosuch,grid:[1]}]"], "no config key 'optim.nosuch'"),
    (["tune.space=[{key:optim.lr,grid:[-1.0]}]"], "optim.lr"),
    (["tune.space=[{key:model.norm,grid:[layer]}]"], "model.norm"),
    (["tune.space=[{key:optim.lr,between:[1,2]}]"], r"tune.space\[0\]"),
    (["tune.space=[{key:optim.lr,loguniform:[0,1]}]"], "low > 0"),
    (["tune=optuna", "tune.space=[{key:optim.lr,grid:[0.1]}]"], "use choice instead of grid"),
    (["tune=asha_random", "trainer.val_every=2"], "trainer.val_every"),
    (["parallel=ddp"], "a Tune trial is one process"),
    (["tune.address=127.0.0.1:1"], "nothing answers at 127.0.0.1:1"),
    (["tune.address=somewhere"], "expected auto or HOST:PORT"),
    (["tune.space=[{key:optim.lr,grid:[0.1]},{key:optim.lr,choice:[0.2]}]"], "listed twice"),
])
def test_bad_study_configs_fail_before_ray_starts(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        _study(tmp_path, *overrides)
    assert not (tmp_path / "tune").exists()


@pytest.mark.parametrize("preset", ["default", "berral_grid", "asha_random", "optuna", "pbt"])
def test_presets_are_valid_studies(preset):
    """Every conf/tune preset passes the study checks; berral_grid is Berral et al.'s 32 trials."""
    from lampseg.tune.space import check_space, grid_points, grid_size

    space = check_space(compose(f"tune={preset}"))
    assert space
    if preset == "berral_grid":
        assert grid_size(space) == 32 and len(grid_points(space)) == 32
        assert set(space) == {"optim.lr", "model.norm", "optim.beta2", "optim.amsgrad"}


def test_trials_get_loader_workers_from_their_own_cpus():
    """``data.num_workers=auto`` in a study: each trial's reserved CPUs less one (trials share the machine),
    not the whole machine's cores; a number is kept."""
    from lampseg.tune.search import study_config

    assert study_config(compose("data.num_workers=auto"), log=lambda _: None)[0]["data"]["num_workers"] == 0
    four = compose("data.num_workers=auto", "tune.resources.cpu=4")
    assert study_config(four, log=lambda _: None)[0]["data"]["num_workers"] == 3
    staged = compose("data.num_workers=auto", "tune.resources.cpu=2", "parallel=pipeline", "parallel.pp=2")
    assert study_config(staged, log=lambda _: None)[0]["data"]["num_workers"] == 3
    assert study_config(compose("data.num_workers=2"), log=lambda _: None)[0]["data"]["num_workers"] == 2


SLEEP = [sys.executable, "-c", "import time; time.sleep(120)"]


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="processes are recorded from /proc")
def test_reap_orphans_stops_only_the_recorded_session(tmp_path):
    """What a killed study's driver recorded (a Ray process, and the child it started since, as the raylet
    starts workers) is stopped before a new start. Decoys survive: a `tail -f` of a log in the temp dir, a
    process naming the temp dir that was not recorded, a `tail -f` under a sibling dir sharing its prefix,
    and a recorded pid whose start time is not the recorded one (a reused pid). While the driver that
    recorded the session still runs, nothing is touched and the new study refuses to start beside it."""
    import time

    from lampseg.runtime.processes import start_time
    from lampseg.tune.search import reap_orphans, record_session

    temp, sibling = tmp_path / "ray", tmp_path / "ray2"
    for folder in (temp, sibling):
        folder.mkdir()
        (folder / "session.log").write_text("started\n")
    spawn = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; "
             "time.sleep(120)']); time.sleep(120)")
    session = subprocess.Popen([sys.executable, "-c", spawn, f"--temp-dir={temp}"])
    decoys = [subprocess.Popen(["tail", "-f", str(temp / "session.log")]),
              subprocess.Popen([*SLEEP, f"--temp-dir={temp}"]),
              subprocess.Popen(["tail", "-f", str(sibling / "session.log")]),
              subprocess.Popen([*SLEEP, f"--temp-dir={temp}"])]
    killed_driver = subprocess.Popen(SLEEP)
    try:
        children = []
        for _ in range(100):
            children = psutil.Process(session.pid).children()
            if children:
                break
            time.sleep(0.1)
        assert children, "the session process started no child"
        dead = (killed_driver.pid, start_time(killed_driver.pid))
        killed_driver.kill()
        killed_driver.wait()
        reused = decoys[-1].pid
        record = [(session.pid, start_time(session.pid)), (reused, start_time(reused) + 1)]
        live = decoys[0].pid
        record_session(temp, record, driver=(live, start_time(live)))  # its study still runs
        still_runs = rf"another study still runs in this run directory \(pid {live}\b"
        with pytest.raises(LampsegError, match=still_runs):
            reap_orphans(temp, log=lambda _: None)
        assert session.poll() is None
        logs = []
        record_session(temp, record, driver=dead)
        assert reap_orphans(temp, log=logs.append) == sorted([session.pid, children[0].pid])
        assert session.wait(timeout=10) == -signal.SIGKILL
        gone, _ = psutil.wait_procs(children, timeout=10)
        assert gone or children[0].status() == psutil.STATUS_ZOMBIE
        assert [d.poll() for d in decoys] == [None] * len(decoys)
        assert logs == [f"tune: stopped 2 process(es) an earlier Ray session in {temp} left running"]
    finally:
        for p in (session, *decoys):
            p.kill()
        for child in children:
            if child.is_running():
                child.kill()
        session.wait()
        for d in decoys:
            d.wait()


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="processes are recorded from /proc")
def test_reap_orphans_spares_itself_and_its_ancestors(tmp_path, monkeypatch):
    """A record that names the reaping process and its parent stops neither (the signals are caught here,
    so a mistake cannot stop the test run)."""
    import os

    from lampseg.runtime.processes import start_time
    from lampseg.tune import search

    signalled = []
    monkeypatch.setattr(search, "signal_all", lambda processes, sig: signalled.extend(dict(processes)))
    search.record_session(tmp_path, [(pid, start_time(pid)) for pid in (os.getpid(), os.getppid())])
    assert search.reap_orphans(tmp_path, log=lambda _: None) == [] and signalled == []


def test_ray_temp_dir_is_short_enough_for_ray_sockets(tmp_path):
    """Ray adds ~62 characters below its temp dir (session name, sockets/plasma_store) and AF_UNIX paths end
    at 107 bytes: a run dir whose ``ray`` folder is longer than ``RAY_TEMP_MAX`` gets a short linked dir."""
    from lampseg.tune.search import RAY_TEMP_MAX, ray_temp_dir

    longest_socket = "/session_2026-12-07_03-59-00_899829_26497/sockets/plasma_store"
    deep = tmp_path / ("d" * max(1, 60 - len(str(tmp_path))))  # RUN/ray of ~62 characters: too long
    temp = ray_temp_dir(deep)
    assert len(str(temp)) <= RAY_TEMP_MAX and len(str(temp) + longest_socket) < 107
    assert (deep / "ray").is_symlink() and (deep / "ray").resolve() == temp.resolve()
    assert ray_temp_dir(deep).resolve() == temp.resolve()  # the link is followed next time
    shutil.rmtree(temp)


def test_trial_status_counts_the_trials_own_max_epochs():
    """A study that searches ``trainer.max_epochs`` finishes a 1-epoch trial: completed, not stopped."""
    from types import SimpleNamespace

    from lampseg.tune.results import trial_rows

    cfg = compose("+exp=smoke", "trainer.max_epochs=2",
                  "tune.space=[{key: trainer.max_epochs, grid: [1, 3]}]")
    grid = [SimpleNamespace(metrics_dataframe=None, metrics={"epoch": epochs, "val_dice": 0.5, "trial_id": t},
                            config={"trainer.max_epochs": wanted}, error=None, path=f"/nowhere/trial_{t}")
            for t, epochs, wanted in (("a", 1, 1), ("b", 2, 3))]
    status = {row["trial_id"]: row["status"] for row in trial_rows(grid, cfg)}
    assert status == {"a": "completed", "b": "stopped"}
