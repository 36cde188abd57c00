"""CI regression on a small deterministic run: re-run the committed reference (SmolLM2-135M, fp32, greedy, seed 0,
``quick`` sequence, vanilla + SFT; see harness/analysis/regression.py) and fail with a diff table when any matrix
cell moves by more than the stated tolerance (0 points; ``MEMGEN_REF_TOLERANCE`` on other hardware).
Refresh on purpose with ``scripts/refresh_reference.sh``."""

import pytest

from harness.analysis import regression


def test_diff_table_flags_moved_cells():
    ref = {"sft": {"tasks": ["a", "b"], "matrix": [[0, 50], [100, 50], [75, 100]]}}
    now = {"sft": {"tasks": ["a", "b"], "matrix": [[0, 50], [100, 37.5], [75, 100]]}}
    t = regression.diff_table(ref, now, tol=0.0)
    bad = t[~t.ok]
    assert len(t) == 6 and len(bad) == 1
    assert bad.iloc[0][["after", "task", "delta"]].tolist() == ["a", "b", -12.5]
    assert regression.diff_table(ref, now, tol=12.5).ok.all()
    missing = regression.diff_table(ref, {}, tol=0.0)
    assert not missing.ok.any()


def test_reference_is_committed_and_describes_itself():
    doc = regression.load_reference()
    assert doc["config"]["model"] == "smollm2-135m" and doc["config"]["dtype"] == "fp32"
    assert doc["tolerance_pp"] == regression.TOLERANCE_PP
    for method in ("vanilla", "sft"):
        m = doc["methods"][method]
        assert m["tasks"] == ["arith", "reverse", "choice"] and len(m["matrix"]) == 4
        assert (regression.REFERENCE_DIR / f"{method}.matrix.csv").exists()


@pytest.mark.slow
def test_reference_run_reproduces(tmp_path):
    ref = regression.load_reference()["methods"]
    now = regression.run_reference(tmp_path)
    table = regression.diff_table(ref, now, regression.tolerance())
    if not table.ok.all():
        pytest.fail(f"reference cells moved by more than {regression.tolerance()} points "
                    f"(refresh on purpose with scripts/refresh_reference.sh):\n"
                    f"{table[~table.ok].to_markdown(index=False)}")
