"""Tables over finished runs: one row per method, columns ACC, BWT, FWT, forgetting, retention; CSV/LaTeX/MD."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from harness.store import read_json

COLUMNS = {"acc": "ACC", "bwt": "BWT", "fwt": "FWT", "forgetting": "Forgetting", "retention": "Retention",
           "learning_acc": "LA"}


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Run directories (holding summary.json) at or directly below each path."""
    runs: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"no such run directory: {p}")
        if (p / "summary.json").exists():
            runs.append(p)
        else:
            runs += sorted(q.parent for q in p.glob("*/summary.json"))
    if not runs:
        raise FileNotFoundError(f"no runs (folders with summary.json) under {', '.join(map(str, paths))}")
    return runs


def summary_table(paths: Sequence[str | Path]) -> pd.DataFrame:
    rows = []
    for run in find_runs(paths):
        s = read_json(run / "summary.json")
        row = {"method": s.get("method", run.name), "model": s.get("model"), "seed": s.get("seed"),
               "tasks": "->".join(s.get("tasks", [])), "complete": s.get("complete", False)}
        for key, col in COLUMNS.items():
            row[col] = s.get(key)
        rows.append(row)
    return pd.DataFrame(rows)


def matrix_table(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / "matrix.csv", index_col=0)


def render(df: pd.DataFrame, fmt: str, caption: str | None = None) -> str:
    num = df.select_dtypes("number").columns
    shown = df.copy()
    shown[num] = shown[num].astype(float).round(2)
    if fmt == "csv":
        return df.to_csv(index=False)
    if fmt == "md":
        return shown.to_markdown(index=False)
    if fmt == "latex":
        return shown.to_latex(index=False, float_format="%.2f", caption=caption, na_rep="--")
    raise ValueError(f"unknown format {fmt!r}; use csv, latex or md")
