"""Statistics of a leave-one-out study: per condition the mean Dice over held-out cases with its confidence
interval, and per left-out modality the paired change against the baseline (the same cases, every case held
out exactly once per condition), its confidence interval, a paired test and the importance ranking.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats


@dataclass
class ConditionSummary:
    """One row of ``loo/summary.csv``."""

    left_out: str  # "none" for the baseline
    cases: int
    mean_dice: float
    ci_low: float
    ci_high: float
    change: float  # mean of (this - baseline) over paired cases; 0 for the baseline
    change_ci_low: float
    change_ci_high: float
    p_value: float  # paired test against the baseline (nan for the baseline)
    test: str
    rank: int | None  # 1 = most important modality (largest Dice drop when left out)

    def to_dict(self) -> dict:
        return asdict(self)


def mean_ci(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t confidence interval of the mean (collapsed to the mean for a single value)."""
    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, mean, mean
    spread = values.std(ddof=1) / math.sqrt(len(values))
    half = float(stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * spread)
    return mean, mean - half, mean + half


def paired_test(a: np.ndarray, b: np.ndarray, test: str = "wilcoxon") -> float:
    """Two-sided p-value of a paired test of ``a`` against ``b`` (``wilcoxon`` signed-rank or ``ttest``);
    1.0 when the pairs do not differ at all, nan with fewer than two pairs."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2:
        return math.nan
    if np.allclose(a, b, rtol=0, atol=1e-12):
        return 1.0
    if test == "ttest":
        return float(stats.ttest_rel(a, b).pvalue)
    return float(stats.wilcoxon(a, b).pvalue)


def summarise(dice: dict[str, dict[str, float]], baseline: str = "none", confidence: float = 0.95,
              test: str = "wilcoxon") -> list[ConditionSummary]:
    """Summaries per condition, baseline first, then the left-out modalities by importance.

    Args:
        dice: condition -> case -> Dice (mean over regions/labels) of that case when it was held out.
        baseline: the condition with every modality.
        confidence: level of the confidence intervals.
        test: the paired test against the baseline: ``wilcoxon`` or ``ttest``.

    Returns:
        One summary per condition; ``rank`` 1 is the modality whose removal costs the most Dice.

    Raises:
        ValueError: when the baseline is missing or a condition lacks cases the baseline has.
    """
    if baseline not in dice:
        raise ValueError(f"the baseline condition {baseline!r} has no results")
    cases = sorted(dice[baseline])
    base = np.array([dice[baseline][c] for c in cases])
    rows = []
    for condition, scores in dice.items():
        missing = [c for c in cases if c not in scores]
        if missing:
            raise ValueError(f"condition {condition!r} has no result for case(s) {missing}")
        values = np.array([scores[c] for c in cases])
        mean, low, high = mean_ci(values, confidence)
        change, c_low, c_high = mean_ci(values - base, confidence)
        is_base = condition == baseline
        rows.append(ConditionSummary(condition, len(cases), mean, low, high, 0.0 if is_base else change,
                                     0.0 if is_base else c_low, 0.0 if is_base else c_high,
                                     math.nan if is_base else paired_test(values, base, test), test, None))
    ranked = sorted((r for r in rows if r.left_out != baseline), key=lambda r: r.change)
    for rank, row in enumerate(ranked, 1):
        row.rank = rank
    return [r for r in rows if r.left_out == baseline] + ranked
