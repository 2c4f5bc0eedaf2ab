"""Statistics for a handful of runs per architecture, with scipy; None wherever undefined.

Nothing here returns NaN: a value that the data cannot give (a standard deviation of one run,
a t-test between two constant groups) is None, and the tables print it as ``n/a``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize, stats

CONFIDENCE = 0.95


def confusion_scores(cm: list[list[int]]) -> tuple[float | None, float | None]:
    """(balanced accuracy, macro-F1) of a confusion matrix whose rows are the true class.

    Balanced accuracy is the mean recall over classes present in the truth; macro-F1 the mean
    F1 = 2 TP / (2 TP + FP + FN) over classes present in the truth or the predictions (the
    classes scikit-learn averages over when given the labels themselves).
    """
    m = np.asarray(cm, dtype=np.float64)
    tp, support, predicted = np.diag(m), m.sum(axis=1), m.sum(axis=0)
    present, seen = support > 0, (support + predicted) > 0
    balanced = float(np.mean(tp[present] / support[present])) if present.any() else None
    macro_f1 = float(np.mean(2 * tp[seen] / (support[seen] + predicted[seen]))) if seen.any() else None
    return balanced, macro_f1


@dataclass(frozen=True)
class Summary:
    """n, mean, sample standard deviation, t-interval of the mean, median, min, max."""

    n: int
    mean: float | None = None
    std: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    median: float | None = None
    min: float | None = None
    max: float | None = None


def describe(values: list[float]) -> Summary:
    """Summary of one metric over runs; the interval is mean ± t(0.975, n-1)·s/√n."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n == 0:
        return Summary(0)
    mean, median, lo, hi = float(x.mean()), float(np.median(x)), float(x.min()), float(x.max())
    if n < 2:
        return Summary(n, mean, None, None, None, median, lo, hi)
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half, median, lo, hi)


@dataclass(frozen=True)
class Comparison:
    """A versus B on one metric; ``diff`` is mean(A) - mean(B)."""

    a: str
    b: str
    metric: str
    higher_is_better: bool
    n_a: int
    n_b: int
    mean_a: float | None = None
    mean_b: float | None = None
    diff: float | None = None
    ci_low: float | None = None  # Welch interval of the difference
    ci_high: float | None = None
    df: float | None = None  # Welch–Satterthwaite degrees of freedom
    t: float | None = None
    p_welch: float | None = None
    u: float | None = None  # Mann–Whitney U of A (pairs where A is better; ties count half)
    p_mann_whitney: float | None = None
    prob_a_better: float | None = None  # U / (n_a n_b)
    hedges_g: float | None = None
    notes: list[str] = field(default_factory=list)


def compare(a: str, b: str, xa: list[float], xb: list[float], metric: str, higher_is_better: bool = True) -> Comparison:
    """Welch interval and test, exact Mann–Whitney, P(A better than B) and Hedges' g."""
    xa, xb = np.asarray(xa, dtype=np.float64), np.asarray(xb, dtype=np.float64)
    na, nb = len(xa), len(xb)
    out: dict = {"n_a": na, "n_b": nb}
    notes: list[str] = []
    if na == 0 or nb == 0:
        notes.append(f"no comparison: {a} has {na} and {b} has {nb} completed run(s)")
        return Comparison(a, b, metric, higher_is_better, notes=notes, **out)
    out.update(mean_a=float(xa.mean()), mean_b=float(xb.mean()))
    out["diff"] = out["mean_a"] - out["mean_b"]
    # U counts the pairs in which A is better: on a lower-is-better metric, compare negatives.
    sign = 1.0 if higher_is_better else -1.0
    mw = stats.mannwhitneyu(sign * xa, sign * xb, alternative="two-sided", method="exact")
    out.update(u=float(mw.statistic), p_mann_whitney=float(mw.pvalue), prob_a_better=float(mw.statistic) / (na * nb))
    if len(np.intersect1d(xa, xb)):
        notes.append("some runs of the two architectures tie; the exact Mann–Whitney p-value assumes no ties")
    if na < 2 or nb < 2:
        notes.append(f"no interval, t-test or effect size: they need at least 2 completed runs per architecture "
                     f"({a}: {na}, {b}: {nb})")
        return Comparison(a, b, metric, higher_is_better, notes=notes, **out)
    va, vb = float(xa.var(ddof=1)), float(xb.var(ddof=1))
    if va == 0 and vb == 0:
        notes.append(f"every run of {a} has the same {metric}, and so does every run of {b}: "
                     "with zero variance there is no interval, t-test or effect size")
        return Comparison(a, b, metric, higher_is_better, notes=notes, **out)
    welch = stats.ttest_ind(xa, xb, equal_var=False)
    ci = welch.confidence_interval(CONFIDENCE)
    out.update(t=float(welch.statistic), p_welch=float(welch.pvalue), df=float(welch.df),
               ci_low=float(ci.low), ci_high=float(ci.high))
    df_pooled = na + nb - 2
    s_pooled = math.sqrt(((na - 1) * va + (nb - 1) * vb) / df_pooled)
    # Hedges' exact small-sample correction J(df) = Γ(df/2) / (√(df/2) Γ((df-1)/2)),
    # of which 1 - 3/(4 df - 1) is the usual approximation.
    j = math.exp(math.lgamma(df_pooled / 2) - math.lgamma((df_pooled - 1) / 2)) / math.sqrt(df_pooled / 2)
    out["hedges_g"] = j * out["diff"] / s_pooled
    return Comparison(a, b, metric, higher_is_better, notes=notes, **out)


def min_mann_whitney_p(na: int, nb: int) -> float:
    """The smallest two-sided p-value an exact Mann–Whitney test can give: 2 / C(na+nb, na)."""
    return min(1.0, 2 / math.comb(na + nb, na)) if na and nb else 1.0


def min_wilcoxon_p(pairs: int) -> float:
    """The smallest two-sided p-value an exact Wilcoxon signed-rank test can give: 2 / 2^n."""
    return min(1.0, 2 / 2**pairs)


def detectable_effect(na: int, nb: int, power: float = 0.8, alpha: float = 0.05) -> float | None:
    """The standardized difference a two-sided two-sample t-test detects with this power."""
    if na < 2 or nb < 2:
        return None
    df = na + nb - 2
    crit = stats.t.ppf(1 - alpha / 2, df)

    def shortfall(nc: float) -> float:
        lower = stats.nct.cdf(-crit, df, nc)  # negligible, and NaN far in the tail
        return stats.nct.sf(crit, df, nc) + (lower if math.isfinite(lower) else 0.0) - power

    high = 1.0
    while shortfall(high) < 0 and high < 1e3:
        high *= 2
    # The noncentrality of a two-sample t-test is d·√(na·nb/(na+nb)).
    return float(optimize.brentq(shortfall, 1e-9, high)) / math.sqrt(na * nb / (na + nb))
