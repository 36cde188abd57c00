"""CLI: listing commands, clear one-line errors, eval and report on a real (tiny) run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_tasks_and_methods_list():
    r = cli("tasks")
    assert r.returncode == 0 and "gsm8k" in r.stdout and "quick" in r.stdout
    r = cli("methods")
    assert r.returncode == 0 and "vanilla" in r.stdout and "sft" in r.stdout


@pytest.mark.parametrize(
    ("args", "msg"),
    [
        (["run", "--methods", "nope"], "unknown method(s) ['nope']; valid methods:"),
        (["run", "--sequence", "arith,nope"], "unknown task(s) ['nope']"),
        (["run", "--dtype", "fp8"], "dtype 'fp8' is not valid"),
        (["run", "--set", "train.lr=x"], "train.lr: expected a number"),
        (["eval", "--task", "arith", "--model", "/no/such/model"], "model '/no/such/model' did not load"),
        (["eval", "--task", "gsm8k", "--model", "tiny-random", "--data-dir", "/no/such/dir"], "data file not found"),
        (["report", "/no/such/run"], "no such run directory"),
        (["report", ".", "--format", "xls"], "unknown format"),
        (["run", "--num-processes", "2", "--accelerate-config", "/no/such.yaml"], "/no/such.yaml: no such file"),
        (["run", "--accelerate-config", str(ROOT / "configs/accelerate/zero3_cpu.yaml")], "needs --num-processes N"),
    ],
)
def test_clear_errors(args, msg):
    r = cli(*args)
    assert r.returncode == 2
    assert msg in r.stderr.replace("\n", " ")
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_run_eval_report(tmp_path):
    out = tmp_path / "runs"
    r = cli("run", "--model", "tiny-random", "--sequence", "arith,choice", "--methods", "vanilla,sft",
            "--limit", "4", "--set", "train.max_steps=2", "--set", "eval.max_new_tokens=8", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| method" in r.stdout
    budget = r.stdout.split("budget used")[1]  # the budget each method used, after the metrics table
    header = [c.strip() for c in next(line for line in budget.splitlines() if "| method" in line).split("|")]
    sft_row = [c.strip() for c in next(line for line in budget.splitlines() if line.startswith("| sft")).split("|")]
    assert sft_row[header.index("steps")] == "4"  # 2 optimizer steps x 2 tasks
    # not a terminal: training progress comes as lines (a log file gets no live bar)
    assert "sft train arith step 1/2 loss" in r.stderr and "sft train choice step 2/2 loss" in r.stderr
    for fmt, marker in (("csv", "method,model"), ("latex", "\\begin{tabular}"), ("md", "| method")):
        rep = cli("report", str(out), "--format", fmt)
        assert rep.returncode == 0 and marker in rep.stdout, rep.stderr
    ev = cli("eval", "--task", "arith", "--method", "sft", "--model", "tiny-random", "--limit", "3",
             "--checkpoint", str(out / "sft" / "checkpoints" / "stage2"), "--set", "eval.max_new_tokens=8",
             "--out", str(tmp_path / "ev"))
    assert ev.returncode == 0, ev.stderr[-2000:]
    res = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert res["results"]["arith"]["n"] == 3
    # the restored checkpoint reproduces the run's own cell (same model state, same prompts, greedy)
    run_samples = [json.loads(x) for x in (out / "sft" / "samples" / "r2_arith.jsonl").read_text().splitlines()]
    ev_samples = [json.loads(x) for x in (tmp_path / "ev" / "arith.samples.jsonl").read_text().splitlines()]
    by_id = {s["id"]: s["completion"] for s in run_samples}
    assert all(by_id[s["id"]] == s["completion"] for s in ev_samples if s["id"] in by_id)
