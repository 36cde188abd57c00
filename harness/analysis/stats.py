"""Bootstrap confidence intervals over runs (task orders x seeds) and over test samples within each run.

The scheme is the hierarchical (two-stage) bootstrap with the between-run spread adjusted so that test-sample
noise is counted once (Davison & Hinkley 1997, section 3.8, "adjusted" resampling of hierarchical data):

1. Runs are resampled with replacement *within each task order* (orders are a design choice, e.g. rows of a
   Latin square, not a random draw, so they are strata): a stratum of k runs contributes k draws.
2. Every draw gets its own fresh resample of the drawn run's test samples (never one reused for a run drawn
   twice). The resample is *paired*: one resampling of a task's test examples is applied to every row of that
   task's column, because all rows evaluate the same examples (so a_{T,j} - a_{j,j} keeps its correlation).
3. The metric is computed on each resampled matrix and averaged over the draws.

Why the adjustment: a run's observed metric m_r already contains its test-sample noise (variance tau^2), so the
spread of the m_r around their stratum mean estimates sigma_b^2 + tau^2 (sigma_b^2: the seed-to-seed variance).
Drawing m_r and then adding a fresh within-run resample adds tau^2 a second time: the plain two-stage bootstrap is
about sqrt(2) too wide when seeds matter little, more when a run drawn twice reuses one inner replicate (the old
scheme here: about 1.6x, coverage about 100%). So each draw contributes
``mean_o + lam_o * (m_r - mean_o) + (w - m_r)`` where ``w`` is the draw's within-run replicate and
``lam_o^2 = max(0, s^2 - tau^2) / s^2 * k_o / (k_o - 1)`` (``s^2``: the pooled within-order variance of the m_r,
``tau^2``: the mean within-run bootstrap variance, ``k_o / (k_o - 1)`` undoes the bootstrap's shrinkage of a
k-sample variance). The replicate variance is then max(s^2, tau^2) / K, an unbiased variance of the mean of K runs
whenever the seeds vary more than test-sample noise explains. With one run per order there is no seed spread to
estimate and the interval covers the test-sample noise only; with one run it is the plain within-run bootstrap.

Intervals are percentile intervals (of the mid-distribution, see ``percentile_ci``). Paired differences between two methods use the same machinery on per-run
differences, with the same resampled test samples for both methods. numpy is used directly: scipy.stats.bootstrap
resamples one statistic of independent samples and knows neither the pairing across rows nor the two stages.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

from harness import metrics

B_DEFAULT = 1000
LEVEL = 0.95


def check_resamples(B: int) -> None:
    if B < 1:
        raise ValueError(f"bad number of bootstrap resamples {B}: use --resamples 1 or more (default {B_DEFAULT})")


def resample_indices(n: int, m: int, rng: np.random.Generator) -> np.ndarray:
    """(m, n) indices of the test samples drawn, with replacement, in each of m resamples of size n."""
    return rng.integers(0, n, size=(m, n), dtype=np.intp)


_CHUNK = 1 << 22  # gathered scores per step: bounds the memory at ~32 MB for large test sets


def resampled_matrices(
    R: np.ndarray, scores: Sequence[np.ndarray | None], idx: Sequence[np.ndarray | None], m: int | None = None
) -> np.ndarray:
    """Resampled accuracy matrices (m, T+1, T) in percent. ``R`` (T+1, T); ``scores[j]`` (T+1, n_j) per-sample
    scores in [0, 1] of column j (None: no samples, the column stays at R[:, j]); ``idx[j]`` (m, n_j) from
    ``resample_indices``. The same drawn samples are used for every row of a column (the pairing across rows).
    ``m`` is needed only when no column has samples (m copies of R)."""
    m = next((ix.shape[0] for ix in idx if ix is not None), 1 if m is None else m)
    out = np.repeat(np.asarray(R, dtype=float)[None], m, axis=0)  # (m, T+1, T)
    for j, (s, ix) in enumerate(zip(scores, idx, strict=True)):
        if s is None or ix is None:
            continue
        step = max(1, _CHUNK // s.shape[1])
        for a in range(0, m, step):
            for i, row in enumerate(s):  # one row at a time: np.take on a 1-D row is ~10x faster than s[:, ix]
                out[a:a + step, i, j] = 100.0 * np.take(row, ix[a:a + step]).mean(axis=1)  # (c, n) -> (c,)
    return out


def percentile_ci(replicates: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of a (B,) array, ignoring NaN replicates; (nan, nan) if all are NaN.

    Quantiles of the mid-distribution (Parzen 2004: each distinct value at the middle of its CDF step, linear in
    between) rather than of the raw replicates: one cell of n samples has replicates on a lattice of step 100/n, and
    plain percentiles land on lattice points, widening the interval by up to a step (12% over Wilson's at n = 32).
    For replicates without ties this is the usual percentile (the "hazen" plotting position)."""
    r = np.asarray(replicates, dtype=float)
    r = r[~np.isnan(r)]
    if r.size == 0:
        return float("nan"), float("nan")
    v, c = np.unique(r, return_counts=True)  # sorted distinct values and their counts
    mid = (np.cumsum(c) - c / 2) / r.size  # (len(v),) mid-CDF at each value
    lo, hi = np.interp([(1 - level) / 2, (1 + level) / 2], mid, v)
    return float(lo), float(hi)


def hierarchical(
    points: np.ndarray, pools: np.ndarray, strata: Sequence, rng: np.random.Generator
) -> np.ndarray:
    """Bootstrap replicates (B,) of the mean over runs (scheme in the module docstring).

    ``points`` (K,): each run's metric (NaN where undefined: that run is left out). ``pools`` (K, B, S): fresh
    within-run replicates of each run, S >= the largest stratum; replicate b's draw in slot q of its stratum uses
    ``pools[run, b, q]``, so no inner replicate is used twice. A run without per-sample scores has a constant
    pool. ``strata`` (K,): each run's task order. NaN replicates (the metric undefined in a resample) are skipped.
    """
    p = np.asarray(points, dtype=float)
    K, B, S = pools.shape
    ok = ~np.isnan(p)
    if not ok.any():
        return np.full(B, np.nan)
    m, W = p[ok], pools[ok]  # (K',), (K', B, S)
    labels = np.asarray(list(strata), dtype=object)[ok]
    groups = [np.flatnonzero(labels == g) for g in dict.fromkeys(labels)]
    if max(len(g) for g in groups) > S:
        raise ValueError(f"pools hold {S} slots per replicate but a stratum has {max(map(len, groups))} runs")
    df = sum(len(g) - 1 for g in groups)
    s2 = sum(float(((m[g] - m[g].mean()) ** 2).sum()) for g in groups) / df if df else 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pools (never defined in a resample)
        tau2 = float(np.nanmean(np.nanvar(W.reshape(len(m), -1), axis=1)))
    seed_var = max(0.0, s2 - (0.0 if math.isnan(tau2) else tau2))  # sigma_b^2 estimate
    total, count = np.zeros(B), np.zeros(B)
    for g in groups:
        k, mean_o = len(g), float(m[g].mean())
        lam = math.sqrt(seed_var / s2 * k / (k - 1)) if k > 1 and s2 > 0 else 0.0
        run = g[rng.integers(0, k, size=(B, k))]  # (B, k): the runs drawn for each slot
        w = W[run, np.arange(B)[:, None], np.arange(k)[None, :]]  # (B, k): each draw's own within replicate
        v = mean_o + lam * (m[run] - mean_o) + (w - m[run])  # (B, k)
        total += np.nansum(v, axis=1)
        count += (~np.isnan(v)).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)  # (B,)


# Scalar metrics over a whole matrix (or a batch of them), under a convention; keys are the tidy table's names.
def scalar_metrics(conv: metrics.Conventions) -> dict:
    return {
        "acc": lambda R: metrics.average_accuracy(R, conv.acc),
        "bwt": lambda R: metrics.backward_transfer(R, conv.bwt_divisor),
        "fwt": lambda R: metrics.forward_transfer(R, conv.fwt_divisor),
        "forgetting": lambda R: metrics.forgetting(R, conv.forgetting),
        "learning_acc": metrics.learning_accuracy,
        "retention": lambda R: 100.0 * metrics.retention(R),  # shown in percent like the rest
    }


PER_TASK = ("init", "learned", "final", "bwt", "fwt", "forgetting", "retention")


def quantities(
    R: np.ndarray, tasks: Sequence[str], conv: metrics.Conventions
) -> dict[tuple[str, str], np.ndarray]:
    """Every reported quantity of a batch of matrices (m, T+1, T): (metric, task) -> (m,); task ``all`` for the
    averaged metrics."""
    out = {(name, "all"): np.asarray(f(R), dtype=float) for name, f in scalar_metrics(conv).items()}
    pt = metrics.per_task(R, conv.forgetting)
    for name in PER_TASK:
        vals = pt[name] * (100.0 if name == "retention" else 1.0)  # (m, T)
        for j, task in enumerate(tasks):
            out[(name, task)] = vals[..., j]
    return out


PROBE_METRICS = ("probe_drop", "probe_retention")


def probe_quantities(P: np.ndarray | None, probes: Sequence[str]) -> dict[tuple[str, str], np.ndarray]:
    """The probe metrics of a batch of probe matrices (m, T+1, n_probes): (metric, probe) -> (m,), probe ``all``
    for the mean over probes; retention in percent like the rest. {} without probes."""
    if P is None or not len(probes):
        return {}
    out = {("probe_drop", "all"): np.asarray(metrics.probe_drop(P), dtype=float),
           ("probe_retention", "all"): 100.0 * np.asarray(metrics.probe_retention(P), dtype=float)}
    drop, ret = metrics.probe_drop_per_probe(P), 100.0 * metrics.probe_retention_per_probe(P)  # (m, n_probes)
    for k, name in enumerate(probes):
        out[("probe_drop", name)], out[("probe_retention", name)] = drop[..., k], ret[..., k]
    return out


def run_probe_quantities(P: np.ndarray | None, probes: Sequence[str]) -> dict[tuple[str, str], float]:
    """``probe_quantities`` of one probe matrix (T+1, n_probes), as floats."""
    if P is None or not len(probes):
        return {}
    return {k: float(v[0]) for k, v in probe_quantities(np.asarray(P, dtype=float)[None], probes).items()}


def run_quantities(R: np.ndarray, tasks: Sequence[str], conv: metrics.Conventions) -> dict[tuple[str, str], float]:
    """``quantities`` of one matrix (T+1, T), as floats."""
    return {k: float(v[0]) for k, v in quantities(np.asarray(R, dtype=float)[None], tasks, conv).items()}
