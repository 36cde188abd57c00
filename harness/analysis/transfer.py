"""Cross-domain transfer (the paper's generalisation study): train a fresh method on one source task (or all
tasks of one domain, in sequence order), evaluate on every task, report target accuracy minus ``init``.

Layout of ``OUT/<method>/``: ``config.json``; ``cells/init_{target}.json`` and ``cells/{source}_{target}.json``
(accuracy, n); ``samples/`` with the same names (per-sample scores, paired with init's for the bootstrap);
``transfer.json`` (the table). Cells are written atomically and skipped when present, so a killed run resumes;
a source whose cells are all present is not retrained.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.analysis import stats
from harness.config import RunConfig, to_dict
from harness.methods import build_method
from harness.models import load_run_model
from harness.runner import evaluate
from harness.seeding import derive_seed, set_seed
from harness.store import atomic_write_json, atomic_write_jsonl, read_json
from tasks.registry import get_task, resolve_sequence


def source_units(tasks: Sequence[str], by: str, domains: dict[str, str]) -> dict[str, list[str]]:
    """Source name -> tasks trained on (in sequence order): one per task, or one per domain."""
    if by == "task":
        return {t: [t] for t in tasks}
    if by == "domain":
        out: dict[str, list[str]] = {}
        for t in tasks:
            out.setdefault(domains[t], []).append(t)
        return out
    raise ValueError(f"unknown transfer unit {by!r}; use task or domain")


def run_transfer(
    method_name: str, cfg: RunConfig, out: Path, by: str = "task",
    on_event: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    notify = on_event or (lambda kind, info: None)
    names = resolve_sequence(cfg.sequence)
    tasks = {n: get_task(n, cfg.data_dir) for n in names}
    units = source_units(names, by, {n: t.domain for n, t in tasks.items()})
    out.mkdir(parents=True, exist_ok=True)
    cfg_dict = {**to_dict(cfg), "methods": [method_name], "transfer_by": by}
    if (out / "config.json").exists() and read_json(out / "config.json") != cfg_dict:
        raise ValueError(f"{out} holds a transfer run with a different config; use another --out")
    atomic_write_json(out / "config.json", cfg_dict)
    tests = {n: t.load("test", limit=cfg.eval_limit, seed=cfg.seed) for n, t in tasks.items()}

    def cells_done(prefix: str) -> bool:
        return all((out / "cells" / f"{prefix}_{n}.json").exists() for n in names)

    for prefix, train_on in [("init", []), *units.items()]:
        if cells_done(prefix):
            continue
        lm = load_run_model(cfg)  # fresh weights for every source
        set_seed(derive_seed(cfg.seed, "init"))
        method = build_method(method_name, lm, cfg)
        for stage, name in enumerate(train_on, 1):
            notify("train_start", {"method": method_name, "source": prefix, "task": name})
            method.train_on_task(tasks[name], tasks[name].load("train", limit=cfg.train_limit, seed=cfg.seed),
                                 stage)
        for name, task in tasks.items():
            cell = out / "cells" / f"{prefix}_{name}.json"
            if cell.exists():
                continue
            set_seed(derive_seed(cfg.seed, "transfer-eval", prefix, name))
            budget = cfg.eval.max_new_tokens or task.max_new_tokens
            res, samples = evaluate(method, task, tests[name], budget, lm.tokenizer)
            atomic_write_jsonl(out / "samples" / f"{prefix}_{name}.jsonl", samples)
            atomic_write_json(cell, {"source": prefix, "target": name, "trained_on": train_on, **res.__dict__})
            notify("eval_end", {"method": method_name, "source": prefix, "task": name, **res.__dict__})
    table = {"method": method_name, "model": cfg.model, "seed": cfg.seed, "targets": names, "sources": units,
             "init": {n: read_json(out / "cells" / f"init_{n}.json")["accuracy"] for n in names},
             "after": {s: {n: read_json(out / "cells" / f"{s}_{n}.json")["accuracy"] for n in names}
                       for s in units}}
    atomic_write_json(out / "transfer.json", table)
    return table


def _scores(run: Path, prefix: str, target: str) -> dict[str, float]:
    lines = (run / "samples" / f"{prefix}_{target}.jsonl").read_text(encoding="utf-8").splitlines()
    return {r["id"]: float(r["score"]) for r in map(json.loads, lines) if r}


def find_transfer_runs(paths: Sequence[str | Path]) -> list[Path]:
    found: list[Path] = []
    for p in map(Path, paths):
        if (p / "transfer.json").exists():
            found.append(p)
        else:
            found += sorted(q.parent for q in p.glob("**/transfer.json"))
    if not found:
        raise FileNotFoundError(f"no transfer runs (folders with transfer.json) under {', '.join(map(str, paths))}")
    return found


def transfer_table(paths: Sequence[str | Path], B: int = stats.B_DEFAULT, seed: int = 0,
                   level: float = stats.LEVEL) -> pd.DataFrame:
    """Tidy: method, source, target, init, after, delta (= after - init, points) with a bootstrap CI that is
    paired over test samples (init and after see the same examples) and hierarchical over runs (seeds)."""
    rng = np.random.default_rng(seed)
    groups: dict[tuple[str, str, str], list[tuple[float, float, np.ndarray]]] = {}
    for run in find_transfer_runs(paths):
        t = read_json(run / "transfer.json")
        for source in t["sources"]:
            for target in t["targets"]:
                init, after = _scores(run, "init", target), _scores(run, source, target)
                ids = sorted(init)
                diff = np.array([after[i] - init[i] for i in ids])  # (n,) paired per-sample differences
                groups.setdefault((t["method"], source, target), []).append(
                    (t["init"][target], t["after"][source][target], diff))
    rows = []
    for (method, source, target), items in groups.items():
        inits = np.array([i[0] for i in items])
        afters = np.array([i[1] for i in items])
        K = len(items)
        # (K, B, K): a fresh resample of each run's test samples for every draw of the bootstrap over seeds
        pools = np.stack([100.0 * d[stats.resample_indices(len(d), B * K, rng)].mean(axis=1).reshape(B, K)
                          for _, _, d in items])
        points = np.array([100.0 * d.mean() for _, _, d in items])  # (K,)
        lo, hi = stats.percentile_ci(stats.hierarchical(points, pools, ["seeds"] * K, rng), level)
        rows.append({"method": method, "source": source, "target": target, "init": inits.mean(),
                     "after": afters.mean(), "delta": float((afters - inits).mean()), "ci_low": lo, "ci_high": hi,
                     "n_runs": K})
    return pd.DataFrame(rows)


def transfer_matrix(df: pd.DataFrame, method: str, fmt: str = "md") -> pd.DataFrame:
    """source x target strings "delta ± half-width" for one method (the diagonal is in-domain learning)."""
    sub = df[df.method == method]
    pm = "$\\pm$" if fmt == "latex" else "±"
    targets = list(dict.fromkeys(sub.target))
    # Sources in sequence order (transfer.json stores them with sorted keys); domain sources after.
    sources = sorted(dict.fromkeys(sub.source), key=lambda x: (targets.index(x) if x in targets else len(targets), x))
    name = f"{method}: source \\ target" if fmt != "latex" else f"{method.replace('_', chr(92) + '_')}: source $\\backslash$ target"
    out = pd.DataFrame(index=pd.Index(sources, name=name), columns=targets, dtype=object)
    for _, r in sub.iterrows():
        out.loc[r.source, r.target] = f"{r.delta:+.1f} {pm} {(r.ci_high - r.ci_low) / 2:.1f}"
    return out
