"""MemGen's trained trigger vs always-insert, with the same weaver: accuracy and insertion rate per task.

Takes a finished ``memgen`` run made with ``method_options.memgen.trigger=trained``. For each stage i it restores
``checkpoints/stage{i}`` and evaluates task i (``all_tasks``: every task) on the run's own test examples twice:
once letting the trained trigger decide (p(insert) >= threshold, what the run's matrix used) and once inserting
at every delimiter under the cap, the trigger switched off. Nothing is retrained, so the two columns differ only
in who decides at the delimiters.

Insertion rate = delimiter insertions / delimiters the trigger was asked about (the prompt insertion is not
counted); ``ins_per_sample`` counts delimiter insertions per sample.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from harness.analysis.runs import insertion_rate
from harness.config import RunConfig, from_dict
from harness.methods import build_method
from harness.models import load_run_model
from harness.runner import evaluate
from harness.store import read_json
from tasks.registry import get_task

POLICIES = {"trigger": True, "always": False}  # column prefix -> is the trained trigger deciding


def trigger_ablation(run_dir: str | Path, all_tasks: bool = False,
                     on_row: Callable[[dict[str, Any]], None] | None = None) -> pd.DataFrame:
    """One row per (stage, task): ``{trigger,always}_{acc,rate,ins_per_sample,seconds}``."""
    run = Path(run_dir)
    if not (run / "summary.json").exists() or not (run / "config.json").exists():
        raise FileNotFoundError(f"{run} is not a run directory (no summary.json/config.json); pass RUNS/memgen")
    cfg = from_dict(RunConfig, read_json(run / "config.json"))
    if tuple(cfg.methods) != ("memgen",) or cfg.method_options.get("memgen", {}).get("trigger") != "trained":
        raise ValueError(f"{run} is not a memgen run with method_options.memgen.trigger=trained: no trigger to ablate")
    tasks = [get_task(n, cfg.data_dir) for n in read_json(run / "summary.json")["tasks"]]
    lm = load_run_model(cfg)
    method = build_method("memgen", lm, cfg)
    rows = []
    for stage, learned in enumerate(tasks, start=1):
        ckpt = run / "checkpoints" / f"stage{stage}"
        if not (ckpt / "DONE").exists():
            raise FileNotFoundError(f"{ckpt} is missing or incomplete; finish the run first (same --out)")
        method.load(ckpt)
        for task in tasks if all_tasks else [learned]:
            examples = task.load("test", limit=cfg.eval_limit, seed=cfg.seed)
            row: dict[str, Any] = {"stage": stage, "learned": learned.name, "task": task.name, "n": len(examples)}
            for name, trained in POLICIES.items():
                method.trigger_trained = trained  # same weaver; only who decides at the delimiters changes
                res, samples = evaluate(method, task, examples, cfg.eval.max_new_tokens or task.max_new_tokens,
                                        lm.tokenizer)
                rate, per = insertion_rate(samples)
                row.update({f"{name}_acc": res.accuracy, f"{name}_rate": rate, f"{name}_ins_per_sample": per,
                            f"{name}_seconds": res.seconds})
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return pd.DataFrame(rows)
