"""General-ability probes (issue 21 §1): tasks evaluated in every row and never trained. Metrics against
hand-computed values, resolution and one-line errors, and a tiny-model run through the CLI (cells in every row,
the marked matrix.csv column, summary, resumption, report tables with and without --ci, paired differences)."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from harness import metrics as M
from harness.analysis import stats
from harness.config import RunConfig, apply_overrides, from_dict
from harness.runner import split_matrix_columns
from harness.sweep import cell_config, cells, load_spec
from tasks.base import TaskError
from tasks.registry import get_task, resolve_probes, sequence_probes
from tasks.scoring import extract_stated

# rows init, after t1, after t2; columns: probes a, b
P = [[80.0, 50.0],
     [70.0, 0.0],
     [60.0, 25.0]]


def test_probe_metrics_hand_computed():
    np.testing.assert_allclose(M.probe_drop_per_probe(P), [80 - 60, 50 - 25])
    assert M.probe_drop(P) == pytest.approx((20 + 25) / 2)
    np.testing.assert_allclose(M.probe_retention_per_probe(P), [60 / 80, 25 / 50])
    assert M.probe_retention(P) == pytest.approx((0.75 + 0.5) / 2)
    s = M.probe_summary(P, ["a", "b"])
    assert s["probe_drop"] == pytest.approx(22.5) and s["probe_retention"] == pytest.approx(0.625)
    assert s["probe_drop_per_probe"] == {"a": 20.0, "b": 25.0} and s["undefined"] == {}
    # a batch of matrices (m, T+1, n_probes) -> (m,), as the bootstrap evaluates them
    batch = np.stack([P, np.asarray(P) / 2])
    np.testing.assert_allclose(M.probe_drop(batch), [22.5, 11.25])


def test_probe_retention_undefined_at_zero_init():
    P0 = [[0.0, 40.0], [10.0, 20.0]]  # probe a starts at 0: nothing to retain
    assert math.isnan(M.probe_retention_per_probe(P0)[0]) and M.probe_retention(P0) == pytest.approx(0.5)
    assert M.probe_drop(P0) == pytest.approx((-10 + 20) / 2)
    s = M.probe_summary(P0, ["a", "b"])
    assert s["probe_retention_per_probe"] == {"a": None, "b": 0.5} and "probe_retention:a" in s["undefined"]
    s = M.probe_summary([[0.0], [30.0]], ["a"])
    assert math.isnan(s["probe_retention"]) and "every probe scored 0" in s["undefined"]["probe_retention"]
    with pytest.raises(ValueError, match="T\\+1, n_probes"):
        M.probe_drop([[1.0, 2.0]])


def test_probe_quantities_in_report_units():
    q = stats.run_probe_quantities(np.asarray(P), ["a", "b"])
    assert q[("probe_drop", "all")] == pytest.approx(22.5) and q[("probe_retention", "all")] == pytest.approx(62.5)
    assert q[("probe_drop", "b")] == pytest.approx(25.0) and q[("probe_retention", "a")] == pytest.approx(75.0)
    assert stats.run_probe_quantities(None, []) == {}


def test_resolution_and_errors():
    assert sequence_probes("quick") == ["first_letter"] and sequence_probes("arith,choice") == []
    assert resolve_probes("quick", None) == ["first_letter"]
    assert resolve_probes("quick", ()) == [] and resolve_probes("arith", ["first_letter"]) == ["first_letter"]
    with pytest.raises(TaskError, match="probe 'arith' is also a trained task"):
        resolve_probes("quick", ["arith"])
    with pytest.raises(TaskError, match="unknown probe task 'nope'"):
        resolve_probes("quick", ["nope"])
    cfg = from_dict(RunConfig, {})
    assert cfg.probes is None and apply_overrides(cfg, ["probes=none"]).probes == ()
    assert split_matrix_columns(["arith", "probe:first_letter"]) == (["arith"], ["first_letter"])


def test_sweep_cells_keep_the_sequence_probes(tmp_path):
    spec = load_spec(None, {"sequence": "quick", "orders": "latin", "n_orders": 2, "methods": "vanilla"})
    grid = cells(spec, tmp_path)
    assert all(cell_config(spec, c).probes == ("first_letter",) for c in grid)  # inline orders, quick's probes
    spec = load_spec(None, {"sequence": "quick", "methods": "vanilla", "base": {"probes": "none"}})
    assert cell_config(spec, cells(spec, tmp_path)[0]).probes == ()


def test_first_letter_task_is_strict():
    t = get_task("first_letter")
    test = t.load("test")
    assert len(test) >= 100 and not {e.question for e in test} & {e.question for e in t.load("train")}
    e = test[0]
    assert t.score(f'The first letter of the word "x" is "{e.answer.upper()}".', e) == 1.0
    assert t.score(f"Answer: {e.answer}", e) == 1.0
    assert t.score(f"{e.answer} is a letter.", e) == 0.0  # the stated value is 'a letter', not the letter
    assert extract_stated("The capital city of France is Paris, a big city.") == "Paris"


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


RUN = ["run", "--model", "tiny-random", "--sequence", "arith,choice", "--probes", "first_letter", "--methods",
       "vanilla,sft", "--limit", "4", "--set", "train.max_steps=1", "--set", "eval.max_new_tokens=4"]


@pytest.mark.parametrize(("probes", "msg"), [("arith", "probe 'arith' is also a trained task of sequence"),
                                             ("nope", "unknown probe task 'nope'")])
def test_bad_probe_fails_in_one_line_before_writing(tmp_path, probes, msg):
    out = tmp_path / "r"
    args = [a if a != "first_letter" else probes for a in RUN]
    r = cli(*args, "--out", str(out))
    assert r.returncode == 2 and msg in r.stderr.replace("\n", " ") and "Traceback" not in r.stderr
    assert not out.exists()
    r = cli("sweep", "--sequence", "arith,choice", "--probes", probes, "--methods", "vanilla", "--out", str(out))
    assert r.returncode == 2 and msg in r.stderr.replace("\n", " ") and not out.exists()


def test_run_with_probe_cells_matrix_summary_resume_report(tmp_path):
    out = tmp_path / "r"
    r = cli(*RUN, "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    run = out / "sft"
    for row in range(3):  # init and after each of the two trained tasks
        cell = json.loads((run / "cells" / f"r{row}_first_letter.json").read_text())
        assert cell["task"] == "first_letter" and cell["n"] == 4 and (run / "samples" / f"r{row}_first_letter.jsonl"
                                                                      ).exists()
    assert json.loads((run / "cells" / "r0_first_letter.json").read_text())["cache_key"]  # init row: eval cache
    header = (run / "matrix.csv").read_text().splitlines()[0]
    assert header == "after,arith,choice,probe:first_letter"
    s = json.loads((run / "summary.json").read_text())
    assert s["complete"] and s["tasks"] == ["arith", "choice"] and len(s["matrix"][0]) == 2  # R: trained only
    assert s["probes"] == ["first_letter"] and len(s["probe_matrix"]) == 3
    P = np.asarray(s["probe_matrix"])
    assert s["probe_drop"] == pytest.approx(P[0, 0] - P[-1, 0]) and "first_letter" in s["probe_drop_per_probe"]
    assert s["acc"] == pytest.approx(np.mean(s["matrix"][-1]))  # ACC leaves the probe out
    assert json.loads((run / "config.json").read_text())["probes"] == ["first_letter"]
    assert not list((run / "train").glob("*first_letter*"))  # never trained on

    # resumption: the last row's cells (probe included) are recomputed from the stage-2 checkpoint, identically
    before = {p.name: {k: v for k, v in json.loads(p.read_text()).items() if k != "seconds"}
              for p in (run / "cells").glob("r2_*.json")}
    for name in before:
        (run / "cells" / name).unlink()
    r = cli(*RUN, "--out", str(out))
    assert r.returncode == 0 and "resuming after stage 2" in r.stderr, r.stderr[-2000:]
    after = {p.name: {k: v for k, v in json.loads(p.read_text()).items() if k != "seconds"}
             for p in (run / "cells").glob("r2_*.json")}
    assert after == before and "r2_first_letter.json" in after
    # the same run without its probes is another config: refused, naming probes and how to resume
    r = cli(*[a if a != "first_letter" else "none" for a in RUN], "--out", str(out))
    assert r.returncode == 2 and "probes" in r.stderr and "--probes first_letter" in r.stderr.replace("\n", " ")

    rep = cli("report", str(out))
    assert rep.returncode == 0 and "Probe drop" in rep.stdout and "Probe retention" in rep.stdout, rep.stderr
    rep = cli("report", str(out), "--ci", "--resamples", "50", "--compare", "sft:vanilla", "--out", str(tmp_path / "a"))
    assert rep.returncode == 0, rep.stderr[-2000:]
    main_table = rep.stdout.split("Paired differences")[0]
    assert "Probe drop" in main_table and "±" in main_table
    assert "sft - vanilla | Probe drop" in rep.stdout
    assert "General-ability probes" in (tmp_path / "a" / "cl_tables.md").read_text()
    doc = json.loads((tmp_path / "a" / "cl_analysis.json").read_text())
    assert {r["metric"] for r in doc["tidy"]} >= {"probe_drop", "probe_retention"}
    assert all(r["probes"] == ["first_letter"] for r in doc["runs"])
