"""Loading finished run directories (layout in ``harness.store``) into arrays for the analysis.

Per-sample scores come from ``samples/r{row}_{task}.jsonl``. Every row of a column evaluates the same test
examples, so scores are aligned by example id across rows: that pairing is what makes the bootstrap over
evaluation samples respect the correlation between, say, a task's accuracy right after learning it and at the end.
A cell copied from row 0 (a method that never trains) reuses row 0's samples.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harness.report import find_runs
from harness.store import read_json

# Optional per-sample keys a method may record for its trigger (MemGen): decisions to insert latents and the
# delimiter positions at which the trigger was queried. The insertion-rate plot appears only when they exist.
TRIGGER_KEYS = ("trigger_inserted", "trigger_queried")


@dataclass
class RunData:
    """One method's finished run over one task order and one seed."""

    path: Path
    method: str
    model: str
    seed: int
    tasks: list[str]
    R: np.ndarray  # (T+1, T) percent
    probes: list[str] = field(default_factory=list)  # general-ability probes (evaluated every row, never trained)
    P: np.ndarray | None = None  # (T+1, n_probes) percent; None without probes
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # task or probe -> (T+1, n) scores in [0, 1]
    ids: dict[str, list[str]] = field(default_factory=dict)  # task -> (n,) example ids of the score columns, sorted
    n_recorded: dict[str, int] = field(default_factory=dict)  # task -> n, when only the matrix was kept (no scores)
    trigger: dict[str, np.ndarray] = field(default_factory=dict)  # task -> (T+1,) insertion rate; NaN if none
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def order(self) -> str:
        return "->".join(self.tasks)

    def n_samples(self, task: str) -> int:
        s = self.scores.get(task)
        return int(s.shape[1]) if s is not None else int(self.n_recorded.get(task, 0))


def insertion_rate(samples: list[dict[str, Any]]) -> tuple[float, float]:
    """(insertion rate in % of the delimiters the trigger was asked at, insertions per sample) of one cell's
    samples; the rate is NaN when nothing was asked or a sample lacks the trigger keys (no trigger)."""
    ins = [r.get(TRIGGER_KEYS[0]) for r in samples]
    qry = [r.get(TRIGGER_KEYS[1]) for r in samples]
    if any(v is None for v in ins + qry):
        return float("nan"), float("nan")
    asked, done = sum(qry), sum(ins)
    return (100.0 * done / asked if asked else float("nan")), done / max(len(samples), 1)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _cell_samples(run: Path, row: int, task: str) -> list[dict[str, Any]] | None:
    p = run / "samples" / f"r{row}_{task}.jsonl"
    if p.exists():
        return _read_jsonl(p)
    cell = run / "cells" / f"r{row}_{task}.json"
    if cell.exists():
        src = read_json(cell).get("copied_from_row")
        if src is not None and src != row:
            return _cell_samples(run, int(src), task)
    return None


def load_run(path: str | Path) -> RunData:
    """Read a complete run; a clear error names the run when it is unfinished."""
    run = Path(path)
    s = read_json(run / "summary.json")
    if not s.get("complete"):
        raise ValueError(f"run {run} is not complete (some matrix cells are missing); finish it with "
                         f"`memgen-bench run` using the same --out, or leave it out of the report")
    tasks = list(s["tasks"])
    R = np.asarray(s["matrix"], dtype=float)  # (T+1, T)
    probes = list(s.get("probes") or [])
    P = np.asarray(s["probe_matrix"], dtype=float) if probes else None  # (T+1, n_probes)
    data = RunData(path=run, method=s.get("method", run.name), model=s.get("model", "?"), seed=int(s.get("seed", 0)),
                   tasks=tasks, R=R, probes=probes, P=P,
                   config=read_json(run / "config.json") if (run / "config.json").exists() else {})
    # probe columns load like task columns (their names never clash: a probe is not a trained task)
    columns = [(task, R[:, j]) for j, task in enumerate(tasks)] + [(p, P[:, k]) for k, p in enumerate(probes)]
    for task, column in columns:
        rows = [_cell_samples(run, i, task) for i in range(len(tasks) + 1)]
        if any(r is None for r in rows):
            continue  # no per-sample scores: only the across-run bootstrap applies to this task
        # sorted ids: two methods' runs of one (order, seed) then line up column by column for paired differences
        ids = sorted((r["id"] for r in rows[0]), key=str)
        table = np.full((len(rows), len(ids)), np.nan)  # (T+1, n)
        rate = np.full(len(rows), np.nan)  # (T+1,)
        for i, samples in enumerate(rows):
            by_id = {r["id"]: r for r in samples}
            if set(by_id) != set(ids):
                raise ValueError(f"run {run}: row {i} of task {task} evaluated different examples than row 0")
            table[i] = [float(by_id[k]["score"]) for k in ids]
            rate[i] = insertion_rate(samples)[0]
        # The stored cell accuracy is the mean score; disagreement means the samples file is stale.
        if not np.allclose(100.0 * table.mean(axis=1), column, atol=1e-3):
            raise ValueError(f"run {run}: per-sample scores of task {task} do not match matrix.csv; re-run the cells")
        data.scores[task] = table
        data.ids[task] = [str(k) for k in ids]
        if not np.isnan(rate).all():
            data.trigger[task] = rate
    return data


ANALYSIS_JSON = "cl_analysis.json"


def runs_from_analysis(path: str | Path) -> list[RunData]:
    """The runs recorded in a report's ``cl_analysis.json`` (written by ``report --out``): each run's matrix and
    test-sample counts, but no per-sample scores, so a CI over them covers the spread over runs only."""
    doc = read_json(Path(path))
    return [RunData(path=Path(r["path"]), method=r["method"], model=r.get("model", "?"), seed=int(r["seed"]),
                    tasks=list(r["order"]), R=np.array(r["matrix"], dtype=float), probes=list(r.get("probes") or []),
                    P=np.array(r["probe_matrix"], dtype=float) if r.get("probes") else None,
                    n_recorded={t: int(n) for t, n in r.get("n_samples", {}).items()}) for r in doc["runs"]]


def load_runs(paths: list[str | Path], skipped: list[Path] | None = None) -> list[RunData]:
    """Every run at or anywhere below the given paths (run dirs, output roots, sweep roots). A folder holding only a
    report (``cl_analysis.json``, no run below it) gives that report's runs, without per-sample scores. With a
    ``skipped`` list, unfinished runs are left out and appended to it instead of raising."""
    out: list[RunData] = []
    dirs: list[str | Path] = []
    for p in map(Path, paths):
        if (p / ANALYSIS_JSON).exists() and not any(p.rglob("summary.json")):
            out += runs_from_analysis(p / ANALYSIS_JSON)
        else:
            dirs.append(p)
    for f in find_runs(dirs) if dirs else []:
        if skipped is not None and not read_json(f / "summary.json").get("complete"):
            skipped.append(f)
            continue
        out.append(load_run(f))
    if not out:
        raise FileNotFoundError(f"no complete runs under {', '.join(map(str, paths))}")
    return out
