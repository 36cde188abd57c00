"""CL metrics against hand-computed matrices and the paper's continual-learning table (../shared/MEMGEN.md)."""

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


def test_hand_computed():
    assert M.average_accuracy(R) == pytest.approx((30 + 50 + 70) / 3)
    # BWT: ((30-50) + (50-60)) / 2 = -15
    assert M.backward_transfer(R) == pytest.approx(-15.0)
    assert M.backward_transfer(R, divisor="T") == pytest.approx(-10.0)
    # FWT: ((25-20) + (35-30)) / 2 = 5
    assert M.forward_transfer(R) == pytest.approx(5.0)
    # forgetting (Chaudhry): t1: max(50,40)-30 = 20; t2: max(25,60)-50 = 10 -> 15
    assert M.forgetting(R) == pytest.approx(15.0)
    # first-minus-last: t1 50-30, t2 60-50 -> 15 too here; differs below
    assert M.learning_accuracy(R) == pytest.approx((50 + 60 + 70) / 3)
    np.testing.assert_allclose(M.retention_per_task(R), [30 / 50, 50 / 60, 1.0])
    assert M.retention(R) == pytest.approx((30 / 50 + 50 / 60) / 2)


def test_forgetting_conventions_differ():
    R2 = [[0, 0], [40, 0], [10, 80]]
    R3 = [[0, 0, 0], [40, 0, 0], [60, 50, 0], [10, 20, 90]]
    assert M.forgetting(R2) == pytest.approx(30.0)
    assert M.forgetting(R3) == pytest.approx(((60 - 10) + (50 - 20)) / 2)
    assert M.forgetting(R3, kind="first_last") == pytest.approx(((40 - 10) + (50 - 20)) / 2)


def test_single_task_is_nan_with_reason():
    R1 = [[10.0], [60.0]]
    assert M.average_accuracy(R1) == 60.0
    for f in (M.backward_transfer, M.forward_transfer, M.forgetting, M.retention):
        assert math.isnan(f(R1))
    s = M.summarize(R1)
    assert "bwt" in s["undefined"] and "2 tasks" in s["undefined"]["bwt"]


def test_bad_shape():
    with pytest.raises(ValueError, match="T\\+1, T"):
        M.as_matrix([[1, 2], [3, 4]])


# Paper, continual learning on Qwen2.5-1.5B (AQuA -> GPQA -> GSM8K -> KodCode); the vanilla row is init.
VANILLA = [41.34, 11.62, 39.51, 24.55]
PAPER = {
    "SFT": [[42.52, 16.67, 42.10, 18.20], [38.55, 17.17, 45.74, 18.50], [33.46, 13.13, 52.31, 19.45],
            [28.61, 2.53, 24.14, 54.10]],
    "ExpeL": [[41.73, 12.67, 40.16, 16.30], [37.24, 14.35, 42.67, 15.20], [34.89, 12.42, 48.78, 13.65],
              [27.14, 6.23, 31.44, 48.35]],
    "MemGen": [[43.31, 19.70, 39.80, 19.55], [39.85, 20.72, 47.96, 28.80], [38.43, 21.72, 55.67, 19.75],
               [40.34, 20.09, 53.72, 52.95]],
}


@pytest.mark.parametrize(("name", "acc", "bwt"), [("SFT", 27.345, -18.91), ("ExpeL", 28.29, -13.35),
                                                   ("MemGen", 41.78, -1.85)])
def test_reproduces_paper_figures(name, acc, bwt):
    Rp = [VANILLA, *PAPER[name]]
    assert M.average_accuracy(Rp) == pytest.approx(acc, abs=0.01)
    assert M.backward_transfer(Rp) == pytest.approx(bwt, abs=0.01)
