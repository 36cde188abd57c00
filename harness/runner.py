"""The sequence runner: fills the accuracy matrix R for one method, cell by cell, resumably.

Row 0 evaluates every task before any training; row i evaluates every task after training on task i. Each cell
is written atomically as soon as it is computed, and the method's state is checkpointed after each training
stage, so a killed run resumes from the last finished cell. Training and evaluation seeds are derived from
(master seed, stage), so the resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from harness import eval_cache, metrics
from harness.budget import StageMeter, read_stage_budgets, run_budget, stage_budget
from harness.config import ConfigError, RunConfig, to_dict
from harness.distributed import barrier, is_main, map_sharded
from harness.generation import stop_token_ids
from harness.methods import Method, build_method
from harness.models import (
    LoadedModel,
    chat_template_record,
    dtype_name,
    load_run_model,
    model_record,
    run_dtype,
)
from harness.progress import cell_progress
from harness.seeding import derive_seed, set_seed
from harness.store import (
    atomic_dir,
    atomic_write_json,
    atomic_write_jsonl,
    hardware_record,
    read_json,
    run_metadata,
)
from harness.tracking import RunTracker
from harness.vllm_backend import fallback_note, record_backend, use_backend
from tasks.base import Example, Task
from tasks.registry import get_task, resolve_probes, resolve_sequence

# Keys of the config that may change between a run and its resumption without changing its results.
RESUME_NEUTRAL = {"out", "methods", "eval.batch_size", "report_to"}


@dataclass
class CellResult:
    accuracy: float  # percent
    n: int
    correct: float
    seconds: float


def cell_name(row: int, task: str) -> str:
    return f"r{row}_{task}"


def row_labels(task_names: Sequence[str]) -> list[str]:
    return ["init", *task_names]


PROBE_PREFIX = "probe:"  # matrix.csv marks probe columns (evaluated in every row, never trained) with this prefix


def probe_column(name: str) -> str:
    return f"{PROBE_PREFIX}{name}"


def split_matrix_columns(columns: Sequence[str]) -> tuple[list[str], list[str]]:
    """matrix.csv's columns -> (trained tasks, probe names): every reader keeps the metrics on the trained tasks."""
    cols = [str(c) for c in columns]
    return ([c for c in cols if not c.startswith(PROBE_PREFIX)],
            [c.removeprefix(PROBE_PREFIX) for c in cols if c.startswith(PROBE_PREFIX)])


def evaluate(
    method: Method, task: Task, examples: Sequence[Example], max_new_tokens: int, tokenizer: Any = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[CellResult, list[dict[str, Any]]]:
    """Generate with the method, score with the task (never with the method), return the cell and samples.

    Under ``accelerate launch`` the examples are sharded across processes and the records gathered in order.
    ``on_progress`` gets ``harness.progress`` snapshots (examples done, tokens/s, ETA) after each generated batch
    of this process's shard (single-turn tasks; a multi-turn task's generate calls are turns, not examples).
    """
    # Multi-turn tasks (harness/agent.py) own the episode loop and call method.generate once per turn.
    rollout = getattr(task, "rollout", None)

    def generate_shard(shard: list[Example]) -> list[tuple[str, str, dict[str, Any]]]:
        if rollout is not None:
            completions = rollout(method, shard, max_new_tokens, tokenizer)
        else:
            with cell_progress(len(shard), on_progress):
                completions = method.generate(task, shard, max_new_tokens)
        if len(completions) != len(shard):
            raise RuntimeError(f"method {method.name} returned {len(completions)} completions for {len(shard)} prompts")
        prompts = None if rollout is not None else getattr(method, "last_prompts", None)
        if not prompts or len(prompts) != len(shard):
            prompts = [task.prompt(e, tokenizer) for e in shard]
        # Optional per-sample records of the last generate call (MemGen: insertion points, trigger decisions),
        # aligned with the prompts; they travel with the pairs through map_sharded. Not for multi-turn tasks,
        # whose generate is called once per turn.
        records = None if rollout is not None else getattr(method, "last_records", None)
        if not isinstance(records, list) or len(records) != len(shard):
            records = [{} for _ in shard]
        return list(zip(prompts, completions, records, strict=True))

    t0 = time.perf_counter()
    pairs = map_sharded(generate_shard, list(examples))
    seconds = time.perf_counter() - t0
    completions = [c for _, c, _ in pairs]
    # Tasks that execute code score a batch in parallel on their sandbox pool (same scorer, one call).
    score_many = getattr(task, "score_many", None)
    scores = score_many(completions, examples) if score_many else [task.score(c, e) for c, e in
                                                                   zip(completions, examples, strict=True)]
    samples = []
    explain = getattr(task, "explain", None)  # DefinedTask: the answer and the filter rule that found it
    for e, (p, c, rec), score in zip(examples, pairs, scores, strict=True):
        extracted, rule = explain(c) if explain is not None else (task.extract(c), None)
        sample = {"id": e.id, "prompt": p, "completion": c, "extracted": extracted, "extract_rule": rule,
                  "gold": e.answer, "score": score}
        samples.append({**sample, **{k: v for k, v in rec.items() if k not in sample}})
    correct = sum(s["score"] for s in samples)
    n = len(samples)
    return CellResult(accuracy=100.0 * correct / max(n, 1), n=n, correct=correct, seconds=seconds), samples


def load_matrix(run_dir: Path, task_names: Sequence[str], rows: int | None = None) -> list[list[float | None]]:
    """R as nested lists (percent), None where a cell is not computed yet: (rows, len(task_names)), rows defaulting
    to len(task_names) + 1 (the probe matrix P passes the sequence's T + 1)."""
    T = len(task_names)
    n_rows = T + 1 if rows is None else rows
    R: list[list[float | None]] = [[None] * T for _ in range(n_rows)]
    for i in range(n_rows):
        for j, name in enumerate(task_names):
            p = run_dir / "cells" / f"{cell_name(i, name)}.json"
            if p.exists():
                R[i][j] = read_json(p)["accuracy"]
    return R


def write_matrix_files(run_dir: Path, task_names: Sequence[str], extra: dict[str, Any] | None = None,
                       probes: Sequence[str] = ()) -> dict:
    """matrix.csv (the trained tasks, then one ``probe:<name>`` column per probe) and summary.json (``matrix`` R of
    the trained tasks, ``probe_matrix`` P, the metrics of R and, apart, the probe metrics of P)."""
    R = load_matrix(run_dir, task_names)
    P = load_matrix(run_dir, probes, rows=len(task_names) + 1)  # (T+1, n_probes)
    df = pd.DataFrame([r + p for r, p in zip(R, P, strict=True)], index=row_labels(task_names),
                      columns=[*task_names, *map(probe_column, probes)])
    df.index.name = "after"
    from harness.store import atomic_write_text

    atomic_write_text(run_dir / "matrix.csv", df.to_csv(float_format="%.4f"))
    complete = all(v is not None for row in R + P for v in row)
    summary: dict[str, Any] = {"complete": complete, "tasks": list(task_names), "matrix": R, **(extra or {}),
                               "budget": run_budget(read_stage_budgets(run_dir))}  # harness/budget.py
    if probes:
        summary.update({"probes": list(probes), "probe_matrix": P})
    if complete:
        summary.update(metrics.summarize(R))
        if probes:
            ps = metrics.probe_summary(P, probes)
            summary["undefined"] = {**summary["undefined"], **ps.pop("undefined")}
            summary.update(ps)
    atomic_write_json(run_dir / "summary.json", summary)
    return summary


def holds_results(run_dir: Path) -> bool:
    """Whether the directory holds a finished cell or checkpoint: only then is it a run another config may not
    reuse (a command that failed before its first cell leaves nothing to protect)."""
    return next((run_dir / "cells").glob("r*_*.json"), None) is not None or completed_stage(run_dir) > 0


def with_dtype(cfg: RunConfig, model: LoadedModel | None = None) -> RunConfig:
    """``dtype=auto`` resolved (the CLI's preflight resolves it first; a config built in code arrives with it): the
    dtype of the model handed in, else the rule of ``run_dtype``."""
    if cfg.dtype != "auto":
        return cfg
    return dataclasses.replace(cfg, dtype=dtype_name(model) if model is not None else run_dtype(cfg))


def with_probes(cfg: RunConfig) -> RunConfig:
    """``cfg`` with its probes resolved (None -> the named sequence's), as config.json records them."""
    return dataclasses.replace(cfg, probes=tuple(resolve_probes(cfg.sequence, cfg.probes)))


def _check_resumable(run_dir: Path, cfg: RunConfig) -> None:
    path = run_dir / "config.json"
    if not path.exists() or not holds_results(run_dir):
        return
    old, new = read_json(path), to_dict(with_probes(cfg))
    old.setdefault("probes", [])  # a run from before probes existed had none

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict) and k != "method_options":
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[prefix + k] = v
        return out

    fo, fn = flat(old), flat(new)
    changed = sorted(k for k in set(fo) | set(fn) if k not in RESUME_NEUTRAL and fo.get(k) != fn.get(k))
    if changed:
        # Probes are cells of every row: rows already trained past cannot gain (or lose) them on resumption.
        hint = (f" (its probes were {fo.get('probes') or 'none'}: resume with --probes "
                f"{','.join(fo.get('probes') or []) or 'none'})" if "probes" in changed else "")
        raise ConfigError(
            f"run directory {run_dir} holds a run with a different config ({', '.join(changed)}){hint}; "
            f"use another --out or delete the directory to start over"
        )


def completed_stage(run_dir: Path) -> int:
    """The highest stage whose checkpoint is complete (0 = none)."""
    done = [int(p.parent.name.removeprefix("stage")) for p in (run_dir / "checkpoints").glob("stage*/DONE")]
    return max(done, default=0)


def run_method(
    method_name: str,
    cfg: RunConfig,
    run_dir: Path,
    model: LoadedModel | None = None,
    on_event: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) one method over the sequence; returns the summary."""
    notify = on_event or (lambda kind, info: None)
    task_names = resolve_sequence(cfg.sequence)
    cfg = with_probes(cfg)  # a bad probe fails here, before anything is written; config.json records the list
    cfg = with_dtype(cfg, model)  # config.json, meta.json and the evaluation cache get the dtype that ran
    tasks = [get_task(n, cfg.data_dir) for n in task_names]
    probe_tasks = [get_task(n, cfg.data_dir) for n in cfg.probes or ()]
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_resumable(run_dir, cfg)
    cfg_dict = to_dict(cfg)
    cfg_dict["methods"] = [method_name]
    T = len(tasks)
    seeds = {"master": cfg.seed, **{f"train_stage{i}": derive_seed(cfg.seed, "train", i) for i in range(1, T + 1)}}
    main = is_main()  # under accelerate launch only the main process writes; the others compute and wait
    if main:
        atomic_write_json(run_dir / "config.json", cfg_dict)
        if not (run_dir / "meta.json").exists():
            atomic_write_json(run_dir / "meta.json", run_metadata(seeds, {t.name: t.version for t in [*tasks, *probe_tasks]}))
    barrier()

    lm = model or load_run_model(cfg)
    if main:  # model, template, data and hardware beside the other provenance (kept from the first start)
        meta = json.loads((run_dir / "meta.json").read_text())
        if "hardware" not in meta:
            meta.update(provenance(cfg, lm, [*tasks, *probe_tasks], meta))
            atomic_write_json(run_dir / "meta.json", meta)
    tracker = RunTracker(cfg.report_to if main else "none", run_dir, f"{Path(cfg.out).name}-{method_name}", cfg_dict)
    try:
        return _run_stages(method_name, cfg, run_dir, lm, tasks, task_names, tracking(notify, tracker), tracker,
                           probe_tasks)
    finally:
        tracker.close()


def provenance(cfg: RunConfig, lm: LoadedModel, tasks: Sequence[Task], meta: dict[str, Any]) -> dict[str, Any]:
    """What meta.json adds once the model is loaded: the model (commit, dtype, arguments), its chat template and
    special tokens, each task's data source per split and the hardware (``harness.store.hardware_record``)."""
    data = {}
    for t in tasks:
        source = getattr(t, "data_source", None)
        data[t.name] = {s: source(s) for s in ("train", "test")} if source else {"kind": type(t).__name__}
    out = {"model": model_record(lm, cfg.dtype, cfg.model_args), "data": data, "hardware": hardware_record()}
    if "chat_template" not in meta:
        out["chat_template"] = chat_template_record(lm.tokenizer, cfg.chat_template, cfg.system_prompt)
    return out


def tracking(notify: Callable[[str, dict[str, Any]], None],
             tracker: RunTracker) -> Callable[[str, dict[str, Any]], None]:
    """``notify`` that also logs each step's loss and each cell (accuracy, tokens/s) to the run's tracker."""
    def event(kind: str, info: dict[str, Any]) -> None:
        if kind == "train_step" and info.get("loss") is not None:
            phase = f"{info['phase']}_" if info.get("phase") else ""
            # the step's loss and whatever else the method measured at it (learning rate, reward, KL, tokens/s...)
            values = {"loss": info["loss"], **(info.get("scalars") or {})}
            tracker.log({f"train/{info['task']}/{phase}{k}": float(v) for k, v in values.items()
                         if isinstance(v, int | float) and math.isfinite(v)}, int(info["step"]))
        elif kind == "eval_end":
            values = {f"eval/{info['task']}/accuracy": info["accuracy"], f"eval/{info['task']}/seconds": info["seconds"]}
            if info.get("generated_tokens") is not None and info["seconds"] > 0:
                values[f"eval/{info['task']}/tokens_per_s"] = info["generated_tokens"] / info["seconds"]
            tracker.log(values, int(info["row"]))
        elif kind == "train_end":
            tracker.log_stage(info["task"], int(info["stage"]), info)
        notify(kind, info)

    return event


def _run_stages(method_name: str, cfg: RunConfig, run_dir: Path, lm: LoadedModel, tasks: list[Task],
                task_names: list[str], notify: Callable[[str, dict[str, Any]], None],
                tracker: RunTracker, probe_tasks: Sequence[Task] = ()) -> dict[str, Any]:
    """The matrix of one method, stage by stage, from wherever the run directory stopped. Probes (never
    trained) are evaluated in every row after the trained tasks, as cells like theirs (``r<i>_<probe>``)."""
    main = is_main()
    T = len(tasks)
    set_seed(derive_seed(cfg.seed, "init"))
    method = build_method(method_name, lm, cfg)
    backend = use_backend(method_name, lm, cfg)  # hf or vllm (harness/vllm_backend.py), recorded with each cell
    if main:
        record_backend(run_dir, backend, fallback_note(method_name, cfg))
    trains = getattr(method, "trains", True)
    # Tasks with file splits must have a train split to be learned (environment tasks generate theirs: no splits).
    untrainable = [t.name for t in tasks
                   if (splits := getattr(getattr(t, "definition", None), "splits", None)) and "train" not in splits]
    if untrainable:
        raise ConfigError(f"task(s) {untrainable} have no train split, so they cannot be learned in a sequence; "
                          f"evaluate them with `memgen-bench eval` or use a task with training data")
    test_sets = [t.load("test", limit=cfg.eval_limit, seed=cfg.seed) for t in tasks]
    probe_sets = [t.load("test", limit=cfg.eval_limit, seed=cfg.seed) for t in probe_tasks]
    probe_names = [t.name for t in probe_tasks]
    info = {"method": method_name, "model": cfg.model, "seed": cfg.seed}

    last = completed_stage(run_dir)
    if last > 0:
        method.load(run_dir / "checkpoints" / f"stage{last}")
        notify("resume", {"method": method_name, "stage": last})

    for stage in range(T + 1):
        if stage > 0 and stage > last:
            task = tasks[stage - 1]
            train = task.load("train", limit=cfg.train_limit, seed=cfg.seed)
            notify("train_start", {"method": method_name, "stage": stage, "task": task.name, "n": len(train)})
            try:  # progress hook for methods that report their steps (optional attribute)
                method.on_step = lambda step, total, loss, phase="", scalars=None, _t=task.name: notify(
                    "train_step", {"method": method_name, "task": _t, "step": step, "total": total, "loss": loss,
                                   "phase": phase, "scalars": scalars or {}})
            except AttributeError:
                pass
            with StageMeter(cfg.device) as meter:  # wall time and peak memory, measured alike for every method
                stats = method.train_on_task(task, train, stage)
            stats = {**stats, "budget": stage_budget(stats, meter.result(), trains)}
            if main:
                ckpt, commit = atomic_dir(run_dir / "checkpoints" / f"stage{stage}")
                method.save(ckpt)
                (ckpt / "DONE").write_text("ok\n")
                commit()
                atomic_write_json(run_dir / "train" / f"stage{stage}.json", {"task": task.name, **stats})
            barrier()
            notify("train_end", {"method": method_name, "stage": stage, "task": task.name, **stats})
        for task, examples in zip([*tasks, *probe_tasks], [*test_sets, *probe_sets], strict=True):
            cell = run_dir / "cells" / f"{cell_name(stage, task.name)}.json"
            if cell.exists():
                continue
            if stage > 0 and not trains:
                # A method that never changes (vanilla) has identical rows: copy row 0 instead of re-generating.
                if main:
                    src = read_json(run_dir / "cells" / f"{cell_name(0, task.name)}.json")
                    atomic_write_json(cell, {**src, "row": stage, "copied_from_row": 0})
                barrier()
                continue
            notify("eval_start", {"method": method_name, "row": stage, "task": task.name, "n": len(examples)})
            set_seed(derive_seed(cfg.seed, "eval", stage, task.name))
            budget = cfg.eval.max_new_tokens or task.max_new_tokens
            key = _init_row_key(method, cfg, lm, task, examples, budget, backend) if stage == 0 else None
            hit = eval_cache.lookup(_cache_root(cfg), key) if key else None
            if hit is not None:  # the same evaluation, already done by another method or run (harness/eval_cache.py)
                done, samples = hit
                result = CellResult(**{k: done[k] for k in ("accuracy", "n", "correct", "seconds")})
            else:
                where = {"method": method_name, "row": stage, "task": task.name}  # progress inside the cell
                result, samples = evaluate(method, task, examples, budget, lm.tokenizer,
                                           on_progress=lambda p, w=where: notify("eval_progress", {**w, **p}))
                if key and main:
                    eval_cache.store(_cache_root(cfg), key, result.__dict__, samples)
            generated = sum(len(ids) for ids in lm.tokenizer([s["completion"] for s in samples])["input_ids"])
            if main:
                atomic_write_jsonl(run_dir / "samples" / f"{cell_name(stage, task.name)}.jsonl", samples)
                atomic_write_json(cell, {"row": stage, "task": task.name, "task_version": task.version,
                                         "backend": backend, **result.__dict__,
                                         "generation": generation_record(lm, task, budget),
                                         **({"cache_key": key, "cached": hit is not None} if key else {})})
            barrier()
            notify("eval_end", {"method": method_name, "row": stage, "task": task.name, **result.__dict__,
                                "generated_tokens": generated})
        if main:
            write_matrix_files(run_dir, task_names, info, probe_names)
        barrier()
    summary = summarize_run(run_dir, task_names, info, probe_names)
    tracker.log_summary(summary, T)
    return summary


def generation_record(lm: LoadedModel, task: Task, budget: int) -> dict[str, Any]:
    """The generation settings of a cell: token budget, stop tokens, stop strings, greedy decoding."""
    return {"max_new_tokens": budget, "do_sample": False, "temperature": 0.0,
            "stop_token_ids": stop_token_ids(lm.tokenizer, getattr(lm.model, "generation_config", None)),
            "until": list(getattr(getattr(task, "definition", None), "until", []) or [])}


def _cache_root(cfg: RunConfig) -> Path:
    return Path(cfg.eval.cache_dir) if cfg.eval.cache_dir else Path(cfg.out) / "eval-cache"


def _init_row_key(method: Method, cfg: RunConfig, lm: LoadedModel, task: Task, examples: Sequence[Example],
                  budget: int, backend: str) -> str | None:
    """The eval-cache key of an init-row cell, or None when it is not cacheable (option off, multi-turn task, a
    method whose generation is not the frozen model's plain decoding)."""
    ident = eval_cache.identity(method) if cfg.eval.cache else None
    if ident is None or getattr(task, "rollout", None) is not None:
        return None
    tok = lm.tokenizer
    return eval_cache.cell_key(
        ident=ident, model=cfg.model, dtype=cfg.dtype, template_sha=chat_template_record(tok, cfg.chat_template)["sha256"],
        task=task.name, version=task.version, prompts=[task.prompt(e, tok) for e in examples],
        max_new_tokens=budget, stop_ids=stop_token_ids(tok, getattr(lm.model, "generation_config", None)),
        batch_size=cfg.eval.batch_size, backend=backend, seed=derive_seed(cfg.seed, "eval", 0, task.name))


def summarize_run(run_dir: Path, task_names: Sequence[str], extra: dict[str, Any],
                  probes: Sequence[str] = ()) -> dict[str, Any]:
    """The run's summary (main process writes it; the others read what it wrote)."""
    if is_main():
        return write_matrix_files(run_dir, task_names, extra, probes)
    return read_json(run_dir / "summary.json")
