"""Bootstrap confidence intervals: over evaluation samples within a run, and over runs (seeds x orders).

Within a run the bootstrap is *paired*: one resampling of a task's test examples is applied to every row of
that task's column, because all rows evaluate the same examples (so a_{T,j} - a_{j,j} keeps its correlation).
Across runs it is hierarchical (two-stage): draw runs with replacement, then take each drawn run's own
within-run replicate, and average. With one run this is the within-run bootstrap; with many runs and
infinitely many samples it is the plain bootstrap over runs. Intervals are percentile intervals.
numpy is used directly: scipy.stats.bootstrap resamples one statistic of independent samples and knows neither
the pairing across rows nor the two stages.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np

from harness import metrics

B_DEFAULT = 1000
LEVEL = 0.95


def resampled_matrices(scores: Sequence[np.ndarray], B: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap replicates of R from per-sample scores. ``scores[j]`` is (T+1, n_j) in [0, 1] for column j.

    Returns (B, T+1, T) in percent; the same resampled examples are used for every row of a column.
    """
    T = len(scores)
    out = np.empty((B, T + 1, T))
    for j, s in enumerate(scores):
        n = s.shape[1]
        idx = rng.integers(0, n, size=(B, n))  # (B, n)
        out[:, :, j] = 100.0 * s[:, idx].mean(axis=2).T  # s[:, idx]: (T+1, B, n) -> (B, T+1)
    return out


def percentile_ci(replicates: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of a (B,) array, ignoring NaN replicates; (nan, nan) if all are NaN."""
    r = np.asarray(replicates, dtype=float)
    r = r[~np.isnan(r)]
    if r.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(r, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def hierarchical(replicates: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Two-stage bootstrap of the mean over runs.

    ``replicates`` (K, B): each run's within-run replicates (constant rows for a run without per-sample scores).
    Returns (B,) replicates of the mean over runs: replicate b draws K runs with replacement and averages their
    b-th within-run replicates. NaN entries (a quantity undefined in that replicate) are skipped.
    """
    K, B = replicates.shape
    pick = rng.integers(0, K, size=(B, K))  # (B, K): runs drawn with replacement for each replicate
    vals = replicates[pick, np.arange(B)[:, None]]  # (B, K): each drawn run's b-th within-run replicate
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN replicate -> NaN, dropped by percentile_ci
        return np.nanmean(vals, axis=1)  # (B,)


# Scalar metrics over a whole matrix, under a convention; keys are the tidy table's metric names.
def scalar_metrics(conv: metrics.Conventions) -> dict[str, Callable[[np.ndarray], float]]:
    return {
        "acc": lambda R: metrics.average_accuracy(R, conv.acc),
        "bwt": lambda R: metrics.backward_transfer(R, conv.bwt_divisor),
        "fwt": metrics.forward_transfer,
        "forgetting": lambda R: metrics.forgetting(R, conv.forgetting),
        "learning_acc": metrics.learning_accuracy,
        "retention": lambda R: 100.0 * metrics.retention(R),  # shown in percent like the rest
    }


PER_TASK = ("init", "learned", "final", "bwt", "fwt", "forgetting", "retention")


def run_quantities(R: np.ndarray, tasks: Sequence[str], conv: metrics.Conventions) -> dict[tuple[str, str], float]:
    """Every reported quantity of one matrix: (metric, task) -> value, task ``all`` for the averaged metrics."""
    out = {(name, "all"): f(R) for name, f in scalar_metrics(conv).items()}
    pt = metrics.per_task(R, conv.forgetting)
    for name in PER_TASK:
        vals = pt[name] * (100.0 if name == "retention" else 1.0)
        for task, v in zip(tasks, vals, strict=True):
            out[(name, task)] = float(v)
    return out


def run_replicates(
    R: np.ndarray, scores: Sequence[np.ndarray] | None, tasks: Sequence[str], conv: metrics.Conventions,
    B: int, rng: np.random.Generator,
) -> dict[tuple[str, str], np.ndarray]:
    """(metric, task) -> (B,) within-run bootstrap replicates; constant at the point value without samples."""
    point = run_quantities(R, tasks, conv)
    if scores is None:
        return {k: np.full(B, v) for k, v in point.items()}
    mats = resampled_matrices(scores, B, rng)  # (B, T+1, T)
    reps = {k: np.empty(B) for k in point}
    for b in range(B):
        for k, v in run_quantities(mats[b], tasks, conv).items():
            reps[k][b] = v
    return reps
