"""Analysis over run directories: paired/hierarchical bootstrap, aggregation over orders and seeds, exports,
plots and task orders. Run directories are written in the runner's own layout (store + write_matrix_files) from
chosen per-sample scores, so every expected number is computed by hand."""

import json

import numpy as np
import pytest

from harness.analysis import plots, stats, tables
from harness.analysis.orders import balanced_latin_square, task_orders
from harness.analysis.runs import load_run, load_runs
from harness.metrics import Conventions
from harness.runner import write_matrix_files
from harness.store import atomic_write_json, atomic_write_jsonl


def make_run(path, method, tasks, scores, seed=0, model="m", trigger=None):
    """scores[task]: (T+1, n) 0/1 array in row order; trigger[task]: (inserted, queried) per sample."""
    for task in tasks:
        s = np.asarray(scores[task], dtype=float)
        for row in range(len(tasks) + 1):
            samples = [{"id": f"{task}-{k}", "score": float(v),
                        **({"trigger_inserted": trigger[task][0], "trigger_queried": trigger[task][1]}
                           if trigger else {})} for k, v in enumerate(s[row])]
            atomic_write_jsonl(path / "samples" / f"r{row}_{task}.jsonl", samples)
            atomic_write_json(path / "cells" / f"r{row}_{task}.json",
                              {"accuracy": 100 * s[row].mean(), "n": s.shape[1]})
    atomic_write_json(path / "config.json", {"methods": [method], "seed": seed})
    write_matrix_files(path, tasks, {"method": method, "model": model, "seed": seed})
    return path


def rows(*accs, n=10):
    """A (len(accs), n) 0/1 array whose row r has accs[r] * n ones."""
    return np.array([[1.0] * round(a * n) + [0.0] * (n - round(a * n)) for a in accs])


def test_paired_bootstrap_keeps_rows_of_a_column_together():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 2, size=(3, 50)).astype(float)
    s[2] = s[1]  # after task 2, task 1's answers are exactly those right after learning it
    scores = [s, rows(0, 0.5, 0.5, n=50)]
    R = 100 * np.stack([x.mean(axis=1) for x in scores], axis=1)  # (3, 2)
    idx = [stats.resample_indices(50, 200, rng), None]  # column 2 without samples: stays fixed
    assert idx[0].shape == (200, 50) and 0 <= idx[0].min() and idx[0].max() < 50
    mats = stats.resampled_matrices(R, scores, idx)  # (B, 3, 2)
    assert mats.shape == (200, 3, 2)
    # paired resampling: the difference a_{2,1} - a_{1,1} is 0 in every replicate, not just on average
    np.testing.assert_array_equal(mats[:, 2, 0], mats[:, 1, 0])
    assert mats[:, 1, 0].std() > 0
    np.testing.assert_array_equal(mats[:, :, 1], np.broadcast_to(R[:, 1], (200, 3)))


def test_percentile_ci_and_hierarchical_by_hand():
    assert stats.percentile_ci(np.full(100, 3.0)) == (3.0, 3.0)
    lo, hi = stats.percentile_ci(np.arange(1001.0))
    # mid-CDF of value i is (i + 0.5) / 1001: the 2.5% point is 0.025 * 1001 - 0.5 = 24.525
    assert (lo, hi) == pytest.approx((24.525, 975.475))
    # a lattice (one cell): 0 and 1 with mid-CDF 0.25 and 0.75; the 2.5% point clamps to 0, 50% sits halfway
    assert stats.percentile_ci(np.array([0.0, 1.0]), level=0.0) == pytest.approx((0.5, 0.5))
    assert np.isnan(stats.percentile_ci(np.full(5, np.nan))[0])
    B = 20000
    # one run: the hierarchical bootstrap is that run's own within-run replicates
    one = np.random.default_rng(2).normal(size=(1, B, 1))
    np.testing.assert_allclose(stats.hierarchical(np.array([0.3]), one, ["o"], np.random.default_rng(3)),
                               one[0, :, 0])
    # runs without test-sample noise (constant pools), one order: the spread over runs alone. s^2 = 100 (10, 20,
    # 30), so the variance of the mean of 3 runs is s^2 / 3 = 33.3; the k/(k-1) factor undoes the bootstrap's
    # (k-1)/k shrinkage (a plain bootstrap of 3 values gives 22.2).
    pts = np.array([10.0, 20.0, 30.0])
    h = stats.hierarchical(pts, np.repeat(pts[:, None, None], B, axis=1).repeat(3, axis=2), ["o"] * 3,
                           np.random.default_rng(1))
    assert h.mean() == pytest.approx(20.0, abs=0.3) and h.var() == pytest.approx(100 / 3, rel=0.05)
    # two orders with one run each: orders are strata, not draws; no noise -> no width
    h = stats.hierarchical(np.array([10.0, 30.0]), np.array([10.0, 30.0])[:, None, None] * np.ones((2, B, 1)),
                           ["a", "b"], np.random.default_rng(4))
    np.testing.assert_allclose(h, 20.0)
    # runs that differ only by their test-sample noise (s^2 = 2 < tau^2 = 4): the noise counts once, so the
    # variance of the mean of 2 runs is tau^2 / 2 = 2 (the plain two-stage bootstrap gives about 2 * 2)
    noise = np.random.default_rng(5).normal(0.0, 2.0, size=(2, B, 2))
    pts = np.array([49.0, 51.0])
    h = stats.hierarchical(pts, pts[:, None, None] + noise, ["o", "o"], np.random.default_rng(6))
    assert h.mean() == pytest.approx(50.0, abs=0.05) and h.var() == pytest.approx(2.0, rel=0.05)
    # an undefined run (NaN point) is left out
    h = stats.hierarchical(np.array([np.nan, 5.0]), np.full((2, 10, 1), 5.0), ["o", "p"], np.random.default_rng(7))
    np.testing.assert_allclose(h, 5.0)


def test_analyze_over_orders_and_seeds(tmp_path):
    A, Bt = "a", "b"
    # order a->b: a learned 80%, kept 60% after b; b 0 -> 20 (after a, FWT) -> 90
    make_run(tmp_path / "o0" / "sft", "sft", [A, Bt], {A: rows(0.0, 0.8, 0.6), Bt: rows(0.0, 0.2, 0.9)})
    # order b->a
    make_run(tmp_path / "o1" / "sft", "sft", [Bt, A], {Bt: rows(0.1, 0.7, 0.5), A: rows(0.0, 0.0, 0.9)})
    runs = load_runs([tmp_path])
    assert sorted(r.order for r in runs) == ["a->b", "b->a"]
    a = tables.analyze(runs, B=300)
    t = a.tidy.set_index(["method", "metric", "task"])
    # ACC: order 0 (60+90)/2 = 75; order 1 (50+90)/2 = 70 -> 72.5
    assert t.loc[("sft", "acc", "all"), "mean"] == pytest.approx(72.5)
    # BWT (T-1 = 1): order 0: 60-80 = -20; order 1: 50-70 = -20
    assert t.loc[("sft", "bwt", "all"), "mean"] == pytest.approx(-20.0)
    # per-task BWT exists only where the task was not last: a in order 0, b in order 1
    assert t.loc[("sft", "bwt", A), "mean"] == pytest.approx(-20.0) and t.loc[("sft", "bwt", A), "n_runs"] == 1
    assert t.loc[("sft", "final", A), "mean"] == pytest.approx((60 + 90) / 2)
    assert t.loc[("sft", "final", A), "n_runs"] == 2 and t.loc[("sft", "final", A), "n_samples"] == 20
    lo, hi = t.loc[("sft", "acc", "all"), ["ci_low", "ci_high"]]
    assert lo < 72.5 < hi
    # one mean matrix per (method, order)
    assert set(a.mean_matrices) == {("sft", "a->b"), ("sft", "b->a")}


def test_report_json_is_a_run_source_without_samples(tmp_path):
    from harness.report import analysis_report

    for seed in (0, 1):
        make_run(tmp_path / "runs" / f"s{seed}" / "sft", "sft", ["a", "b"],
                 {"a": rows(0, 0.8, 0.4 + 0.2 * seed), "b": rows(0, 0, 0.9)}, seed=seed)
    analysis_report([tmp_path / "runs"], tmp_path / "rep", resamples=50)
    runs = load_runs([tmp_path / "rep"])  # only cl_analysis.json there: matrices, no per-sample scores
    assert len(runs) == 2 and not runs[0].scores and runs[0].n_samples("a") == 10
    t = tables.analyze(runs, B=200).tidy.set_index(["method", "metric", "task"])
    # ACC per run (40+90)/2 = 65 and (60+90)/2 = 75: the mean 70; the CI reflects the spread over runs only
    assert t.loc[("sft", "acc", "all"), "mean"] == pytest.approx(70.0)
    lo, hi = t.loc[("sft", "acc", "all"), ["ci_low", "ci_high"]]
    assert 60.0 <= lo < 70.0 < hi <= 80.0
    assert "without per-sample scores" in tables.analyze(runs, B=20).caption("x")


def test_ci_shrinks_with_more_samples(tmp_path):
    make_run(tmp_path / "small", "x", ["a", "b"], {"a": rows(0, 0.5, 0.5, n=10), "b": rows(0, 0.5, 0.5, n=10)})
    make_run(tmp_path / "big", "y", ["a", "b"], {"a": rows(0, 0.5, 0.5, n=400), "b": rows(0, 0.5, 0.5, n=400)})
    t = tables.analyze(load_runs([tmp_path]), B=400).tidy.set_index(["method", "metric", "task"])
    width = {m: t.loc[(m, "acc", "all"), "ci_high"] - t.loc[(m, "acc", "all"), "ci_low"] for m in "xy"}
    assert width["x"] > 3 * width["y"] > 0


def test_exports_bold_best_and_caption(tmp_path):
    make_run(tmp_path / "sft", "sft", ["a", "b"], {"a": rows(0, 0.8, 0.4), "b": rows(0, 0, 0.9)}, model="tiny")
    make_run(tmp_path / "my_method", "my_method", ["a", "b"], {"a": rows(0, 0.7, 0.7), "b": rows(0, 0, 0.6)},
             model="tiny")
    a = tables.analyze(load_runs([tmp_path]), B=200)
    tex = tables.to_latex(a, "main")
    assert "\\toprule" in tex and "\\bottomrule" in tex and "my\\_method" in tex
    assert "Model tiny" in tex and "seeds 0" in tex and "$\\pm$" in tex
    # ACC: sft (40+90)/2 = 65 > my_method (70+60)/2 = 65? equal -> neither bold; BWT: my_method 0 > sft -40
    main = tables.wide(a, "main", "md")
    assert main.loc["my_method", "BWT"].startswith("**0.0") and not main.loc["sft", "BWT"].startswith("**")
    assert not main.loc["sft", "ACC"].startswith("**")  # a tie highlights nothing
    # forgetting: lower is better -> my_method (0) bold
    assert main.loc["my_method", "Forgetting"].startswith("**")
    csv = tables.to_csv(a).splitlines()
    assert csv[0] == "method,metric,task,mean,ci_low,ci_high,n_runs,n_samples,seeds,orders,model"
    assert len(csv) - 1 == 2 * (6 + 7 * 2)  # methods x (6 averaged + 7 per-task x 2 tasks)
    doc = json.loads(json.dumps(tables.to_json(a)))  # JSON-safe (no NaN)
    assert doc["conventions"] == {"bwt_divisor": "T-1", "forgetting": "max", "acc": "final", "fwt_divisor": "T-1"}
    assert {r["method"] for r in doc["runs"]} == {"sft", "my_method"}
    md = tables.to_markdown(a, "final")
    assert "| method" in md and "avg" in md


def test_conventions_flow_into_tables(tmp_path):
    make_run(tmp_path / "r", "sft", ["a", "b", "c"],
             {"a": rows(0, 0.8, 0.6, 0.4), "b": rows(0, 0, 0.8, 0.2), "c": rows(0, 0, 0, 1.0)})
    runs = load_runs([tmp_path])
    gem = tables.analyze(runs, "gem", B=50).tidy.set_index(["metric", "task"])
    code = tables.analyze(runs, Conventions(bwt_divisor="T"), B=50).tidy.set_index(["metric", "task"])
    # BWT sum = (40-80) + (20-80) = -100
    assert gem.loc[("bwt", "all"), "mean"] == pytest.approx(-50.0)
    assert code.loc[("bwt", "all"), "mean"] == pytest.approx(-100 / 3)


def test_plots_written_and_trigger_plot_only_when_recorded(tmp_path):
    make_run(tmp_path / "runs" / "sft", "sft", ["a", "b"], {"a": rows(0, 0.8, 0.4), "b": rows(0.1, 0.2, 0.9)})
    a = tables.analyze(load_runs([tmp_path / "runs"]), B=50)
    files = plots.all_plots(a, tmp_path / "plots")
    names = {p.name for p in files}
    assert {"heatmap.png", "heatmap.pdf", "accuracy_over_sequence.png", "metrics_bars.png"} <= names
    assert "trigger_rate.png" not in names
    assert all(p.stat().st_size > 1000 for p in files)
    make_run(tmp_path / "mg" / "memgen", "memgen", ["a", "b"], {"a": rows(0, 1, 1), "b": rows(0, 0, 1)},
             trigger={"a": (1, 4), "b": (3, 4)})
    run = load_run(tmp_path / "mg" / "memgen")
    np.testing.assert_allclose(run.trigger["a"], [25.0, 25.0, 25.0])
    files = plots.all_plots(tables.analyze([run], B=20), tmp_path / "plots2")
    assert "trigger_rate.png" in {p.name for p in files}


def test_stale_or_incomplete_runs_are_clear_errors(tmp_path):
    run = make_run(tmp_path / "r", "sft", ["a", "b"], {"a": rows(0, 1, 1), "b": rows(0, 0, 1)})
    atomic_write_jsonl(run / "samples" / "r1_a.jsonl", [{"id": f"a-{k}", "score": 0.0} for k in range(10)])
    with pytest.raises(ValueError, match="do not match matrix.csv"):
        load_run(run)
    (run / "cells" / "r2_b.json").unlink()
    write_matrix_files(run, ["a", "b"], {"method": "sft"})
    with pytest.raises(ValueError, match="is not complete"):
        load_run(run)
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        load_runs([tmp_path / "nope"])


def test_balanced_latin_square():
    for n in (2, 3, 4, 5, 6):
        sq = balanced_latin_square(n)
        assert len(sq) == (n if n % 2 == 0 else 2 * n)
        for pos in range(n):  # every task at every position equally often
            counts = np.bincount([row[pos] for row in sq], minlength=n)
            assert (counts == counts[0]).all()
        pairs = [(r[i], r[i + 1]) for r in sq for i in range(n - 1)]
        assert len(set(pairs)) == n * (n - 1)  # every ordered pair of neighbours occurs
        if n % 2 == 0:
            assert len(pairs) == n * (n - 1)  # ... exactly once
    orders = task_orders(["x", "y", "z"], 2)
    assert orders[0] == ["x", "y", "z"] and sorted(orders[1]) == ["x", "y", "z"] and orders[1] != orders[0]
    assert task_orders(["x", "y"], spec="given") == [["x", "y"]]
    with pytest.raises(ValueError, match="unknown order scheme"):
        task_orders(["x"], spec="random")
