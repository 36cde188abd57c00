"""``memgen-bench sweep`` validates every cell (harness/preflight.py: options, data, model, the --out lock) before
any cell runs: one bad cell fails the whole sweep with one line naming it, and nothing is written."""

import json

from tests.test_workflow import cli, error_line

GRID = ("base: {model: tiny-random, limit: 2, eval: {max_new_tokens: 4}, train: {max_steps: 1},\n"
        "       method_options: {grpo: {num_generations: 3}}}\n"
        "sequence: arith\nmethods: [vanilla, grpo]\nseeds: [0]\n")


def test_a_bad_cell_fails_the_sweep_before_any_cell_runs(tmp_path):
    (tmp_path / "grid.yaml").write_text(GRID)
    out = tmp_path / "sw"
    r = cli("sweep", "--grid", str(tmp_path / "grid.yaml"), "--out", str(out))
    line = error_line(r)  # exit 2, one line, no traceback
    assert "sweep cell grpo order=arith seed=0:" in line and "num_generations" in line, line
    assert not out.exists(), "the vanilla cell ran (or something was written) before the bad grpo cell was found"
    r = cli("sweep", "--grid", str(tmp_path / "grid.yaml"), "--out", str(out), "--emit")
    assert "sweep cell grpo" in error_line(r) and not out.exists()


def test_a_cell_directory_holding_another_run_fails_the_sweep_up_front(tmp_path):
    (tmp_path / "grid.yaml").write_text("base: {model: tiny-random, limit: 2, eval: {max_new_tokens: 4}}\n"
                                        "sequence: arith\nmethods: [vanilla, sft]\nseeds: [0]\n")
    out = tmp_path / "sw"
    held = out / "arith" / "seed0" / "sft"  # the second cell's directory holds a finished cell of another model
    (held / "cells").mkdir(parents=True)
    (held / "config.json").write_text(json.dumps({"model": "smollm2-135m", "sequence": "arith"}))
    (held / "cells" / "r0_arith.json").write_text(json.dumps({"accuracy": 0.0}))
    r = cli("sweep", "--grid", str(tmp_path / "grid.yaml"), "--out", str(out))
    line = error_line(r)
    assert "sweep cell sft order=arith seed=0:" in line and "holds a run with a different config" in line, line
    assert sorted(p.name for p in (out / "arith" / "seed0").iterdir()) == ["sft"]  # vanilla never started
