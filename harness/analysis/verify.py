"""Re-run chosen cells of an existing run and report the drift per cell.

A cell in row 0 is re-evaluated with a freshly built method; a cell in row i > 0 is re-evaluated from the
method's checkpoint after stage i (``checkpoints/stage{i}``), or, with ``retrain``, by restoring stage i-1 and
training on task i again (which also checks that training is deterministic). Seeds are derived exactly as the
runner derives them, so on the same machine and software a faithful run shows zero drift.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from harness.config import RunConfig, from_dict
from harness.methods import build_method
from harness.models import load_run_model
from harness.runner import cell_name, evaluate
from harness.seeding import derive_seed, set_seed
from harness.store import read_json
from tasks.registry import get_task


def parse_cells(spec: str | None, tasks: Sequence[str]) -> list[tuple[int, str]]:
    """``None``/"all" -> every cell; else comma-separated ``r{row}_{task}`` names or bare rows ``r2`` / ``2``."""
    T = len(tasks)
    if spec is None or spec.strip() in ("", "all"):
        return [(i, t) for i in range(T + 1) for t in tasks]
    out: list[tuple[int, str]] = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        m = re.fullmatch(r"r?(\d+)(?:_(.+))?", item)
        if not m or int(m.group(1)) > T or (m.group(2) and m.group(2) not in tasks):
            raise ValueError(f"bad cell {item!r}; use r{{row}}_{{task}} with row 0..{T} and task in "
                             f"{', '.join(tasks)}, or a bare row like r2")
        row = int(m.group(1))
        out += [(row, m.group(2))] if m.group(2) else [(row, t) for t in tasks]
    return list(dict.fromkeys(out))


def verify_run(
    run_dir: str | Path, cells: str | None = None, retrain: bool = False,
    on_cell: Callable[[dict[str, Any]], None] | None = None,
) -> pd.DataFrame:
    """Columns: row, task, stored, now, delta (percentage points), changed (samples whose score changed), n."""
    run = Path(run_dir)
    if not (run / "summary.json").exists():
        raise FileNotFoundError(f"no run at {run} (summary.json missing)")
    summary = read_json(run / "summary.json")
    cfg: RunConfig = from_dict(RunConfig, read_json(run / "config.json"))
    method_name = summary.get("method") or cfg.methods[0]
    tasks = list(summary["tasks"])
    wanted = parse_cells(cells, tasks)
    by_row: dict[int, list[str]] = defaultdict(list)
    for row, task in wanted:
        if not (run / "cells" / f"{cell_name(row, task)}.json").exists():
            raise ValueError(f"cell {cell_name(row, task)} was never computed in {run}; nothing to compare")
        by_row[row].append(task)
    task_objs = {t: get_task(t, cfg.data_dir) for t in tasks}
    results = []
    for row in sorted(by_row):
        lm = load_run_model(cfg)
        set_seed(derive_seed(cfg.seed, "init"))
        method = build_method(method_name, lm, cfg)
        trains = getattr(method, "trains", True)
        if row > 0 and trains:
            if retrain:
                if row > 1:
                    method.load(run / "checkpoints" / f"stage{row - 1}")
                task = task_objs[tasks[row - 1]]
                method.train_on_task(task, task.load("train", limit=cfg.train_limit, seed=cfg.seed), row)
            else:
                ckpt = run / "checkpoints" / f"stage{row}"
                if not (ckpt / "DONE").exists():
                    raise FileNotFoundError(f"checkpoint {ckpt} is missing or incomplete; verify row {row} with "
                                            f"--retrain, or choose other cells")
                method.load(ckpt)
        for name in by_row[row]:
            task = task_objs[name]
            examples = task.load("test", limit=cfg.eval_limit, seed=cfg.seed)
            # Rows of a non-training method were copied from row 0, which was evaluated under row 0's seed.
            set_seed(derive_seed(cfg.seed, "eval", row if trains else 0, name))
            budget = cfg.eval.max_new_tokens or task.max_new_tokens
            res, samples = evaluate(method, task, examples, budget, lm.tokenizer)
            stored = read_json(run / "cells" / f"{cell_name(row, name)}.json")
            src_row = stored.get("copied_from_row", row)
            old_path = run / "samples" / f"{cell_name(src_row, name)}.jsonl"
            changed = None
            if old_path.exists():
                import json

                old = {r["id"]: r["score"] for r in map(json.loads, old_path.read_text().splitlines()) if r}
                changed = sum(1 for s in samples if old.get(s["id"]) != s["score"])
            info = {"row": row, "task": name, "stored": stored["accuracy"], "now": res.accuracy,
                    "delta": res.accuracy - stored["accuracy"], "changed": changed, "n": res.n}
            results.append(info)
            if on_cell:
                on_cell(info)
    return pd.DataFrame(results)
