"""CI regression on a small deterministic run: re-run the committed reference and diff every matrix cell.

The reference (``results/reference/quick-smollm2/``) is SmolLM2-135M in fp32 on the ``quick`` sequence with
vanilla and SFT, seed 0, 8 test examples per task, 4 LoRA steps per task, greedy decoding. Stated tolerance:
0 percentage points per cell, because fp32 greedy decoding on one CPU thread with pinned software is
bit-reproducible
(one changed answer moves a cell by 12.5 points, so any tolerance below that means "no answer may change").
On different hardware set ``MEMGEN_REF_TOLERANCE`` (points) and say so.

Refresh on purpose (after an intended change of results) with ``scripts/refresh_reference.sh``, which runs
``python -m harness.analysis.regression --refresh``; commit the new files with the change that caused them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from harness.config import RunConfig, apply_overrides, from_dict, to_dict
from harness.runner import run_method
from harness.store import atomic_write_json, atomic_write_text, package_versions, read_json

ROOT = Path(__file__).resolve().parents[2]
REFERENCE_DIR = ROOT / "results" / "reference" / "quick-smollm2"
TOLERANCE_PP = 0.0
# The reference run; kept tiny so CI re-runs it in ~1-3 minutes on 2 CPU cores.
REFERENCE_CONFIG: dict[str, Any] = {"sequence": "quick", "methods": ["vanilla", "sft"], "model": "smollm2-135m",
                                    "dtype": "fp32", "device": "cpu", "seed": 0,
                                    "probes": []}  # the reference predates quick's probes: its matrices have none
REFERENCE_OVERRIDES = ["eval.limit=8", "eval.batch_size=8", "train.train_limit=16", "train.max_steps=4",
                       "train.batch_size=4", "train.lr=3e-4"]  # lr pinned: the reference predates the 1e-3 default


def reference_config(out: Path) -> RunConfig:
    return apply_overrides(from_dict(RunConfig, {**REFERENCE_CONFIG, "out": str(out)}), REFERENCE_OVERRIDES)


def tolerance() -> float:
    raw = os.environ.get("MEMGEN_REF_TOLERANCE")
    try:
        return float(raw) if raw else TOLERANCE_PP
    except ValueError as exc:
        raise ValueError(f"MEMGEN_REF_TOLERANCE must be a number of percentage points, got {raw!r}") from exc


def run_reference(out: Path) -> dict[str, dict[str, Any]]:
    """Run every reference method into ``out/<method>``; returns method -> {tasks, matrix}.

    torch runs on one thread here: the split of fp32 reductions depends on the thread count, so pinning it keeps
    the reference reproducible on machines with different core counts (and avoids oversubscribing shared CPUs).
    """
    import torch

    cfg = reference_config(out)
    result = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for method in cfg.methods:
            summary = run_method(method, cfg, out / method)
            result[method] = {"tasks": summary["tasks"], "matrix": summary["matrix"]}
    finally:
        torch.set_num_threads(threads)
    return result


def load_reference(ref_dir: Path = REFERENCE_DIR) -> dict[str, Any]:
    path = ref_dir / "reference.json"
    if not path.exists():
        raise FileNotFoundError(f"no reference at {path}; create it with scripts/refresh_reference.sh")
    return read_json(path)


def diff_table(reference: dict[str, dict[str, Any]], now: dict[str, dict[str, Any]], tol: float) -> pd.DataFrame:
    """One row per cell: method, cell (row label x task), reference, now, delta (points), ok."""
    rows = []
    for method, ref in reference.items():
        tasks = ref["tasks"]
        cur = now.get(method)
        if cur is None or cur["tasks"] != tasks:
            rows.append({"method": method, "after": "-", "task": "-", "reference": None, "now": None,
                         "delta": None, "ok": False})
            continue
        for i, label in enumerate(["init", *tasks]):
            for j, task in enumerate(tasks):
                a, b = ref["matrix"][i][j], cur["matrix"][i][j]
                delta = None if a is None or b is None else b - a
                rows.append({"method": method, "after": label, "task": task, "reference": a, "now": b,
                             "delta": delta, "ok": delta is not None and abs(delta) <= tol + 1e-9})
    return pd.DataFrame(rows)


def refresh(ref_dir: Path = REFERENCE_DIR) -> dict[str, Any]:
    """Re-run the reference and overwrite the committed files (matrix.csv per method + reference.json)."""
    with tempfile.TemporaryDirectory(prefix="memgen-ref-") as tmp:
        result = run_reference(Path(tmp))
        for method in result:
            atomic_write_text(ref_dir / f"{method}.matrix.csv", (Path(tmp) / method / "matrix.csv").read_text())
    cfg = reference_config(Path("<tmp>"))
    doc = {"config": {k: v for k, v in to_dict(cfg).items() if k != "out"}, "overrides": REFERENCE_OVERRIDES,
           "tolerance_pp": TOLERANCE_PP, "packages": package_versions(), "methods": result}
    atomic_write_json(ref_dir / "reference.json", doc)
    return doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Re-run the small reference run and diff it, or refresh it.")
    p.add_argument("--refresh", action="store_true", help="overwrite results/reference/ with a new run")
    args = p.parse_args(argv)
    if args.refresh:
        doc = refresh()
        print(f"wrote {REFERENCE_DIR}/reference.json ({', '.join(doc['methods'])})")
        return 0
    ref = load_reference()["methods"]
    with tempfile.TemporaryDirectory(prefix="memgen-ref-") as tmp:
        now = run_reference(Path(tmp))
    table = diff_table(ref, now, tolerance())
    print(table.to_markdown(index=False))
    bad = table[~table.ok]
    print(f"{len(bad)} of {len(table)} cells moved by more than {tolerance()} points")
    return 1 if len(bad) else 0


if __name__ == "__main__":
    sys.exit(main())
