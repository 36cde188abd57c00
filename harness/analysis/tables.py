"""Tables over many runs (methods x orders x seeds): a tidy frame with mean and 95% bootstrap CI per
(method, metric, task), wide views for papers, and CSV / LaTeX (booktabs) / Markdown / JSON export."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from harness import metrics
from harness.analysis import stats
from harness.analysis.runs import RunData
from harness.seeding import derive_seed

LABELS = {"acc": "ACC", "bwt": "BWT", "fwt": "FWT", "forgetting": "Forgetting", "retention": "Retention",
          "learning_acc": "LA", "init": "init", "learned": "learned", "final": "final"}
LOWER_IS_BETTER = {"forgetting"}
MAIN = ("acc", "bwt", "fwt", "forgetting", "retention", "learning_acc")


@dataclass
class Analysis:
    """Everything a report needs: the tidy table, mean matrices per (method, order), run descriptions."""

    tidy: pd.DataFrame
    runs: list[RunData]
    conventions: metrics.Conventions
    B: int
    level: float
    mean_matrices: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)  # (method, order) -> (T+1, T)
    skipped: list = field(default_factory=list)  # unfinished run directories left out

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(r.method for r in self.runs))

    @property
    def orders(self) -> list[str]:
        return list(dict.fromkeys(r.order for r in self.runs))

    @property
    def tasks(self) -> list[str]:
        return self.runs[0].tasks

    def caption(self, what: str, latex: bool = True) -> str:
        models = ", ".join(sorted({r.model for r in self.runs}))
        seeds = ", ".join(map(str, sorted({r.seed for r in self.runs})))
        n = sorted({r.n_samples(t) for r in self.runs for t in r.tasks} - {0})
        n_txt = f"{n[0]}" if len(n) == 1 else f"{n[0]}-{n[-1]}" if n else "?"
        per_method = max(sum(1 for r in self.runs if r.method == m) for m in self.methods)
        pm, pct, arrow = ("$\\pm$", "\\%", "$\\to$") if latex else ("±", "%", "→")
        orders = " | ".join(o.replace("->", arrow) for o in self.orders)
        return (f"{what}. Model {models}; task order(s) {orders}; seeds {seeds}; "
                f"{per_method} run(s) per method, {n_txt} test samples per task per run. "
                f"Mean {pm} half-width of the {int(self.level * 100)}{pct} bootstrap CI ({self.B} resamples over "
                f"test samples within runs and over runs); BWT divisor {self.conventions.bwt_divisor}, forgetting "
                f"{self.conventions.forgetting}, ACC {self.conventions.acc}.")


def analyze(
    runs: Sequence[RunData], conv: str | metrics.Conventions | None = None, B: int = stats.B_DEFAULT,
    seed: int = 0, level: float = stats.LEVEL,
) -> Analysis:
    """Point estimates (mean over runs) and hierarchical bootstrap CIs for every (method, metric, task)."""
    if not runs:
        raise ValueError("no runs to analyse")
    c = metrics.conventions(conv)
    task_set = sorted(runs[0].tasks)
    for r in runs:
        if sorted(r.tasks) != task_set:
            raise ValueError(f"run {r.path} covers tasks {r.tasks}, others {task_set}: report one task set at a time")
    by_method: dict[str, list[RunData]] = defaultdict(list)
    for r in runs:
        by_method[r.method].append(r)
    rows: list[dict[str, Any]] = []
    for method, group in by_method.items():
        points = [stats.run_quantities(r.R, r.tasks, c) for r in group]
        # Independent streams per run and per quantity: a CI does not depend on which other runs or metrics
        # happen to be in the report.
        reps = [stats.run_replicates(r.R, [r.scores[t] for t in r.tasks] if set(r.scores) == set(r.tasks)
                                     else None, r.tasks, c, B,
                                     np.random.default_rng(derive_seed(seed, "within", r.method, r.order, r.seed)))
                for r in group]
        for key in points[0]:
            p = np.array([pt[key] for pt in points])  # (K,)
            rep = np.stack([rp[key] for rp in reps])  # (K, B)
            defined = ~np.isnan(p)
            if not defined.any():
                mean, lo, hi = np.nan, np.nan, np.nan
            else:
                mean = float(p[defined].mean())
                rng = np.random.default_rng(derive_seed(seed, "across", method, *key))
                lo, hi = stats.percentile_ci(stats.hierarchical(rep[defined], rng), level)
            metric, task = key
            tasks_n = task_set if task == "all" else [task]
            rows.append({"method": method, "metric": metric, "task": task, "mean": mean, "ci_low": lo,
                         "ci_high": hi, "n_runs": int(defined.sum()),
                         "n_samples": int(sum(r.n_samples(t) for r in group for t in tasks_n)),
                         "seeds": ",".join(map(str, sorted({r.seed for r in group}))),
                         "orders": len({r.order for r in group}), "model": group[0].model})
    out = Analysis(tidy=pd.DataFrame(rows), runs=list(runs), conventions=c, B=B, level=level)
    for (method, order) in dict.fromkeys((r.method, r.order) for r in runs):
        mats = [r.R for r in runs if r.method == method and r.order == order]
        out.mean_matrices[(method, order)] = np.mean(mats, axis=0)
    return out


def _cell(row: pd.Series, bold: bool, fmt: str, digits: int = 1) -> str:
    if pd.isna(row["mean"]):
        return "--"
    hw = (row["ci_high"] - row["ci_low"]) / 2 if not pd.isna(row["ci_low"]) else np.nan
    pm = "$\\pm$" if fmt == "latex" else "±"
    txt = f"{row['mean']:.{digits}f}" + (f" {pm} {hw:.{digits}f}" if not pd.isna(hw) else "")
    if bold:
        return f"\\textbf{{{txt}}}" if fmt == "latex" else f"**{txt}**"
    return txt


def wide(a: Analysis, kind: str, fmt: str = "md") -> pd.DataFrame:
    """A paper table of strings: ``main`` (methods x ACC/BWT/FWT/...), ``final`` or ``retention`` or
    ``forgetting`` (methods x tasks + average). The best mean per column is bold."""
    t = a.tidy
    if kind == "main":
        cols = [(m, "all", LABELS[m]) for m in MAIN]
    elif kind in ("final", "retention", "forgetting", "bwt", "fwt", "learned", "init"):
        avg = {"final": "acc", "retention": "retention", "forgetting": "forgetting", "bwt": "bwt", "fwt": "fwt",
               "learned": "learning_acc"}.get(kind)
        cols = [(kind, task, task) for task in a.tasks] + ([(avg, "all", "avg")] if avg else [])
    else:
        raise ValueError(f"unknown table {kind!r}; use main, final, retention, forgetting, bwt, fwt, learned or init")
    out = pd.DataFrame(index=pd.Index(a.methods, name="method"))
    for metric, task, label in cols:
        sub = t[(t.metric == metric) & (t.task == task)].set_index("method")
        means = sub["mean"].astype(float)
        best = (means.min() if metric in LOWER_IS_BETTER else means.max()) if means.notna().any() else np.nan
        # Bold the best only when the methods differ (a tie everywhere highlights nothing).
        distinct = means.dropna().nunique() > 1
        out[label] = [_cell(sub.loc[m], distinct and sub.loc[m, "mean"] == best, fmt)
                      if m in sub.index else "--" for m in a.methods]
    return out


def _latex_escape(s: str) -> str:
    return s.replace("\\", "\\textbackslash{}").replace("_", "\\_").replace("&", "\\&").replace("%", "\\%")


def to_latex(a: Analysis, kind: str = "main") -> str:
    """booktabs table (pandas emits \\toprule/\\midrule/\\bottomrule), bold best, +- CI, caption."""
    df = wide(a, kind, "latex")
    df.index = [_latex_escape(m) for m in df.index]
    df.columns = [_latex_escape(c) for c in df.columns]
    what = {"main": "Continual-learning metrics (percent)", "final": "Accuracy on each task after the whole "
            "sequence (percent)", "retention": "Retention a_{T,i}/a_{i,i} per task (percent)"}.get(
        kind, f"{kind} per task (percent)")
    return df.to_latex(escape=False, column_format="l" + "r" * len(df.columns), caption=a.caption(what),
                       label=f"tab:cl-{kind}")


def to_markdown(a: Analysis, kind: str = "main") -> str:
    return wide(a, kind, "md").reset_index().to_markdown(index=False)


def to_csv(a: Analysis) -> str:
    """Tidy: one row per method x metric x task."""
    return a.tidy.to_csv(index=False, float_format="%.4f")


def to_json(a: Analysis) -> dict[str, Any]:
    """Everything: the tidy table, each run's matrix and curves, the mean matrices, the settings."""
    def arr(x: np.ndarray) -> list:
        return np.where(np.isnan(x), None, np.round(x, 6)).tolist()

    return {
        "conventions": a.conventions.__dict__,
        "bootstrap": {"resamples": a.B, "level": a.level, "scheme": "paired over test samples within a run, "
                      "hierarchical over runs (seeds x orders)"},
        "tidy": a.tidy.replace({np.nan: None}).to_dict(orient="records"),
        "runs": [{"path": str(r.path), "method": r.method, "model": r.model, "seed": r.seed, "order": r.tasks,
                  "matrix": arr(r.R), "n_samples": {t: r.n_samples(t) for t in r.tasks},
                  "seen_so_far": {k: arr(v) for k, v in metrics.seen_so_far(r.R).items()},
                  "trigger_rate": {t: arr(v) for t, v in r.trigger.items()}} for r in a.runs],
        "mean_matrices": [{"method": m, "order": o.split("->"), "matrix": arr(R)}
                          for (m, o), R in a.mean_matrices.items()],
    }
