"""Tables over finished runs: one row per method, columns ACC, BWT, FWT, forgetting, retention; CSV/LaTeX/MD.

``analysis_report`` aggregates many runs (methods x task orders x seeds) with bootstrap CIs, writes tidy CSV,
Markdown, LaTeX, JSON and plots (``harness.analysis``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.store import read_json

COLUMNS = {"acc": "ACC", "bwt": "BWT", "fwt": "FWT", "forgetting": "Forgetting", "retention": "Retention",
           "learning_acc": "LA"}
PROBE_COLUMNS = {"probe_drop": "Probe drop", "probe_retention": "Probe retention"}  # when a run has probes


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Run directories (holding summary.json) at or anywhere below each path (sweeps nest ORDER/seedS/METHOD)."""
    runs: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"no such run directory: {p}")
        if (p / "summary.json").exists():
            runs.append(p)
        else:
            runs += sorted(q.parent for q in p.rglob("summary.json"))
    if not runs:
        raise FileNotFoundError(f"no runs (folders with summary.json) under {', '.join(map(str, paths))}")
    return runs


def summary_table(paths: Sequence[str | Path], conventions: str = "gem") -> pd.DataFrame:
    """One row per run; the metrics are recomputed from the stored matrix under ``conventions`` (summary.json
    holds the default ones)."""
    from harness import metrics

    conv = metrics.conventions(conventions)
    rows = []
    for run in find_runs(paths):
        s = read_json(run / "summary.json")
        row = {"method": s.get("method", run.name), "model": s.get("model"), "seed": s.get("seed"),
               "tasks": "->".join(s.get("tasks", [])), "complete": s.get("complete", False)}
        if s.get("complete") and s.get("matrix") is not None:
            s = {**s, **metrics.summarize_with(s["matrix"], conv)}
        for key, col in COLUMNS.items():
            row[col] = s.get(key)
        if s.get("probes"):  # general-ability probes, outside the CL metrics (computed from probe_matrix alone)
            row["probes"] = ",".join(s["probes"])
            for key, col in PROBE_COLUMNS.items():
                row[col] = s.get(key)
        rows.append(row)
    return pd.DataFrame(rows)


def matrix_table(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / "matrix.csv", index_col=0)


def render(df: pd.DataFrame, fmt: str, caption: str | None = None) -> str:
    num = df.select_dtypes("floating").columns  # integers (the seed) are printed as integers, not 0.00
    shown = df.copy()
    shown[num] = shown[num].astype(float).round(2)
    if fmt == "csv":
        return df.to_csv(index=False)
    if fmt == "md":
        return shown.to_markdown(index=False)
    if fmt == "latex":
        return shown.to_latex(index=False, float_format="%.2f", caption=caption, na_rep="--")
    raise ValueError(f"unknown format {fmt!r}; use csv, latex or md")


TABLES = ("main", "final", "retention", "forgetting")


def analysis_report(
    paths: Sequence[str | Path], out: Path | None = None, conventions: str = "gem", resamples: int = 1000,
    plots: bool = False, seed: int = 0, compare: Sequence[str] = (),
) -> tuple[Any, list[Path]]:
    """Mean +- 95% bootstrap CI over every run under ``paths`` (methods x orders x seeds). With ``out``, writes
    ``cl_tidy.csv`` (one row per method x metric x task), ``cl_tables.md``, ``cl_tables.tex``, ``cl_analysis.json``,
    with ``compare`` (``["memgen:sft", ...]``) the paired differences ``cl_compare.csv`` / ``cl_compare.md``, and,
    with ``plots``, PNG+PDF figures under ``out/plots``. Returns the Analysis and the files written."""
    from harness.analysis import tables
    from harness.analysis.runs import load_runs
    from harness.store import atomic_write_json, atomic_write_text

    skipped: list[Path] = []
    a = tables.analyze(load_runs(list(paths), skipped), conventions, B=resamples, seed=seed)
    a.skipped = skipped
    pairs = tables.parse_compare(compare, a.methods)
    for m1, m2 in pairs:
        tables.paired_difference(a, m1, m2)  # computed (and cached on the Analysis) before anything is written
    written: list[Path] = []
    if out is None:
        return a, written
    md = [f"# Continual-learning report\n\n{a.caption('All tables', latex=False)}\n"]
    if skipped:
        md.append("Left out (unfinished): " + ", ".join(map(str, skipped)) + "\n")
    titles = {"main": "Metrics", "final": "Accuracy on each task after the whole sequence (avg = ACC)",
              "retention": "Retention a_T,i / a_i,i per task (%)", "forgetting": "Forgetting per task",
              "probes": "General-ability probes (never trained): drop = init - final, retention = final / init (%)"}
    kinds = (*TABLES, *(("probes",) if a.probes else ()))
    for kind in kinds:
        md.append(f"## {titles[kind]}\n\n{tables.to_markdown(a, kind)}\n")
    for (method, order), R in a.mean_matrices.items():
        tasks = order.split("->")
        P = a.mean_probe_matrices.get((method, order))
        cols = [*tasks, *(f"probe:{p}" for p in a.probes)] if P is not None else tasks
        df = pd.DataFrame(np.hstack([R, P]) if P is not None else R, index=["init", *tasks], columns=cols).round(2)
        md.append(f"## R: {method}, {' -> '.join(tasks)} (mean over seeds)\n\n{df.to_markdown()}\n")
    files = {"cl_tidy.csv": tables.to_csv(a), "cl_tables.md": "\n".join(md),
             "cl_tables.tex": "\n".join(tables.to_latex(a, kind) for kind in kinds)}
    if pairs:
        files["cl_compare.csv"] = tables.compare_table(a, pairs, "csv")
        files["cl_compare.md"] = (f"# Paired differences (first method minus second)\n\n{tables.compare_note(a)}\n\n"
                                  f"{tables.compare_table(a, pairs)}\n")
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        atomic_write_text(out / name, text)
        written.append(out / name)
    atomic_write_json(out / "cl_analysis.json", tables.to_json(a))
    written.append(out / "cl_analysis.json")
    if plots:
        from harness.analysis.plots import all_plots

        written += all_plots(a, out / "plots")
    return a, written
