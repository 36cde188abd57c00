"""Tables over many runs (methods x orders x seeds): a tidy frame with mean and 95% bootstrap CI per
(method, metric, task), wide views for papers, and CSV / LaTeX (booktabs) / Markdown / JSON export."""

from __future__ import annotations

import re
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
          "learning_acc": "LA", "init": "init", "learned": "learned", "final": "final", "probe_drop": "Probe drop",
          "probe_retention": "Probe retention"}
LOWER_IS_BETTER = {"forgetting", "probe_drop"}
MAIN = ("acc", "bwt", "fwt", "forgetting", "retention", "learning_acc")
PROBE_MAIN = ("probe_drop", "probe_retention")  # in the main table when the runs have probes


@dataclass
class Analysis:
    """Everything a report needs: the tidy table, mean matrices per (method, order), run descriptions."""

    tidy: pd.DataFrame
    runs: list[RunData]
    conventions: metrics.Conventions
    B: int
    level: float
    seed: int = 0
    mean_matrices: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)  # (method, order) -> (T+1, T)
    mean_probe_matrices: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)  # -> (T+1, n_probes)
    skipped: list = field(default_factory=list)  # unfinished run directories left out
    paired: dict[tuple[str, str], pd.DataFrame] = field(default_factory=dict)  # (a, b) sorted -> paired differences

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(r.method for r in self.runs))

    @property
    def orders(self) -> list[str]:
        return list(dict.fromkeys(r.order for r in self.runs))

    @property
    def tasks(self) -> list[str]:
        return self.runs[0].tasks

    @property
    def probes(self) -> list[str]:
        return self.runs[0].probes

    def caption(self, what: str, latex: bool = True) -> str:
        esc = latex_escape if latex else str
        models = ", ".join(esc(m) for m in sorted({r.model for r in self.runs}))
        seeds = ", ".join(map(str, sorted({r.seed for r in self.runs})))
        n = sorted({r.n_samples(t) for r in self.runs for t in r.tasks} - {0})
        n_txt = f"{n[0]}" if len(n) == 1 else f"{n[0]}-{n[-1]}" if n else "?"
        per_method = max(sum(1 for r in self.runs if r.method == m) for m in self.methods)
        pm, pct, arrow = ("$\\pm$", "\\%", " $\\to$ ") if latex else ("±", "%", " → ")
        orders = " | ".join(arrow.join(esc(t) for t in o.split("->")) for o in self.orders)
        no_samples = sum(1 for r in self.runs if not r.scores)
        c = self.conventions
        return (f"{what}. Model {models}; task order(s) {orders}; seeds {seeds}; "
                f"{per_method} run(s) per method, {n_txt} test samples per task per run. "
                f"Mean {pm} half-width of the {int(self.level * 100)}{pct} bootstrap CI ({self.B} resamples: runs "
                f"within each task order, test samples within each drawn run); bold: best where the paired CI of "
                f"its difference to the runner-up excludes 0. BWT divisor {c.bwt_divisor}, FWT divisor "
                f"{c.fwt_divisor}, forgetting {c.forgetting}, ACC {c.acc}."
                + (f" {no_samples} run(s) without per-sample scores: their test-sample noise is not in the CI."
                   if no_samples else ""))


def _pools(runs: Sequence[RunData], S: int, B: int, conv: metrics.Conventions,
           rng: np.random.Generator) -> dict[tuple[str, str], np.ndarray]:
    """(metric, task) -> (B, S) fresh within-run bootstrap replicates of one run (``runs`` of length 1) or of the
    difference between two runs of one (order, seed) (length 2: the same resampled test samples for both)."""
    first = runs[0]
    idx = [stats.resample_indices(first.n_samples(t), B * S, rng) if all(t in r.scores for r in runs) else None
              for t in first.tasks]
    # probe samples are drawn after the tasks', so the tasks' replicates do not depend on whether there are probes
    pidx = [stats.resample_indices(first.n_samples(p), B * S, rng) if all(p in r.scores for r in runs) else None
            for p in first.probes]
    q = [{**stats.quantities(stats.resampled_matrices(r.R, [r.scores.get(t) for t in r.tasks], idx, B * S), r.tasks,
                             conv),
          **(stats.probe_quantities(stats.resampled_matrices(r.P, [r.scores.get(p) for p in r.probes], pidx,
                                                             B * S), r.probes) if r.probes else {})}
         for r in runs]
    out = q[0] if len(q) == 1 else {k: q[0][k] - q[1][k] for k in q[0]}
    return {k: v.reshape(B, S) for k, v in out.items()}


def _interval(points: list[dict], pools: list[dict], strata: list[str], sampled: list[bool], key: tuple[str, str],
              level: float, rng: np.random.Generator) -> tuple[float, float, float, int]:
    """(mean over the runs where the quantity is defined, CI low, CI high, number of those runs)."""
    p = np.array([pt[key] for pt in points])  # (K,)
    defined = ~np.isnan(p)
    if not defined.any():
        return np.nan, np.nan, np.nan, 0
    W = np.stack([pl[key] for pl in pools])  # (K, B, S)
    kept = [o for o, d in zip(strata, defined, strict=True) if d]
    if max(kept.count(o) for o in kept) < 2 and not any(s for s, d in zip(sampled, defined, strict=True) if d):
        # one run per order and no per-sample scores: no source of noise to resample, no interval (not 0 width)
        return float(p[defined].mean()), np.nan, np.nan, int(defined.sum())
    lo, hi = stats.percentile_ci(stats.hierarchical(p, W, strata, rng), level)
    return float(p[defined].mean()), lo, hi, int(defined.sum())


def _slots(strata: list[str]) -> int:
    return max(strata.count(o) for o in strata)


def _points(r: RunData, c: metrics.Conventions) -> dict[tuple[str, str], float]:
    """Every quantity of one run: the CL metrics of R (trained tasks only) and the probe metrics of P."""
    return {**stats.run_quantities(r.R, r.tasks, c), **stats.run_probe_quantities(r.P, r.probes)}


def _counted(metric: str, task: str, tasks: list[str], probes: list[str]) -> list[str]:
    """The columns whose test samples a (metric, task) row counts."""
    if task != "all":
        return [task]
    return probes if metric in stats.PROBE_METRICS else tasks


def analyze(
    runs: Sequence[RunData], conv: str | metrics.Conventions | None = None, B: int = stats.B_DEFAULT,
    seed: int = 0, level: float = stats.LEVEL,
) -> Analysis:
    """Point estimates (mean over runs) and hierarchical bootstrap CIs for every (method, metric, task)."""
    if not runs:
        raise ValueError("no runs to analyse")
    stats.check_resamples(B)
    c = metrics.conventions(conv)
    task_set = sorted(runs[0].tasks)
    for r in runs:
        if sorted(r.tasks) != task_set:
            raise ValueError(f"run {r.path} covers tasks {r.tasks}, others {task_set}: report one task set at a time")
        if r.probes != runs[0].probes:
            raise ValueError(f"run {r.path} has probes {r.probes or 'none'}, {runs[0].path} "
                             f"{runs[0].probes or 'none'}: report one probe set at a time")
    by_method: dict[str, list[RunData]] = defaultdict(list)
    for r in runs:
        by_method[r.method].append(r)
    rows: list[dict[str, Any]] = []
    for method, group in by_method.items():
        strata = [r.order for r in group]
        S = _slots(strata)
        points = [_points(r, c) for r in group]
        # Independent streams per run and per quantity: a CI does not depend on which other runs or metrics
        # happen to be in the report.
        pools = [_pools([r], S, B, c, np.random.default_rng(derive_seed(seed, "within", r.method, r.order, r.seed)))
                 for r in group]
        for key in points[0]:
            rng = np.random.default_rng(derive_seed(seed, "across", method, *key))
            mean, lo, hi, n_runs = _interval(points, pools, strata, [bool(r.scores) for r in group], key, level,
                                             rng)
            metric, task = key
            tasks_n = _counted(metric, task, task_set, runs[0].probes)
            rows.append({"method": method, "metric": metric, "task": task, "mean": mean, "ci_low": lo,
                         "ci_high": hi, "n_runs": n_runs,
                         "n_samples": int(sum(r.n_samples(t) for r in group for t in tasks_n)),
                         "seeds": ",".join(map(str, sorted({r.seed for r in group}))),
                         "orders": len({r.order for r in group}), "model": group[0].model})
    out = Analysis(tidy=pd.DataFrame(rows), runs=list(runs), conventions=c, B=B, level=level, seed=seed)
    for (method, order) in dict.fromkeys((r.method, r.order) for r in runs):
        mats = [r.R for r in runs if r.method == method and r.order == order]
        out.mean_matrices[(method, order)] = np.mean(mats, axis=0)
        if runs[0].probes:
            out.mean_probe_matrices[(method, order)] = np.mean(
                [r.P for r in runs if r.method == method and r.order == order], axis=0)
    return out


def pair_runs(runs: Sequence[RunData], a: str, b: str) -> list[tuple[RunData, RunData]]:
    """The runs of methods ``a`` and ``b`` over the same (task order, seed), checked to score the same examples."""
    def by_key(method: str) -> dict[tuple[str, int], RunData]:
        found: dict[tuple[str, int], RunData] = {}
        for r in runs:
            if r.method == method:
                if (r.order, r.seed) in found:
                    raise ValueError(f"two runs of {method} with order {r.order} and seed {r.seed} "
                                     f"({found[(r.order, r.seed)].path}, {r.path}): report one of them")
                found[(r.order, r.seed)] = r
        if not found:
            have = ", ".join(dict.fromkeys(r.method for r in runs))
            raise ValueError(f"no runs of method {method!r} to compare; the runs hold {have}")
        return found

    ra, rb = by_key(a), by_key(b)
    shared = [k for k in ra if k in rb]
    if not shared:
        raise ValueError(f"{a} and {b} share no (task order, seed): run both on the same orders and seeds to pair them")
    for k in shared:
        for t in ra[k].tasks:
            if t in ra[k].scores and t in rb[k].scores and ra[k].ids[t] != rb[k].ids[t]:
                raise ValueError(f"{ra[k].path} and {rb[k].path} scored different test examples of {t}: pair runs "
                                 f"made with the same seed and eval limit")
    return [(ra[k], rb[k]) for k in shared]


def paired_difference(an: Analysis, a: str, b: str) -> pd.DataFrame:
    """Mean difference a - b of every (metric, task) with its 95% CI, paired over the shared (order, seed) runs and,
    within each, the same resampled test samples for both methods (runs resampled within task orders)."""
    x, y = sorted((a, b))
    if (x, y) not in an.paired:
        pairs = pair_runs(an.runs, x, y)
        strata = [ra.order for ra, _ in pairs]
        S = _slots(strata)
        c = an.conventions
        points = [{k: v - qb[k] for k, v in _points(ra, c).items()} for ra, rb in pairs for qb in [_points(rb, c)]]
        pools = [_pools([ra, rb], S, an.B, c, np.random.default_rng(derive_seed(an.seed, "pair", x, y, ra.order,
                                                                                  ra.seed))) for ra, rb in pairs]
        rows = []
        for key in points[0]:
            rng = np.random.default_rng(derive_seed(an.seed, "pair-across", x, y, *key))
            mean, lo, hi, n = _interval(points, pools, strata, [bool(ra.scores and rb.scores) for ra, rb in pairs],
                                        key, an.level, rng)
            tasks_n = _counted(key[0], key[1], an.tasks, an.probes)
            rows.append({"a": x, "b": y, "metric": key[0], "task": key[1], "diff": mean, "ci_low": lo, "ci_high": hi,
                         "n_pairs": n, "n_samples": int(sum(ra.n_samples(t) for ra, _ in pairs for t in tasks_n))})
        an.paired[(x, y)] = pd.DataFrame(rows)
    df = an.paired[(x, y)].copy()
    if (a, b) != (x, y):  # a - b = -(b - a): the same replicates, mirrored
        df["a"], df["b"] = a, b
        df["diff"], df["ci_low"], df["ci_high"] = -df["diff"], -df["ci_high"], -df["ci_low"]
    df["excludes_zero"] = (df["ci_low"] > 0) | (df["ci_high"] < 0)
    return df


def parse_compare(specs: Sequence[str], methods: Sequence[str]) -> list[tuple[str, str]]:
    """``["memgen:sft", ...]`` -> [("memgen", "sft"), ...]; a one-line error names a bad spec or method."""
    out = []
    for spec in specs:
        a, sep, b = spec.partition(":")
        if not sep or not a or not b or a == b:
            raise ValueError(f"bad --compare {spec!r}: use METHOD_A:METHOD_B, e.g. memgen:sft")
        for m in (a, b):
            if m not in methods:
                raise ValueError(f"--compare {spec!r}: no runs of method {m!r}; the runs hold {', '.join(methods)}")
        out.append((a, b))
    return out


def compare_tidy(an: Analysis, pairs: Sequence[tuple[str, str]]) -> pd.DataFrame:
    """One row per comparison x metric x task (the paired differences)."""
    return pd.concat([paired_difference(an, a, b) for a, b in pairs], ignore_index=True)


def compare_note(an: Analysis) -> str:
    return (f"Mean over the (task order, seed) runs both methods share of the per-run difference, with the "
            f"{int(an.level * 100)}% bootstrap CI ({an.B} resamples: shared runs within each task order, the same "
            f"resampled test samples for both methods within each drawn run). Conventions: BWT divisor "
            f"{an.conventions.bwt_divisor}, FWT divisor {an.conventions.fwt_divisor}, forgetting "
            f"{an.conventions.forgetting}, ACC {an.conventions.acc}.")


def compare_table(an: Analysis, pairs: Sequence[tuple[str, str]], fmt: str = "md") -> str:
    """The averaged metrics of each comparison: difference, 95% CI, pairs of runs, and whether the CI excludes 0."""
    df = compare_tidy(an, pairs)
    df = df[df.task == "all"]
    shown = pd.DataFrame({
        "comparison": df["a"] + " - " + df["b"], "metric": [LABELS[m] for m in df.metric],
        "difference": df["diff"].map(lambda v: "--" if pd.isna(v) else f"{v:+.2f}"),
        f"{int(an.level * 100)}% CI": [("--" if pd.isna(lo) else f"[{lo:+.2f}, {hi:+.2f}]")
                                       for lo, hi in zip(df.ci_low, df.ci_high, strict=True)],
        "pairs": df["n_pairs"], "excludes 0": df["excludes_zero"].map({True: "yes", False: "no"}),
    })
    if fmt == "csv":
        return df.to_csv(index=False, float_format="%.4f")
    return shown.to_markdown(index=False)


def _cell(row: pd.Series, bold: bool, fmt: str, digits: int = 1) -> str:
    if pd.isna(row["mean"]):
        return "--"
    hw = (row["ci_high"] - row["ci_low"]) / 2 if not pd.isna(row["ci_low"]) else np.nan
    pm = "$\\pm$" if fmt == "latex" else "±"
    txt = f"{row['mean']:.{digits}f}" + (f" {pm} {hw:.{digits}f}" if not pd.isna(hw) else "")
    if bold:
        return f"\\textbf{{{txt}}}" if fmt == "latex" else f"**{txt}**"
    return txt


def _significantly_best(a: Analysis, metric: str, task: str, means: pd.Series) -> str | None:
    """The method with the best mean when the paired CI of its difference to the runner-up excludes 0, else None
    (a tie, fewer than two methods, or methods that share no (order, seed) run to pair)."""
    ranked = means.dropna().sort_values(ascending=metric in LOWER_IS_BETTER)
    if len(ranked) < 2 or ranked.iloc[0] == ranked.iloc[1]:
        return None
    best, runner = str(ranked.index[0]), str(ranked.index[1])
    try:
        d = paired_difference(a, best, runner)
    except ValueError:
        return None
    row = d[(d.metric == metric) & (d.task == task)]
    return best if len(row) and bool(row["excludes_zero"].iloc[0]) else None


def wide(a: Analysis, kind: str, fmt: str = "md") -> pd.DataFrame:
    """A paper table of strings: ``main`` (methods x ACC/BWT/FWT/...), ``final`` or ``retention`` or
    ``forgetting`` (methods x tasks + average). The best mean per column is bold only where its paired difference
    to the runner-up has a 95% CI that excludes 0."""
    t = a.tidy
    if kind == "main":
        cols = [(m, "all", LABELS[m]) for m in (*MAIN, *(PROBE_MAIN if a.probes else ()))]
    elif kind == "probes":  # per probe: init minus final, and final / init (%), then the means over probes
        cols = [(m, p, f"{p} {'drop' if m == 'probe_drop' else 'retention'}") for p in a.probes for m in PROBE_MAIN]
        cols += [(m, "all", LABELS[m]) for m in PROBE_MAIN]
    elif kind in ("final", "retention", "forgetting", "bwt", "fwt", "learned", "init"):
        avg = {"final": "acc", "retention": "retention", "forgetting": "forgetting", "bwt": "bwt", "fwt": "fwt",
               "learned": "learning_acc"}.get(kind)
        cols = [(kind, task, task) for task in a.tasks] + ([(avg, "all", "avg")] if avg else [])
    else:
        raise ValueError(f"unknown table {kind!r}; use main, final, retention, forgetting, bwt, fwt, learned, init "
                         f"or probes")
    out = pd.DataFrame(index=pd.Index(a.methods, name="method"))
    for metric, task, label in cols:
        sub = t[(t.metric == metric) & (t.task == task)].set_index("method")
        best = _significantly_best(a, metric, task, sub["mean"].astype(float))
        out[label] = [_cell(sub.loc[m], m == best, fmt) if m in sub.index else "--" for m in a.methods]
    return out


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(s: str) -> str:
    """Text-mode LaTeX for a name (method, task, model): every special character escaped."""
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(s))


LATEX_TITLES = {"main": "Continual-learning metrics (percent)",
                "final": "Accuracy on each task after the whole sequence (percent)",
                "retention": "Retention $a_{T,i}/a_{i,i}$ per task (percent)",
                "probes": "General-ability probes: drop (init minus final) and retention (final / init, percent)"}


def to_latex(a: Analysis, kind: str = "main") -> str:
    """booktabs table (pandas emits \\toprule/\\midrule/\\bottomrule), bold best, +- CI, caption."""
    df = wide(a, kind, "latex")
    df.index = [latex_escape(m) for m in df.index]
    df.columns = [latex_escape(c) for c in df.columns]
    what = LATEX_TITLES.get(kind, f"{latex_escape(kind)} per task (percent)")
    label = "tab:cl-" + re.sub(r"[^A-Za-z0-9-]", "-", kind)  # \label takes no special characters safely
    return df.to_latex(escape=False, column_format="l" + "r" * len(df.columns), caption=a.caption(what),
                       label=label)


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
        "bootstrap": {"resamples": a.B, "level": a.level, "scheme": "hierarchical: runs resampled within each task "
                      "order, a fresh paired resample of test samples within each drawn run, seed spread adjusted "
                      "for the test-sample noise it already holds (harness/analysis/stats.py)"},
        "comparisons": [r for df in a.paired.values() for r in df.replace({np.nan: None}).to_dict(orient="records")],
        "tidy": a.tidy.replace({np.nan: None}).to_dict(orient="records"),
        "runs": [{"path": str(r.path), "method": r.method, "model": r.model, "seed": r.seed, "order": r.tasks,
                  "matrix": arr(r.R), "n_samples": {t: r.n_samples(t) for t in [*r.tasks, *r.probes]},
                  **({"probes": r.probes, "probe_matrix": arr(r.P)} if r.probes else {}),
                  "seen_so_far": {k: arr(v) for k, v in metrics.seen_so_far(r.R).items()},
                  "trigger_rate": {t: arr(v) for t, v in r.trigger.items()}} for r in a.runs],
        "mean_matrices": [{"method": m, "order": o.split("->"), "matrix": arr(R),
                           **({"probes": a.probes, "probe_matrix": arr(a.mean_probe_matrices[(m, o)])}
                              if (m, o) in a.mean_probe_matrices else {})}
                          for (m, o), R in a.mean_matrices.items()],
    }
