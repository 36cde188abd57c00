"""Do the report's 95% intervals cover 95%? Simulated sweeps with a known truth go through the real
``tables.analyze`` / ``tables.paired_difference`` path (in-memory runs, no files).

Model: 2 task orders x k seeds of a 2-task sequence; each run evaluates n fresh test examples per task. Example i
of a task has a latent u_i ~ U(0, 1) and is solved in row r iff u_i < p_r + e (p_r: the true accuracy in that
row, e ~ N(0, sigma_seed): how much that seed helps on that task), so the rows of a column are correlated as real
ones are (an example solved after learning is the one forgotten later). The truth is the mean over the two orders
of the metric of the true matrices.

Measured with this file's scenarios at 2000 datasets and B = 1000 (2026-12-01) are in the report of the
change that added it; the tests use fewer datasets, seeded, to stay fast.
"""

from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest

from harness.analysis import tables
from harness.analysis.runs import RunData
from harness.metrics import Conventions

# True accuracies (T+1, T) per order: row 0 init, row 1 after the first task, row 2 after the second.
TRUE = {("a", "b"): np.array([[0.20, 0.30], [0.60, 0.35], [0.45, 0.70]]),
        ("b", "a"): np.array([[0.30, 0.20], [0.65, 0.25], [0.50, 0.60]])}
SHIFT = np.array([[0.0, 0.0], [0.0, 0.0], [0.10, 0.0]])  # method "y" keeps 10 points more of the first task


def truth(metric: str, P: dict = TRUE) -> float:
    if metric == "acc":
        return float(np.mean([100 * m[-1].mean() for m in P.values()]))
    return float(np.mean([100 * (m[2, 0] - m[1, 0]) for m in P.values()]))  # bwt, T = 2


def sweep(rng: np.random.Generator, k: int, n: int, sigma_seed: float, shift: bool = False) -> list[RunData]:
    """One simulated sweep: method "x" (and with ``shift`` method "y" on the same examples and seeds)."""
    runs = []
    for order, P in TRUE.items():
        for seed in range(k):
            e = rng.normal(0.0, sigma_seed, size=2)  # (T,) this seed's effect on each task
            u = rng.uniform(size=(2, n))  # (T, n) latents of this run's test examples
            for method, P_m in (("x", P), ("y", P + SHIFT))[: 2 if shift else 1]:
                scores = {t: (u[j][None, :] < (P_m[:, j] + e[j])[:, None]).astype(float)  # (T+1, n)
                          for j, t in enumerate(order)}
                R = 100 * np.stack([scores[t].mean(axis=1) for t in order], axis=1)  # (T+1, T)
                runs.append(RunData(path=Path(f"/sim/{method}/{'-'.join(order)}/{seed}"), method=method,
                                    model="sim", seed=seed, tasks=list(order), R=R, scores=scores,
                                    ids={t: [f"{t}{i:04d}" for i in range(n)] for t in order}))
    return runs


def coverage(n_sets: int, k: int, n: int, sigma_seed: float, B: int, seed: int = 0) -> dict[str, float]:
    """Share of simulated sweeps whose 95% CI (method x, averaged metrics) holds the true ACC / BWT."""
    rng = np.random.default_rng(seed)
    hits = {"acc": 0, "bwt": 0}
    for i in range(n_sets):
        t = tables.analyze(sweep(rng, k, n, sigma_seed), B=B, seed=i).tidy.set_index(["metric", "task"])
        for m in hits:
            lo, hi = t.loc[(m, "all"), ["ci_low", "ci_high"]]
            hits[m] += bool(lo <= truth(m) <= hi)
    return {m: h / n_sets for m, h in hits.items()}


def paired_coverage(n_sets: int, k: int, n: int, sigma_seed: float, B: int, seed: int = 0) -> dict[str, float]:
    """Share of simulated sweeps whose paired 95% CI of y - x holds the true difference of ACC / BWT."""
    rng = np.random.default_rng(seed)
    shifted = {o: P + SHIFT for o, P in TRUE.items()}
    want = {m: truth(m, shifted) - truth(m) for m in ("acc", "bwt")}
    hits = {"acc": 0, "bwt": 0}
    for i in range(n_sets):
        # paired_difference needs only the runs and settings of an Analysis, not its per-method table
        a = tables.Analysis(tidy=None, runs=sweep(rng, k, n, sigma_seed, shift=True),  # type: ignore[arg-type]
                            conventions=Conventions(), B=B, level=0.95, seed=i)
        d = tables.paired_difference(a, "y", "x").set_index(["metric", "task"])
        for m in hits:
            lo, hi = d.loc[(m, "all"), ["ci_low", "ci_high"]]
            hits[m] += bool(lo <= want[m] <= hi)
    return {m: h / n_sets for m, h in hits.items()}


@pytest.mark.parametrize(("k", "n", "sigma_seed"), [(2, 64, 0.0), (3, 48, 0.05)])
def test_ci_covers_the_true_mean_about_95_percent(k, n, sigma_seed):
    # (2, 64, 0): seeds change only which test examples are drawn: the case where the old two-stage bootstrap,
    # counting that noise twice, covered about 100%. (3, 48, 0.05): seeds matter about as much as the noise.
    cov = coverage(200, k, n, sigma_seed, B=200)
    assert 0.92 <= cov["acc"] <= 0.98 and 0.92 <= cov["bwt"] <= 0.98, cov


def test_paired_difference_covers_the_true_difference():
    cov = paired_coverage(200, 2, 64, 0.05, B=200)
    assert 0.92 <= cov["acc"] <= 0.98 and 0.92 <= cov["bwt"] <= 0.98, cov


@pytest.mark.parametrize("n", [32, 64, 200])
@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.8])
def test_single_cell_interval_is_no_wider_than_wilson_by_more_than_10_percent(n, p):
    # One run of one task: the interval of its final accuracy is the plain bootstrap of one cell of n samples.
    k = round(p * n)
    s = np.array([[0.0] * n, [1.0] * k + [0.0] * (n - k)])  # (T+1, n): init 0, then k of n solved
    run = RunData(path=Path("/sim/one"), method="x", model="sim", seed=0, tasks=["a"], R=100 * s.mean(axis=1)[:, None],
                  scores={"a": s}, ids={"a": [str(i) for i in range(n)]})
    t = tables.analyze([run], B=2000).tidy.set_index(["metric", "task"])
    lo, hi = t.loc[("final", "a"), ["ci_low", "ci_high"]]
    w = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert lo <= 100 * k / n <= hi
    assert (hi - lo) <= 1.10 * 100 * (w.high - w.low), (hi - lo, 100 * (w.high - w.low))
