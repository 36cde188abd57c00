"""Continual-learning metrics: pure functions over the accuracy matrix R.

Shape and indexing. ``R`` has shape (T+1, T): row 0 is the evaluation before any training (``init``); row i
(1 <= i <= T) is the evaluation after training on task i; column j (0-based) is task j+1. So task i (1-based)
was just learned in row i and sits in column i-1; ``R[i][i-1]`` is the diagonal.

Formulas (T tasks; a_{i,j} = accuracy on task j after training on task i, 1-based, a_{0,j} = init):
- ACC (average accuracy)      = (1/T) sum_j a_{T,j}
- BWT (GEM, Lopez-Paz & Ranzato 2017) = (1/(T-1)) sum_{i<T} (a_{T,i} - a_{i,i})      [``bwt_divisor="T"``: / T]
- FWT (GEM)                   = (1/(T-1)) sum_{i>1} (a_{i-1,i} - a_{0,i})      [``fwt_divisor="T"``: / T]
- Forgetting (Chaudhry 2018)  = (1/(T-1)) sum_{j<T} (max_{j<=l<T} a_{l,j} - a_{T,j})
  (only rows from the one that learned task j on: before it the task was not learned, nothing can be forgotten)
  [``forgetting_kind="first_last"`` (Avalanche): a_{j,j} - a_{T,j}]
- Learning accuracy           = (1/T) sum_i a_{i,i}
- Retention                   = (1/(T-1)) sum_{i<T} a_{T,i} / a_{i,i}   (tasks with a_{i,i} = 0 are skipped)

Every function returns NaN when the metric is undefined (e.g. BWT with one task); ``undefined_reason`` says why.

Conventions (``Conventions`` / ``PRESETS``; the default is the GEM paper's, which the MemGen paper's figures use):
- ``bwt_divisor``: "T-1" (GEM paper) or "T" (GEM's public code; also TRACE's "average over the t tasks seen so
  far" at t = T, whose last term a_{T,T} - a_{T,T} is 0).
- ``fwt_divisor``: "T-1" (GEM paper) or "T" (GEM's public code, whose ``fwt.mean()`` includes a first entry 0).
- ``forgetting``: "max" (Chaudhry et al. 2018, max-minus-last) or "first_last" (Avalanche, first-minus-last).
- ``acc``: "final" (GEM ACC = TRACE OP_T) or "incremental" (mean over stages t of OP_t, the average over the
  tasks seen so far: Rebuffi et al.'s average incremental accuracy).
``seen_so_far`` gives TRACE's per-stage curves OP_t = (1/t) sum_{i<=t} a_{t,i} and
BWT_t = (1/t) sum_{i<=t} (a_{t,i} - a_{i,i}).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Matrix = Sequence[Sequence[float]] | np.ndarray


def as_matrix(R: Matrix) -> np.ndarray:
    """Validate and convert to a float array of shape (T+1, T)."""
    a = np.asarray(R, dtype=float)
    if a.ndim != 2 or a.shape[1] < 1 or a.shape[0] != a.shape[1] + 1:
        raise ValueError(f"R must have shape (T+1, T) with row 0 = init; got {a.shape}")
    return a


def as_matrices(R: Matrix) -> np.ndarray:
    """Validate a matrix (T+1, T) or a batch of them (..., T+1, T), e.g. bootstrap replicates."""
    a = np.asarray(R, dtype=float)
    if a.ndim < 2 or a.shape[-1] < 1 or a.shape[-2] != a.shape[-1] + 1:
        raise ValueError(f"R must have shape (T+1, T) with row 0 = init; got {a.shape}")
    return a


def _out(x: np.ndarray | float) -> float | np.ndarray:
    """A float for one matrix, an array of the batch shape for a batch."""
    return float(x) if np.ndim(x) == 0 else np.asarray(x)


def _nan(a: np.ndarray) -> float | np.ndarray:
    return math.nan if a.ndim == 2 else np.full(a.shape[:-2], np.nan)


def n_tasks(R: Matrix) -> int:
    return as_matrices(R).shape[-1]


BWT_DIVISORS = ("T-1", "T")
FWT_DIVISORS = ("T-1", "T")
FORGETTING_KINDS = ("max", "first_last")
ACC_KINDS = ("final", "incremental")


def _check(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; use one of {', '.join(valid)}")


# Every metric below takes one matrix (T+1, T) and returns a float, or a batch (..., T+1, T) and returns an array
# of the batch shape: the bootstrap evaluates thousands of resampled matrices at once.


def average_accuracy(R: Matrix, kind: str = "final") -> float | np.ndarray:
    _check("acc convention", kind, ACC_KINDS)
    a = as_matrices(R)
    if kind == "incremental":
        return _out(seen_so_far(a)["op"].mean(axis=-1))
    return _out(a[..., -1, :].mean(axis=-1))  # mean over the T columns of the last row


def seen_so_far(R: Matrix) -> dict[str, np.ndarray]:
    """TRACE-style curves over stages t = 1..T: ``op`` (..., T) = mean of a_{t,1..t}; ``bwt`` (..., T) =
    (1/t) sum_{i<=t} (a_{t,i} - a_{i,i}) (0 at t = 1, where only the just-learned task is seen)."""
    a = as_matrices(R)
    T = a.shape[-1]
    d = diagonal(a)  # (..., T)
    op = np.stack([a[..., t, :t].mean(axis=-1) for t in range(1, T + 1)], axis=-1)  # (..., T)
    bwt = np.stack([(a[..., t, :t] - d[..., :t]).mean(axis=-1) for t in range(1, T + 1)], axis=-1)  # (..., T)
    return {"op": op, "bwt": bwt}


def diagonal(R: Matrix) -> np.ndarray:
    """a_{i,i} for i = 1..T: accuracy on each task right after learning it. Shape (..., T)."""
    a = as_matrices(R)
    T = a.shape[-1]
    return a[..., np.arange(1, T + 1), np.arange(T)]


def backward_transfer(R: Matrix, divisor: str = "T-1") -> float | np.ndarray:
    _check("bwt divisor", divisor, BWT_DIVISORS)
    a = as_matrices(R)
    T = a.shape[-1]
    if T < 2:
        return _nan(a)
    diffs = a[..., T, : T - 1] - diagonal(a)[..., : T - 1]  # (..., T-1)
    return _out(diffs.sum(axis=-1) / (T if divisor == "T" else T - 1))


def forward_transfer(R: Matrix, divisor: str = "T-1") -> float | np.ndarray:
    """GEM's FWT. ``divisor="T"`` is GEM's code: ``fwt.mean()`` over T entries whose first is 0."""
    _check("fwt divisor", divisor, FWT_DIVISORS)
    a = as_matrices(R)
    T = a.shape[-1]
    if T < 2:
        return _nan(a)
    before = a[..., np.arange(1, T), np.arange(1, T)]  # a_{i-1,i} for i=2..T, (..., T-1)
    return _out((before - a[..., 0, 1:]).sum(axis=-1) / (T if divisor == "T" else T - 1))


def _best_since_learned(a: np.ndarray) -> np.ndarray:
    """max_{j<=l<T} a_{l,j} for j = 1..T-1 (1-based): the best accuracy on task j from the row that learned it to
    the row before the last. Rows before j are excluded: the task was not learned yet. Shape (..., T-1)."""
    T = a.shape[-1]
    sub = a[..., 1:T, : T - 1]  # rows 1..T-1, columns 1..T-1 (1-based): (..., T-1, T-1)
    learned = np.arange(1, T)[:, None] >= np.arange(1, T)[None, :]  # (T-1, T-1): row l >= task j
    return np.where(learned, sub, -np.inf).max(axis=-2)


def forgetting(R: Matrix, kind: str = "max") -> float | np.ndarray:
    _check("forgetting convention", kind, FORGETTING_KINDS)
    a = as_matrices(R)
    T = a.shape[-1]
    if T < 2:
        return _nan(a)
    ref = diagonal(a)[..., : T - 1] if kind == "first_last" else _best_since_learned(a)  # (..., T-1)
    return _out((ref - a[..., T, : T - 1]).mean(axis=-1))


def learning_accuracy(R: Matrix) -> float | np.ndarray:
    return _out(diagonal(R).mean(axis=-1))


def retention_per_task(R: Matrix) -> np.ndarray:
    """a_{T,i} / a_{i,i} for every task (NaN where a_{i,i} = 0). Shape (..., T); the last entry is 1 by definition."""
    a = as_matrices(R)
    d = diagonal(a)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d > 0, a[..., -1, :] / np.where(d > 0, d, 1.0), np.nan)


def retention(R: Matrix) -> float | np.ndarray:
    a = as_matrices(R)
    T = a.shape[-1]
    if T < 2:
        return _nan(a)
    r = retention_per_task(a)[..., : T - 1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # every a_{i,i} = 0: undefined, NaN
        return _out(np.nanmean(r, axis=-1))


def undefined_reason(name: str, R: Matrix) -> str | None:
    a = as_matrix(R)
    T = a.shape[1]
    if name in ("bwt", "fwt", "forgetting", "retention") and T < 2:
        return f"{name} needs at least 2 tasks (the sequence has {T})"
    if name == "retention" and T >= 2 and not (diagonal(a)[: T - 1] > 0).any():
        return "retention is undefined: every learned task has 0 accuracy right after learning it"
    return None


def summarize(R: Matrix, bwt_divisor: str = "T-1", forgetting_kind: str = "max", acc_kind: str = "final",
              fwt_divisor: str = "T-1") -> dict:
    """All metrics under the keys of ``summary.json``, plus reasons for the undefined ones."""
    out = {
        "acc": average_accuracy(R, acc_kind),
        "bwt": backward_transfer(R, bwt_divisor),
        "fwt": forward_transfer(R, fwt_divisor),
        "forgetting": forgetting(R, forgetting_kind),
        "learning_acc": learning_accuracy(R),
        "retention": retention(R),
        "retention_per_task": [None if math.isnan(x) else float(x) for x in retention_per_task(as_matrix(R))],
    }
    reasons = {k: r for k in ("bwt", "fwt", "forgetting", "retention") if (r := undefined_reason(k, R))}
    out["undefined"] = reasons
    out["conventions"] = {"bwt_divisor": bwt_divisor, "fwt_divisor": fwt_divisor, "forgetting": forgetting_kind,
                          "acc": acc_kind, "scale": "percent"}
    return out


@dataclass(frozen=True)
class Conventions:
    """Which published definition each metric follows, so numbers can be compared with a given paper."""

    bwt_divisor: str = "T-1"
    """"T-1" (GEM paper, default) or "T" (GEM's code; TRACE's seen-so-far average at the last stage)."""
    forgetting: str = "max"
    """"max" (Chaudhry et al. 2018: best accuracy since the task was learned minus last, default) or "first_last"
    (Avalanche)."""
    acc: str = "final"
    """"final" (mean of the last row, default) or "incremental" (mean over stages of the seen-so-far average)."""
    fwt_divisor: str = "T-1"
    """"T-1" (GEM paper, default: the T-1 tasks that have a previous stage) or "T" (GEM's code averages T entries,
    the first of which is 0)."""

    def __post_init__(self) -> None:
        _check("bwt divisor", self.bwt_divisor, BWT_DIVISORS)
        _check("forgetting convention", self.forgetting, FORGETTING_KINDS)
        _check("acc convention", self.acc, ACC_KINDS)
        _check("fwt divisor", self.fwt_divisor, FWT_DIVISORS)


# Named presets; "gem" is the default and the one the MemGen paper's continual-learning figures follow.
PRESETS: dict[str, Conventions] = {
    "gem": Conventions(),
    # GEM's metrics.py: bwt.mean() and fwt.mean() over all T tasks (the last BWT and first FWT entries are 0)
    "gem-code": Conventions(bwt_divisor="T", fwt_divisor="T"),
    "trace": Conventions(bwt_divisor="T"),
    "avalanche": Conventions(forgetting="first_last"),
    "chaudhry": Conventions(forgetting="max"),
    "incremental": Conventions(acc="incremental"),
}


def conventions(name: str | Conventions | None) -> Conventions:
    """A preset by name (``gem``, ``gem-code``, ``trace``, ``avalanche``, ``chaudhry``, ``incremental``)."""
    if name is None:
        return Conventions()
    if isinstance(name, Conventions):
        return name
    if name not in PRESETS:
        raise ValueError(f"unknown metric convention {name!r}; use one of {', '.join(PRESETS)}")
    return PRESETS[name]


def summarize_with(R: Matrix, conv: str | Conventions | None = None) -> dict:
    """``summarize`` under a named convention preset (or a ``Conventions``)."""
    c = conventions(conv)
    return summarize(R, c.bwt_divisor, c.forgetting, c.acc, c.fwt_divisor)


def per_task(R: Matrix, forgetting_kind: str = "max") -> dict[str, np.ndarray]:
    """Per-task quantities, each of shape (..., T) in column order (NaN where undefined):
    ``init`` a_{0,j}; ``learned`` a_{j,j}; ``final`` a_{T,j}; ``bwt`` a_{T,j} - a_{j,j} (NaN for the last task);
    ``fwt`` a_{j-1,j} - a_{0,j} (NaN for the first); ``forgetting`` and ``retention`` a_{T,j} / a_{j,j} (NaN for the
    last task, and for retention where a_{j,j} = 0)."""
    _check("forgetting convention", forgetting_kind, FORGETTING_KINDS)
    a = as_matrices(R)
    T = a.shape[-1]
    d = diagonal(a)  # (..., T)
    nan = np.full(a.shape[:-2] + (T,), np.nan)
    bwt, fwt, forg = nan.copy(), nan.copy(), nan.copy()
    bwt[..., : T - 1] = a[..., T, : T - 1] - d[..., : T - 1]
    fwt[..., 1:] = a[..., np.arange(1, T), np.arange(1, T)] - a[..., 0, 1:]
    if T > 1:
        ref = d[..., : T - 1] if forgetting_kind == "first_last" else _best_since_learned(a)  # (..., T-1)
        forg[..., : T - 1] = ref - a[..., T, : T - 1]
    ret = retention_per_task(a)
    ret[..., T - 1] = np.nan  # the last task is retained by definition (a_{T,T} / a_{T,T}): not informative
    return {"init": a[..., 0, :].copy(), "learned": d, "final": a[..., T, :].copy(), "bwt": bwt, "fwt": fwt,
            "forgetting": forg, "retention": ret}


# General-ability probes: tasks evaluated in every row but never trained on (``probes`` of a sequence). Their
# matrix P has shape (T+1, n_probes): rows init..T as in R, one column per probe. They measure what training the
# sequence costs the model elsewhere, so they stay out of ACC/BWT/FWT (which are about the trained tasks).


def as_probe_matrices(P: Matrix) -> np.ndarray:
    """Validate a probe matrix (T+1, n_probes) or a batch (..., T+1, n_probes): at least init and one stage."""
    a = np.asarray(P, dtype=float)
    if a.ndim < 2 or a.shape[-1] < 1 or a.shape[-2] < 2:
        raise ValueError(f"P must have shape (T+1, n_probes) with row 0 = init and T >= 1; got {a.shape}")
    return a


def probe_drop_per_probe(P: Matrix) -> np.ndarray:
    """init minus final accuracy of each probe, p_{0,k} - p_{T,k} (positive = the probe got worse). (..., n_probes)."""
    a = as_probe_matrices(P)
    return a[..., 0, :] - a[..., -1, :]


def probe_drop(P: Matrix) -> float | np.ndarray:
    """Mean over probes of ``probe_drop_per_probe``: one float per matrix, the batch shape for a batch."""
    return _out(probe_drop_per_probe(P).mean(axis=-1))


def probe_retention_per_probe(P: Matrix) -> np.ndarray:
    """final / init accuracy of each probe, p_{T,k} / p_{0,k}; NaN where p_{0,k} = 0 (nothing to retain).
    (..., n_probes)."""
    a = as_probe_matrices(P)
    init = a[..., 0, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(init > 0, a[..., -1, :] / np.where(init > 0, init, 1.0), np.nan)


def probe_retention(P: Matrix) -> float | np.ndarray:
    """Mean over the probes with init > 0 of ``probe_retention_per_probe``; NaN when every probe starts at 0."""
    r = probe_retention_per_probe(P)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all NaN: undefined
        return _out(np.nanmean(r, axis=-1))


def probe_summary(P: Matrix, names: Sequence[str]) -> dict:
    """The probe keys of ``summary.json``: ``probe_drop``, ``probe_retention`` (a fraction, like ``retention``),
    their per-probe values by name (None where undefined) and ``undefined`` reasons keyed ``probe_retention`` (all
    probes start at 0) or ``probe_retention:<name>``."""
    a = as_probe_matrices(P)
    if a.ndim != 2 or a.shape[1] != len(names):
        raise ValueError(f"P has shape {a.shape} but {len(names)} probe names were given")
    drops, rets = probe_drop_per_probe(a), probe_retention_per_probe(a)
    reasons = {f"probe_retention:{n}": f"probe {n} scored 0 at init, so its retention (final / init) is undefined"
               for n, r in zip(names, rets, strict=True) if math.isnan(r)}
    if len(reasons) == len(names):
        reasons["probe_retention"] = "every probe scored 0 at init: probe retention is undefined"
    return {"probe_drop": probe_drop(a), "probe_retention": probe_retention(a),
            "probe_drop_per_probe": {n: float(d) for n, d in zip(names, drops, strict=True)},
            "probe_retention_per_probe": {n: None if math.isnan(r) else float(r) for n, r in zip(names, rets,
                                                                                                 strict=True)},
            "undefined": reasons}
