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


# Fast CLI checks on hand-written runs (the runner's own layout; no model).

@pytest.fixture
def two_methods(tmp_path):
    """sft and my_method over 2 orders x 2 seeds on tasks a_1 -> b_2 (underscores: LaTeX must escape them)."""
    import numpy as np

    from tests.test_analysis import make_run

    gen = np.random.default_rng(0)
    for order in (["a_1", "b_2"], ["b_2", "a_1"]):
        for seed in (0, 1):
            base = tmp_path / "-".join(order) / f"seed{seed}"
            u = gen.uniform(size=(2, 40))
            # my_method keeps the first task (0.8 at the end), sft forgets it (0.2); both learn the second task
            for method, keep in (("sft", 0.2), ("my_method", 0.8)):
                p = {order[0]: [0.0, 0.9, keep], order[1]: [0.1, 0.1, 0.9]}
                scores = {t: (u[j][None, :] < np.array(p[t])[:, None]).astype(float) for j, t in enumerate(order)}
                make_run(base / method, method, order, scores, seed=seed, model="tiny_model")
    return tmp_path


def test_report_compare_prints_and_writes_paired_differences(two_methods, tmp_path):
    r = cli("report", str(two_methods), "--compare", "my_method:sft", "--resamples", "200", "--out",
            str(tmp_path / "rep"))
    assert r.exit_code == 0, r.output[-2000:]
    assert "Paired differences" in r.output and "my_method - sft" in r.output
    csv = (tmp_path / "rep" / "cl_compare.csv").read_text().splitlines()
    assert csv[0] == "a,b,metric,task,diff,ci_low,ci_high,n_pairs,n_samples,excludes_zero"
    acc = next(line.split(",") for line in csv if ",acc,all," in line)
    # final first-task accuracy 0.8 vs 0.2 (same latents): ACC differs by about (80 - 20) / 2 = 30 points
    assert acc[:2] == ["my_method", "sft"] and 20 < float(acc[4]) < 40 and acc[7] == "4" and acc[9] == "True"
    assert "| comparison" in (tmp_path / "rep" / "cl_compare.md").read_text()
    doc = json.loads((tmp_path / "rep" / "cl_analysis.json").read_text())
    assert any(c["metric"] == "acc" for c in doc["comparisons"])
    # the main table bolds my_method's ACC: its paired CI against the runner-up (sft) excludes 0
    assert "**" in r.output.split("Paired differences")[0]
    r = cli("report", str(two_methods), "--compare", "my_method:grpo", "--resamples", "10")
    assert r.exit_code == 2 and "no runs of method 'grpo'" in r.output
    r = cli("report", str(two_methods), "--compare", "my_method-sft", "--resamples", "10")
    assert r.exit_code == 2 and "use METHOD_A:METHOD_B" in r.output


def test_report_option_errors_and_conventions_without_ci(two_methods):
    r = cli("report", str(two_methods), "--ci", "--resamples", "0")
    assert r.exit_code == 2 and "bad --resamples 0: use 1 or more" in r.output
    assert len(r.output.strip().splitlines()) == 1
    # without --ci each run's metrics are recomputed under the chosen conventions (they used to be ignored)
    gem = cli("report", str(two_methods), "--format", "csv")
    code = cli("report", str(two_methods), "--format", "csv", "--conventions", "gem-code")
    assert gem.exit_code == 0 and code.exit_code == 0
    import io

    import pandas as pd

    g, c = pd.read_csv(io.StringIO(gem.output)), pd.read_csv(io.StringIO(code.output))
    # T = 2: GEM's code divides BWT and FWT by 2 instead of 1
    assert (c["BWT"] * 2).round(6).tolist() == g["BWT"].round(6).tolist()
    assert (c["FWT"] * 2).round(6).tolist() == g["FWT"].round(6).tolist()
    bad = cli("report", str(two_methods), "--conventions", "nope")
    assert bad.exit_code == 2 and "unknown metric convention 'nope'" in bad.output
    # the seed is an integer column: "| 0 |", not "| 0.00 |"
    md = cli("report", str(two_methods))
    assert md.exit_code == 0, md.output
    first_table = md.output.strip().split("\n\n")[0]
    seeds = [line.split("|")[3].strip() for line in first_table.splitlines() if "| sft" in line]
    assert sorted(seeds) == ["0", "0", "1", "1"], md.output


def test_latex_escapes_task_and_model_names(two_methods):
    r = cli("report", str(two_methods), "--ci", "--format", "latex", "--table", "final", "--resamples", "50")
    assert r.exit_code == 0, r.output[-2000:]
    tex = r.output.split("\\end{table}")[0]  # the CI table (other tables may follow)
    assert "a\\_1" in tex and "tiny\\_model" in tex and "my\\_method" in tex
    import re

    # outside math ($...$) and the column separators, no unescaped LaTeX special character may remain
    text = re.sub(r"\$[^$]*\$", "", tex).replace(" & ", " ")
    assert not re.search(r"(?<!\\)[_&%#]", text), text
    r = cli("report", str(two_methods), "--ci", "--format", "latex", "--table", "retention", "--resamples", "50")
    assert "$a_{T,i}/a_{i,i}$" in r.output and "\\label{tab:cl-retention}" in r.output


def test_sweep_bad_seeds_is_a_one_line_error(tmp_path):
    r = cli("sweep", "--sequence", "arith", "--methods", "vanilla", "--seeds", "a,b", "--out", str(tmp_path), "--emit")
    assert r.exit_code == 2 and "bad seed 'a' in seeds 'a,b': use comma-separated integers" in r.output
    assert "invalid literal" not in r.output and len(r.output.strip().splitlines()) == 1
    from harness.sweep import parse_seeds

    assert parse_seeds("0, 2") == (0, 2) and parse_seeds([3, 4]) == (3, 4)
