"""Sweeps: the grid, skipping finished cells, emitted launch commands and SLURM script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.config import ConfigError
from harness.sweep import cells, load_spec


def test_grid_and_validation(tmp_path):
    spec = load_spec(None, {"sequence": "quick", "orders": "latin", "n_orders": 2, "methods": "vanilla,sft",
                            "seeds": "0,1"})
    grid = cells(spec, tmp_path)
    assert len(grid) == 2 * 2 * 2
    assert grid[0].order == ("arith", "reverse", "choice")
    assert len({c.order for c in grid}) == 2
    assert str(grid[0].run_dir).endswith("arith-reverse-choice/seed0/vanilla")
    with pytest.raises(ConfigError, match="unknown method"):
        load_spec(None, {"methods": "nope"})
    with pytest.raises(ConfigError, match="sets 'seed'"):
        load_spec(None, {"base": {"seed": 3}})
    with pytest.raises(ConfigError, match="unknown config key"):
        load_spec(None, {"base": {"bogus": 1}})


def _sweep_command(tmp_path: Path, grid_yaml: str, *options: str) -> tuple[list[str], Path]:
    """The ``sweep`` command over a grid file written from ``grid_yaml``, and its output root."""
    grid, out = tmp_path / "grid.yaml", tmp_path / "sw"
    grid.write_text(grid_yaml)
    return [sys.executable, "-m", "harness.cli", "sweep", "--grid", str(grid), "--out", str(out), *options], out


@pytest.mark.slow
def test_sweep_runs_skips_and_emits(tmp_path):
    run, out = _sweep_command(tmp_path, "base: {model: tiny-random, limit: 2, eval: {max_new_tokens: 4}}\n"
                              "sequence: arith,choice\norders: latin\nmethods: [vanilla]\nseeds: [0, 1]\n")
    r = subprocess.run(run, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "4 cells, 0 already complete" in r.stderr
    assert (out / "choice-arith" / "seed1" / "vanilla" / "summary.json").exists()
    r = subprocess.run(run, capture_output=True, text=True, timeout=600)
    assert "4 cells, 4 already complete" in r.stderr
    r = subprocess.run([*run, "--emit"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "0 unfinished of 4" in r.stderr
    rep = subprocess.run([sys.executable, "-m", "harness.cli", "report", str(out / "arith-choice" / "seed0")],
                         capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0 and "vanilla" in rep.stdout


@pytest.mark.slow
def test_local_sweep_runs_each_cell_under_a_two_process_launch(tmp_path):
    run, out = _sweep_command(tmp_path, "base: {model: tiny-random, limit: 3, eval: {max_new_tokens: 4}, train: "
                              "{max_steps: 1, batch_size: 2}}\nsequence: arith\nmethods: [sft]\nseeds: [0]\n",
                              "--num-processes", "2")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEMGEN_BENCH_SYNC_LOG": str(tmp_path / "sync")}
    r = subprocess.run(run, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "arith" / "seed0" / "sft" / "summary.json").read_text())
    assert summary["complete"]
    for rank in (0, 1):  # the cell really ran as two processes, which ended training in sync
        (rec,) = [json.loads(x) for x in (tmp_path / f"sync.rank{rank}").read_text().splitlines()]
        assert (rec["rank"], rec["world"], rec["label"]) == (rank, 2, "sft on arith")
    r = subprocess.run(run, capture_output=True, text=True, timeout=600, env=env)
    assert "1 cells, 1 already complete" in r.stderr and "launching" not in r.stderr
