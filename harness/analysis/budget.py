"""The budget table of ``memgen-bench report``: what each run (or, with ``--ci``, each method over its runs) was
given to learn its sequence, from ``summary.json["budget"]`` (summed per run by ``harness.budget.run_budget``).

A cell is empty where a method did not record the quantity (never shown as 0); ``notes`` carries a method's own
account of how it departs from the budget rule (README "Budgets")."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from harness.budget import BUDGET_KEYS
from harness.report import find_runs
from harness.store import read_json

COLUMNS = {"examples_seen": "examples", "optimizer_steps": "steps", "train_tokens": "train tok",
           "generated_tokens": "gen tok", "trainable_params": "params", "peak_memory_mb": "peak MB",
           "wall_seconds": "train s"}


def run_rows(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """One row per finished run below ``paths``: method, seed, task order and the run's budget (None where not
    recorded). Unfinished runs are left out, as in the metric tables (their budget covers only some stages)."""
    rows = []
    for run in find_runs(paths):
        s = read_json(run / "summary.json")
        if not s.get("complete"):
            continue
        b = s.get("budget") or {}
        rows.append({"method": s.get("method", run.name), "seed": s.get("seed"),
                     "tasks": "->".join(s.get("tasks", [])), "stages": b.get("stages"),
                     **{k: b.get(k) for k in BUDGET_KEYS},
                     "memory": b.get("peak_memory_kind"), "notes": b.get("budget_notes", "")})
    return rows


def budget_table(paths: Sequence[str | Path], aggregate: bool = False) -> pd.DataFrame:
    """The budget per run, or with ``aggregate`` the mean per method over its runs (``runs`` counts them; a
    quantity some run did not record stays empty)."""
    df = pd.DataFrame(run_rows(paths))
    if aggregate:
        out = []
        for method, g in df.groupby("method", sort=False):
            row: dict[str, Any] = {"method": method, "runs": len(g), "stages": float(g["stages"].mean())}
            for k in BUDGET_KEYS:
                vals = g[k]
                row[k] = None if vals.isna().any() else float(vals.astype(float).mean())
            row["notes"] = "; ".join(dict.fromkeys(n for n in g["notes"] if n))
            out.append(row)
        df = pd.DataFrame(out)
    else:
        df = df.drop(columns=["memory"])
    return df.rename(columns=COLUMNS)


def render_budget(df: pd.DataFrame, fmt: str) -> str:
    """The table as md, csv or latex; numbers as integers except seconds (one decimal)."""
    shown = df.copy()
    for col in COLUMNS.values():
        if col in shown:
            digits = 1 if col == "train s" else 0
            shown[col] = [("" if pd.isna(v) else f"{float(v):,.{digits}f}") for v in shown[col]]
    if fmt == "csv":
        return df.to_csv(index=False)
    if fmt == "latex":
        return shown.to_latex(index=False, caption="Training budget per run (harness/budget.py)")
    return shown.to_markdown(index=False)


def write_budget(df: pd.DataFrame, out: Path) -> Path:
    """``budget.csv`` under ``out`` (the report's folder)."""
    from harness.store import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "budget.csv", df.to_csv(index=False))
    return out / "budget.csv"
