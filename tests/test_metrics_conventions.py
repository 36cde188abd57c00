"""Metric conventions (GEM paper/code, TRACE seen-so-far, Avalanche/Chaudhry forgetting) against hand-computed
values and against the figures derived from the MemGen paper's continual-learning matrices."""

import math

import numpy as np
import pytest

from harness import metrics as M

# rows: init, after t1, after t2, after t3; columns t1..t3
R = [
    [10.0, 20.0, 30.0],
    [50.0, 25.0, 30.0],
    [40.0, 60.0, 35.0],
    [30.0, 50.0, 70.0],
]

# MemGen paper (../shared/MEMGEN.md), Qwen2.5-1.5B, AQuA -> GPQA -> GSM8K -> KodCode, init = vanilla row.
VANILLA = [41.34, 11.62, 39.51, 24.55]
SFT = [VANILLA, [42.52, 16.67, 42.10, 18.20], [38.55, 17.17, 45.74, 18.50], [33.46, 13.13, 52.31, 19.45],
       [28.61, 2.53, 24.14, 54.10]]
EXPEL = [VANILLA, [41.73, 12.67, 40.16, 16.30], [37.24, 14.35, 42.67, 15.20], [34.89, 12.42, 48.78, 13.65],
         [27.14, 6.23, 31.44, 48.35]]
MEMGEN = [VANILLA, [43.31, 19.70, 39.80, 19.55], [39.85, 20.72, 47.96, 28.80], [38.43, 21.72, 55.67, 19.75],
          [40.34, 20.09, 53.72, 52.95]]


def test_seen_so_far_curves_by_hand():
    c = M.seen_so_far(R)
    # OP_t: t=1: 50; t=2: (40+60)/2 = 50; t=3: (30+50+70)/3 = 50
    np.testing.assert_allclose(c["op"], [50.0, 50.0, 50.0])
    # BWT_t = (1/t) sum_{i<=t} (a_t,i - a_i,i): t=1: 0; t=2: (40-50)/2 = -5; t=3: ((30-50)+(50-60)+0)/3 = -10
    np.testing.assert_allclose(c["bwt"], [0.0, -5.0, -10.0])


def test_presets_select_the_published_definitions():
    assert M.summarize_with(R)["bwt"] == pytest.approx(-15.0)  # GEM paper: / (T-1)
    assert M.summarize_with(R, "gem-code")["bwt"] == pytest.approx(-10.0)  # GEM code: / T
    assert M.summarize_with(R, "trace")["bwt"] == pytest.approx(M.seen_so_far(R)["bwt"][-1])
    R3 = [[0, 0, 0], [40, 0, 0], [60, 50, 0], [10, 20, 90]]
    assert M.summarize_with(R3, "chaudhry")["forgetting"] == pytest.approx(((60 - 10) + (50 - 20)) / 2)
    assert M.summarize_with(R3, "avalanche")["forgetting"] == pytest.approx(((40 - 10) + (50 - 20)) / 2)
    # average incremental accuracy: mean over t of OP_t = (40 + (60+50)/2 + (10+20+90)/3) / 3
    assert M.summarize_with(R3, "incremental")["acc"] == pytest.approx((40 + 55 + 40) / 3)
    assert M.summarize_with(R3)["conventions"] == {"bwt_divisor": "T-1", "fwt_divisor": "T-1", "forgetting": "max",
                                                    "acc": "final", "scale": "percent"}


def test_gem_code_divides_fwt_by_T():
    # GEM's metrics.py: fwt = zeros(T); fwt[t] = result[t-1, t] - baseline[t] for t >= 1; print fwt.mean().
    # Here FWT entries (25-20) and (35-30): GEM paper (5+5)/2 = 5, GEM code (0+5+5)/3 = 10/3.
    assert M.summarize_with(R)["fwt"] == pytest.approx(5.0)
    assert M.summarize_with(R, "gem-code")["fwt"] == pytest.approx(10 / 3)
    assert M.forward_transfer(R, "T") == pytest.approx(10 / 3)
    assert M.summarize_with(R, "gem-code")["conventions"]["fwt_divisor"] == "T"
    assert M.summarize_with(R, "trace")["fwt"] == pytest.approx(5.0)  # TRACE defines no FWT divisor: the paper's


def test_chaudhry_forgetting_ignores_rows_before_the_task_was_learned():
    # Task 2 scores 80 after task 1 (before it was learned: transfer, not knowledge) and 30 after learning it;
    # 10 at the end. Chaudhry: max over l in [2, T-1] = a_{2,2} = 30 -> forgets 20, not 70.
    R4 = [[0, 0, 0], [50, 80, 0], [40, 30, 0], [20, 10, 90]]
    # task 1: max(50, 40) - 20 = 30; task 2: max(30) - 10 = 20
    assert M.forgetting(R4) == pytest.approx((30 + 20) / 2)
    np.testing.assert_allclose(M.per_task(R4)["forgetting"], [30, 20, np.nan])
    assert M.summarize_with(R4, "chaudhry")["forgetting"] == pytest.approx(25.0)


def test_metrics_accept_a_batch_of_matrices():
    rng = np.random.default_rng(0)
    batch = rng.uniform(0, 100, size=(2, 5, 5, 4))  # (2, 5) matrices of 4 tasks
    batch[0, 0, 2, 1] = 0.0  # one zero on the diagonal: retention skips that task
    for f in (M.average_accuracy, M.backward_transfer, M.forward_transfer, M.forgetting, M.learning_accuracy,
              M.retention, lambda r: M.forgetting(r, "first_last"), lambda r: M.average_accuracy(r, "incremental"),
              lambda r: M.forward_transfer(r, "T")):
        got = f(batch)
        assert got.shape == (2, 5)
        np.testing.assert_allclose(got, [[f(batch[i, j]) for j in range(5)] for i in range(2)])
    pt = M.per_task(batch)
    for key, v in pt.items():
        assert v.shape == (2, 5, 4)
        np.testing.assert_allclose(v[1, 3], M.per_task(batch[1, 3])[key])


def test_existing_signatures_still_work():
    assert M.backward_transfer(R, "T") == M.summarize(R, bwt_divisor="T")["bwt"]
    assert M.forgetting(R, kind="first_last") == pytest.approx(15.0)
    assert M.average_accuracy(R) == pytest.approx(50.0)


@pytest.mark.parametrize(
    ("call", "msg"),
    [
        (lambda: M.backward_transfer(R, "T+1"), "unknown bwt divisor 'T+1'; use one of T-1, T"),
        (lambda: M.forgetting(R, "min"), "unknown forgetting convention 'min'"),
        (lambda: M.average_accuracy(R, "best"), "unknown acc convention 'best'"),
        (lambda: M.conventions("icarl"), "unknown metric convention 'icarl'; use one of gem"),
        (lambda: M.Conventions(bwt_divisor="t"), "unknown bwt divisor 't'"),
    ],
)
def test_bad_convention_is_a_clear_error(call, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace("+", r"\+")):
        call()


def test_per_task_by_hand():
    pt = M.per_task(R)
    np.testing.assert_allclose(pt["learned"], [50, 60, 70])
    np.testing.assert_allclose(pt["bwt"], [-20, -10, np.nan])
    np.testing.assert_allclose(pt["fwt"], [np.nan, 5, 5])
    np.testing.assert_allclose(pt["forgetting"], [20, 10, np.nan])  # max(50,40)-30, max(25,60)-50
    np.testing.assert_allclose(M.per_task(R, "first_last")["forgetting"], [20, 10, np.nan])
    np.testing.assert_allclose(pt["retention"], [30 / 50, 50 / 60, np.nan])
    assert np.nanmean(pt["retention"]) == pytest.approx(M.retention(R))
    # the per-task values average to the scalar metrics
    assert np.nanmean(pt["bwt"]) == pytest.approx(M.backward_transfer(R))
    assert np.nanmean(pt["fwt"]) == pytest.approx(M.forward_transfer(R))


@pytest.mark.parametrize(
    ("R_", "acc", "bwt"), [(SFT, 27.345, -18.91), (EXPEL, 28.29, -13.35), (MEMGEN, 41.78, -1.85)]
)
def test_paper_figures_under_each_convention(R_, acc, bwt):
    assert M.summarize_with(R_)["acc"] == pytest.approx(acc, abs=0.005)
    assert M.summarize_with(R_)["bwt"] == pytest.approx(bwt, abs=0.005)
    # GEM's code divides by T = 4 instead of 3: the same sum, three quarters of the paper's figure.
    assert M.summarize_with(R_, "gem-code")["bwt"] == pytest.approx(bwt * 3 / 4, abs=0.005)
    assert not math.isnan(M.summarize_with(R_, "incremental")["acc"])
