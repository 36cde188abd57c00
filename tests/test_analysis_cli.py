"""The analysis commands on a real (tiny) run: ``verify`` re-runs cells (and catches tampering), ``transfer``
crosses sources and targets, ``report --ci --plots --out`` writes every table and figure."""

import json

import pytest
from typer.testing import CliRunner

from harness.cli import app

TINY = ["--model", "tiny-random", "--limit", "2", "--set", "eval.max_new_tokens=4", "--set", "train.max_steps=1",
        "--set", "train.batch_size=2"]


def cli(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine extra threads only spin against each other."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("runs")
    r = cli("run", "--sequence", "arith,choice", "--methods", "vanilla,sft", *TINY, "--out", str(out))
    assert r.exit_code == 0, r.output[-2000:]
    return out


@pytest.mark.slow
def test_verify_reproduces_and_catches_drift(tiny_runs):
    r = cli("verify", str(tiny_runs / "sft"), "--cells", "r0_arith,r2")
    assert r.exit_code == 0, r.output[-2000:]
    assert "0 of 3 cells drifted" in r.output
    # re-training stage 1 from scratch repeats the run's training exactly
    r = cli("verify", str(tiny_runs / "sft"), "--cells", "r1_choice", "--retrain")
    assert r.exit_code == 0 and "0 of 1 cells drifted" in r.output, r.output[-2000:]
    # tamper with a stored cell: verify must report the drift and fail
    cell = tiny_runs / "sft" / "cells" / "r2_choice.json"
    stored = json.loads(cell.read_text())
    cell.write_text(json.dumps({**stored, "accuracy": stored["accuracy"] + 50.0}))
    try:
        r = cli("verify", str(tiny_runs / "sft"), "--cells", "r2_choice")
        assert r.exit_code == 1 and "1 of 1 cells drifted" in r.output and "-50.00" in r.output
    finally:
        cell.write_text(json.dumps(stored))
    r = cli("verify", str(tiny_runs / "sft"), "--cells", "r9_arith")
    assert r.exit_code == 2 and "bad cell 'r9_arith'" in r.output


@pytest.mark.slow
def test_report_ci_plots_and_formats(tiny_runs, tmp_path):
    r = cli("report", str(tiny_runs), "--ci", "--plots", "--out", str(tmp_path / "rep"), "--resamples", "100")
    assert r.exit_code == 0, r.output[-2000:]
    assert "| method" in r.output and "±" in r.output
    for name in ("cl_tidy.csv", "cl_tables.md", "cl_tables.tex", "cl_analysis.json", "plots/heatmap.png",
                 "plots/heatmap.pdf", "plots/accuracy_over_sequence.png", "plots/metrics_bars.pdf"):
        assert (tmp_path / "rep" / name).stat().st_size > 0, name
    doc = json.loads((tmp_path / "rep" / "cl_analysis.json").read_text())
    assert {r["method"] for r in doc["runs"]} == {"vanilla", "sft"}
    r = cli("report", str(tiny_runs), "--format", "latex", "--ci", "--table", "final", "--resamples", "50")
    assert r.exit_code == 0 and "\\toprule" in r.output and "tiny-random" in r.output
    r = cli("report", str(tiny_runs), "--conventions", "nope", "--ci")
    assert r.exit_code == 2 and "unknown metric convention 'nope'" in r.output


@pytest.mark.slow
def test_transfer_table(tmp_path):
    out = tmp_path / "transfer"
    r = cli("transfer", "--sequence", "arith,choice", "--methods", "vanilla,sft", *TINY, "--out", str(out))
    assert r.exit_code == 0, r.output[-2000:]
    t = json.loads((out / "vanilla-s0" / "transfer.json").read_text())
    assert set(t["after"]) == {"arith", "choice"} and set(t["init"]) == {"arith", "choice"}
    # vanilla never trains: every source leaves every target exactly at init (greedy, same model)
    assert all(t["after"][s][g] == t["init"][g] for s in t["after"] for g in t["init"])
    assert "vanilla: source \\ target" in r.output and "+0.0 ± 0.0" in r.output
    assert (out / "sft-s0" / "cells" / "choice_arith.json").exists()
    # resuming a finished transfer run retrains nothing and prints the same table
    again = cli("transfer", "--sequence", "arith,choice", "--methods", "vanilla,sft", *TINY, "--out", str(out))
    assert again.exit_code == 0 and "training on" not in again.output
