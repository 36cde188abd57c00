"""Continual-learning metrics: pure functions over the accuracy matrix R.

Shape and indexing. ``R`` has shape (T+1, T): row 0 is the evaluation before any training (``init``); row i
(1 <= i <= T) is the evaluation after training on task i; column j (0-based) is task j+1. So task i (1-based)
was just learned in row i and sits in column i-1; ``R[i][i-1]`` is the diagonal.

Formulas (T tasks; a_{i,j} = accuracy on task j after training on task i, 1-based, a_{0,j} = init):
- ACC (average accuracy)      = (1/T) sum_j a_{T,j}
- BWT (GEM, Lopez-Paz & Ranzato 2017) = (1/(T-1)) sum_{i<T} (a_{T,i} - a_{i,i})      [``bwt_divisor="T"``: / T]
- FWT (GEM)                   = (1/(T-1)) sum_{i>1} (a_{i-1,i} - a_{0,i})
- Forgetting (Chaudhry 2018)  = (1/(T-1)) sum_{j<T} (max_{1<=l<T} a_{l,j} - a_{T,j})
  [``forgetting_kind="first_last"`` (Avalanche): a_{j,j} - a_{T,j}]
- Learning accuracy           = (1/T) sum_i a_{i,i}
- Retention                   = (1/(T-1)) sum_{i<T} a_{T,i} / a_{i,i}   (tasks with a_{i,i} = 0 are skipped)

Every function returns NaN when the metric is undefined (e.g. BWT with one task); ``undefined_reason`` says why.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Matrix = Sequence[Sequence[float]] | np.ndarray


def as_matrix(R: Matrix) -> np.ndarray:
    """Validate and convert to a float array of shape (T+1, T)."""
    a = np.asarray(R, dtype=float)
    if a.ndim != 2 or a.shape[1] < 1 or a.shape[0] != a.shape[1] + 1:
        raise ValueError(f"R must have shape (T+1, T) with row 0 = init; got {a.shape}")
    return a


def n_tasks(R: Matrix) -> int:
    return as_matrix(R).shape[1]


def average_accuracy(R: Matrix) -> float:
    a = as_matrix(R)
    return float(a[-1].mean())  # mean over the T columns of the last row


def diagonal(R: Matrix) -> np.ndarray:
    """a_{i,i} for i = 1..T: accuracy on each task right after learning it. Shape (T,)."""
    a = as_matrix(R)
    T = a.shape[1]
    return a[np.arange(1, T + 1), np.arange(T)]


def backward_transfer(R: Matrix, divisor: str = "T-1") -> float:
    a = as_matrix(R)
    T = a.shape[1]
    if T < 2:
        return math.nan
    diffs = a[T, : T - 1] - diagonal(a)[: T - 1]  # (T-1,)
    return float(diffs.sum() / (T if divisor == "T" else T - 1))


def forward_transfer(R: Matrix) -> float:
    a = as_matrix(R)
    T = a.shape[1]
    if T < 2:
        return math.nan
    before = a[np.arange(1, T), np.arange(1, T)]  # a_{i-1,i} for i=2..T, (T-1,)
    return float((before - a[0, 1:]).mean())


def forgetting(R: Matrix, kind: str = "max") -> float:
    a = as_matrix(R)
    T = a.shape[1]
    if T < 2:
        return math.nan
    if kind == "first_last":
        return float((diagonal(a)[: T - 1] - a[T, : T - 1]).mean())
    best = a[1:T, : T - 1].max(axis=0)  # max over rows 1..T-1, (T-1,)
    return float((best - a[T, : T - 1]).mean())


def learning_accuracy(R: Matrix) -> float:
    return float(diagonal(R).mean())


def retention_per_task(R: Matrix) -> np.ndarray:
    """a_{T,i} / a_{i,i} for every task (NaN where a_{i,i} = 0). Shape (T,); the last entry is 1 by definition."""
    a = as_matrix(R)
    d = diagonal(a)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d > 0, a[-1] / np.where(d > 0, d, 1.0), np.nan)


def retention(R: Matrix) -> float:
    a = as_matrix(R)
    T = a.shape[1]
    if T < 2:
        return math.nan
    r = retention_per_task(a)[: T - 1]
    r = r[~np.isnan(r)]
    return float(r.mean()) if r.size else math.nan


def undefined_reason(name: str, R: Matrix) -> str | None:
    a = as_matrix(R)
    T = a.shape[1]
    if name in ("bwt", "fwt", "forgetting", "retention") and T < 2:
        return f"{name} needs at least 2 tasks (the sequence has {T})"
    if name == "retention" and T >= 2 and not (diagonal(a)[: T - 1] > 0).any():
        return "retention is undefined: every learned task has 0 accuracy right after learning it"
    return None


def summarize(R: Matrix, bwt_divisor: str = "T-1", forgetting_kind: str = "max") -> dict:
    """All metrics under the keys of ``summary.json``, plus reasons for the undefined ones."""
    out = {
        "acc": average_accuracy(R),
        "bwt": backward_transfer(R, bwt_divisor),
        "fwt": forward_transfer(R),
        "forgetting": forgetting(R, forgetting_kind),
        "learning_acc": learning_accuracy(R),
        "retention": retention(R),
        "retention_per_task": [None if math.isnan(x) else float(x) for x in retention_per_task(R)],
    }
    reasons = {k: r for k in ("bwt", "fwt", "forgetting", "retention") if (r := undefined_reason(k, R))}
    out["undefined"] = reasons
    out["conventions"] = {"bwt_divisor": bwt_divisor, "forgetting": forgetting_kind, "scale": "percent"}
    return out
