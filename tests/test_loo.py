"""Leave-one-modality-out studies: the statistics on hand-made tables, and the whole study on synthetic data
whose modality informativeness is known by construction (t1gd > FLAIR > T2w > T1w)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

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
