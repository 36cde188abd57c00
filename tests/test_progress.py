"""Progress inside an evaluation cell (harness/progress.py): ETA arithmetic, when a plain line is due, and a
non-terminal CLI run whose log holds the periodic progress lines of each cell."""

import re

from harness.progress import CellProgress, advance, cell_progress, eta_seconds, format_duration
from tests.test_workflow import cli


def test_eta_and_duration():
    assert eta_seconds(8, 32, 10.0) == 30.0  # 24 left at 8 per 10 s
    assert eta_seconds(0, 32, 5.0) is None and eta_seconds(32, 32, 7.0) == 0.0
    assert format_duration(3725.4) == "1:02:05" and format_duration(None) == "?"


def test_a_line_is_due_each_quarter_or_every_30_seconds():
    p = CellProgress(total=8)
    t0 = p.started
    p.done = 1  # 1/8: no quarter yet, 1 s in
    assert not p.line_due(t0 + 1)
    p.done = 2  # a quarter
    assert p.line_due(t0 + 2) and not p.line_due(t0 + 3)
    p.done = 3  # still the first quarter, but 30 s since the last line
    assert p.line_due(t0 + 32.0)
    p.done = 8  # done
    assert p.line_due(t0 + 33)


def test_advance_counts_only_inside_a_cell():
    seen = []
    advance(3, 10)  # outside a cell: nothing happens
    with cell_progress(4, seen.append) as p:
        advance(2, 20)
        advance(2, 6)
    advance(5)
    assert (p.done, p.tokens) == (4, 26)
    assert [s["done"] for s in seen] == [2, 4] and seen[-1]["eta_s"] == 0.0
    assert seen[-1]["text"].startswith("4/4 examples, ") and " tok/s, " in seen[-1]["text"]


def test_non_terminal_log_holds_the_cells_progress_lines(tmp_path):
    r = cli("run", "--model", "tiny-random", "--sequence", "arith", "--limit", "4", "--set", "train.max_steps=1",
            "--set", "eval.max_new_tokens=4", "--set", "eval.batch_size=1", "--methods", "vanilla",
            "--out", str(tmp_path / "runs"))
    assert r.returncode == 0, r.stderr[-2000:]
    log = r.stdout + r.stderr
    # batch size 1: each of the 4 examples completes a quarter of the cell, so each gets its line
    lines = re.findall(r"vanilla  eval row 0 arith: (\d)/4 examples, [\d.]+ tok/s, elapsed \d+:\d\d:\d\d, "
                       r"ETA \d+:\d\d:\d\d", log)
    assert lines == ["1", "2", "3", "4"], log[-3000:]
