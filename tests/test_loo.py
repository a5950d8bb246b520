"""Leave-one-modality-out studies: the statistics on hand-made tables, and the whole study on synthetic data
whose modality informativeness is known by construction (t1gd > FLAIR > T2w > T1w)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import compose
from scipy import stats

from lampseg.config import ConfigError
from lampseg.data.synth import generate_known_importance
from lampseg.tune.stats import mean_ci, paired_test, summarise

CASES = [f"case_{k}" for k in range(8)]


def _table() -> dict[str, dict[str, float]]:
    rng = np.random.default_rng(0)
    base = rng.uniform(0.7, 0.9, len(CASES))
    drops = {"none": 0.0, "A": 0.30, "B": 0.10, "C": 0.01}
    return {name: {c: float(b - d + rng.normal(0, 0.02)) for c, b in zip(CASES, base)}
            for name, d in drops.items()}


def test_mean_ci_and_paired_tests_match_scipy():
    values = np.array([0.81, 0.77, 0.9, 0.68, 0.85, 0.79])
    mean, low, high = mean_ci(values, 0.95)
    expected = stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
    assert mean == pytest.approx(values.mean()) and (low, high) == pytest.approx(expected)
    assert mean_ci(np.array([0.5]))[1:] == (0.5, 0.5)
    other = values - np.array([0.05, 0.02, 0.07, 0.01, 0.04, 0.03])
    assert paired_test(other, values, "wilcoxon") == pytest.approx(stats.wilcoxon(other, values).pvalue)
    assert paired_test(other, values, "ttest") == pytest.approx(stats.ttest_rel(other, values).pvalue)
    assert paired_test(values, values) == 1.0 and math.isnan(paired_test(values[:1], values[:1]))


def test_summary_ranks_by_paired_drop_and_checks_cases():
    table = _table()
    rows = summarise(table, "none", 0.9, "ttest")
    assert [r.left_out for r in rows] == ["none", "A", "B", "C"] and [r.rank for r in rows] == [None, 1, 2, 3]
    base = np.array([table["none"][c] for c in CASES])
    for row in rows[1:]:
        values = np.array([table[row.left_out][c] for c in CASES])
        diff = values - base
        assert row.mean_dice == pytest.approx(values.mean()) and row.change == pytest.approx(diff.mean())
        assert (row.change_ci_low, row.change_ci_high) == pytest.approx(
            stats.t.interval(0.9, len(diff) - 1, loc=diff.mean(), scale=stats.sem(diff)))
        assert row.p_value == pytest.approx(stats.ttest_rel(values, base).pvalue)
    assert rows[1].p_value < 0.01  # a 0.3 drop on 8 paired cases is unmistakable
    del table["B"]["case_3"]
    with pytest.raises(ValueError, match="case_3"):
        summarise(table)


# The default suite's leave-one-out study end to end is tests/test_tune.py's
# test_tiny_loo_study_writes_its_tables_from_every_held_out_case (in its shared Ray session).
@pytest.mark.extended
def test_loo_ranks_modalities_in_their_known_order_and_resumes(tmp_path):
    """``lampseg loo`` on the known dataset: 4 conditions x 2 folds as one Tune study; every case is held
    out once per condition; the importance ranking is A > B > C; rerunning with tune.resume=true retrains
    nothing and gives the same answer."""
    import csv
    import json

    from conftest import lampseg

    root = generate_known_importance(tmp_path / "known")
    run_dir = tmp_path / "study"
    args = ["loo", "+exp=smoke", "data=msd", f"data.root={root}", "data.patch_size=[24,24,24]",
            "data.num_workers=0", "trainer.hd95=false", "trainer.max_epochs=4", "data.samples_per_epoch=16",
            "trainer.val_every=4", "loo.folds=2", f"run_dir={run_dir}"]
    proc = lampseg(*args, timeout=400)
    out = run_dir / "loo"
    with open(out / "summary.csv", newline="") as f:
        summary = list(csv.DictReader(f))
    assert [r["left_out"] for r in summary] == ["none", "A", "B", "C"]
    assert [r["rank"] for r in summary] == ["", "1", "2", "3"]
    assert "A > B > C" in (out / "summary.md").read_text() and "A > B > C" in proc.stdout
    with open(out / "results.csv", newline="") as f:
        results = list(csv.DictReader(f))
    assert len(results) == 4 * 8 and {r["fold"] for r in results} == {"0", "1"}
    for condition in ("none", "A", "B", "C"):
        rows = [r for r in results if r["left_out"] == condition]
        assert sorted(r["case"] for r in rows) == [f"case_{k:02d}" for k in range(8)]  # each held out once
        mean = np.mean([float(r["dice"]) for r in rows])
        row = next(s for s in summary if s["left_out"] == condition)
        assert float(row["mean_dice"]) == pytest.approx(mean)
        assert all(float(r["dice"]) == pytest.approx((float(r["dice_alpha"]) + float(r["dice_beta"])) / 2)
                   for r in rows)
    for name in ("importance.png", "per_case.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    trained = {p: p.stat().st_mtime_ns for p in (run_dir / "tune").glob("trial_*/summary.json")}
    assert len(trained) == 8 and all(json.loads(p.read_text())["status"] == "completed" for p in trained)
    again = lampseg(*args, "tune.resume=true", timeout=400)
    assert "A > B > C" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in trained} == trained


@pytest.mark.extended
def test_loo_console_names_every_condition_in_few_lines(tmp_path):
    """``lampseg loo`` on a 4-modality dataset that is not BraTS (T2star, PD; label names with spaces):
    5 conditions x 2 folds = 10 trials in under 100 console lines, each trial named by its condition, a
    study line after each, and no logger complaining about the metric names."""
    import json

    from conftest import lampseg

    from lampseg.data.synth import generate_dataset

    root = generate_dataset(tmp_path / "data", cases=6, shape=(24, 24, 24))
    meta = json.loads((root / "dataset.json").read_text())
    meta["modality"] = {"0": "FLAIR", "1": "T1w", "2": "T2star", "3": "PD"}
    meta["labels"] = {"0": "background", "1": "outer lesion zone", "2": "inner core", "3": "active rim"}
    (root / "dataset.json").write_text(json.dumps(meta))
    run_dir = tmp_path / "study"
    proc = lampseg("loo", "+exp=smoke", "data=msd", f"data.root={root}", "data.patch_size=[16,16,16]",
                   "trainer.hd95=false", "trainer.max_epochs=2", "loo.folds=2", f"run_dir={run_dir}",
                   timeout=400)
    lines = (proc.stdout + proc.stderr).splitlines()
    assert len(lines) < 100, "\n".join(lines)
    text = "\n".join(lines)
    for noise in ("illegal", "Summary name", "Checkpoint successfully created", "Token authentication",
                  "bottleneck", "Trial status", "╭"):  # tensorboardX, Ray's logs and its tables
        assert noise not in text, text
    for fold in (0, 1):
        for condition in ("all modalities", *(f"without {m}" for m in ("FLAIR", "T1w", "T2star", "PD"))):
            name = f"{condition}, fold {fold}"
            assert sum(line.endswith(f"started   {name}") for line in lines) == 1, text
            assert sum("epoch 2/2 val Dice" in line and line.endswith(name) for line in lines) == 1, text
            assert sum(f"finished  {name}: best val Dice" in line and "held-out Dice" in line
                       for line in lines) == 1, text
    studies = [line for line in lines if line.startswith("study: ")]
    assert len(studies) == 10 and studies[-1].startswith("study: 10/10 finished, 0 running, 0 pending")
    assert all("best val Dice" in line for line in studies)
    trial = next((run_dir / "tune").glob("trial_*"))
    header = (trial / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "val_dice_outer_lesion_zone" in header and "epoch 2/2" in (trial / "log.txt").read_text()
    assert (run_dir / "loo" / "summary.md").is_file()


@pytest.mark.parametrize("overrides, message", [
    (["loo.folds=1"], "loo.folds"),
    (["loo.folds=many"], "loo.folds"),
    (["loo.test=anova"], "loo.test"),
    (["loo.modalities=[PET]"], "loo.modalities"),
    (["data.modalities=[FLAIR]"], "2 or more modalities"),
    (["loo.folds=50"], "need at least 50 cases"),
])
def test_bad_loo_configs_fail_before_training(tmp_path, overrides, message):
    from omegaconf import OmegaConf

    from lampseg.tune.loo import run_loo

    cfg = compose("+exp=smoke", *overrides)
    OmegaConf.update(cfg, "run_dir", str(tmp_path), merge=False)
    with pytest.raises(ConfigError, match=message):
        run_loo(cfg, log=lambda _: None)
    assert not (tmp_path / "tune").exists()
