"""``memgen-bench``: a thin Typer layer over RunConfig, the runner and the report tables."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from harness.config import ConfigError, RunConfig, apply_overrides, from_dict, load_yaml, to_dict
from harness.methods import METHOD_DESCRIPTIONS, check_methods, method_names
from harness.models import ModelLoadError
from harness.training import NonFiniteLossError
from tasks.base import TaskError

app = typer.Typer(add_completion=False, no_args_is_help=False, help="Continual-learning benchmark harness: MemGen "
                  "latent memory vs weight updates vs retrieval.", pretty_exceptions_enable=False)
console = Console(stderr=True)
USER_ERRORS = (ConfigError, TaskError, ModelLoadError, NonFiniteLossError, FileNotFoundError, ValueError)


def _fail(exc: BaseException) -> None:
    console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(2)


def build_config(config: Path | None, options: dict[str, Any], overrides: list[str]) -> RunConfig:
    data = load_yaml(config) if config else {}
    for k, v in options.items():
        if v is not None:
            data[k] = v
    cfg = from_dict(RunConfig, data)
    return apply_overrides(cfg, overrides or [])


class _Progress:
    """Rich progress over the runner's events: one bar for the matrix cells, a status line for training."""

    def __init__(self, progress: Progress, n_cells: int, label: str):
        self.p = progress
        self.bar = progress.add_task(label, total=n_cells)

    def __call__(self, kind: str, info: dict[str, Any]) -> None:
        if kind == "eval_start":
            self.p.update(self.bar, description=f"{info['method']}: eval row {info['row']} on {info['task']}")
        elif kind == "eval_end":
            self.p.advance(self.bar)
            self.p.console.print(f"  {info['method']:>10} row {info['row']} {info['task']:<12} "
                                 f"acc {info['accuracy']:6.2f}%  (n={info['n']}, {info['seconds']:.1f}s)")
        elif kind == "train_start":
            self.p.update(self.bar, description=f"{info['method']}: training on {info['task']} ({info['n']} ex)")
        elif kind == "train_end":
            self.p.console.print(f"  {info['method']:>10} trained on {info['task']} in {info.get('seconds', 0):.1f}s")
        elif kind == "resume":
            self.p.console.print(f"  {info['method']}: resuming after stage {info['stage']}")


@app.command()
def run(
    sequence: str = typer.Option(None, help="Named sequence or inline 'a,b,c' (default: quick)."),
    methods: str = typer.Option(None, help="Comma-separated methods (default: vanilla,sft)."),
    model: str = typer.Option(None, help="Hub id, local folder, .gguf, smollm2-135m or tiny-random."),
    seed: int = typer.Option(None, help="Master seed (default 0)."),
    limit: int = typer.Option(None, help="Cap train and test examples per task (smoke runs)."),
    out: str = typer.Option(None, help="Output root (default runs/default)."),
    data_dir: str = typer.Option(None, "--data-dir", help="Folder of local benchmark JSONL files."),
    dtype: str = typer.Option(None, help="fp32, bf16 or fp16."),
    device: str = typer.Option(None, help="cpu, cuda or cuda:N."),
    config: Path = typer.Option(None, "--config", "-c", help="YAML file with RunConfig fields."),
    overrides: list[str] = typer.Option(None, "--set", "-s", help="Dotted override, e.g. train.lr=1e-4."),
) -> None:
    """Run a task sequence for each method; fill and export the accuracy matrix (resumes a killed run)."""
    from harness.report import render, summary_table
    from harness.runner import run_method
    from tasks.registry import resolve_sequence

    try:
        opts = {"sequence": sequence, "model": model, "seed": seed, "limit": limit, "out": out,
                "data_dir": data_dir, "dtype": dtype, "device": device,
                "methods": methods.split(",") if methods else None}
        cfg = build_config(config, opts, overrides or [])
        check_methods(cfg.methods)
        tasks = resolve_sequence(cfg.sequence)
    except USER_ERRORS as exc:
        _fail(exc)
    console.print(f"[bold]memgen-bench run[/] sequence={'->'.join(tasks)} methods={','.join(cfg.methods)} "
                  f"model={cfg.model} seed={cfg.seed} out={cfg.out}")
    started = time.perf_counter()
    n_cells = (len(tasks) + 1) * len(tasks)
    dirs = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        for name in cfg.methods:
            run_dir = Path(cfg.out) / name
            try:
                run_method(name, cfg, run_dir, on_event=_Progress(progress, n_cells, name))
            except USER_ERRORS as exc:
                _fail(exc)
            dirs.append(run_dir)
    console.print(f"finished in {time.perf_counter() - started:.0f}s")
    table = summary_table(dirs)
    print(render(table, "md"))
    for d in dirs:
        print(f"\n{d}/matrix.csv")
        print((d / "matrix.csv").read_text())


@app.command("eval")
def eval_cmd(
    task: list[str] = typer.Option(..., "--task", "-t", help="Task(s) to evaluate."),
    method: str = typer.Option("vanilla", help="Method whose generate() is used."),
    checkpoint: Path = typer.Option(None, help="A checkpoint folder written by the method (checkpoints/stageN)."),
    model: str = typer.Option("smollm2-135m", help="Reasoner model."),
    limit: int = typer.Option(None, help="Test examples per task."),
    seed: int = typer.Option(0, help="Seed of the subsample."),
    data_dir: str = typer.Option(None, "--data-dir", help="Folder of local benchmark JSONL files."),
    out: Path = typer.Option(None, help="Write samples and scores here."),
    dtype: str = typer.Option("fp32", help="fp32, bf16 or fp16."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    overrides: list[str] = typer.Option(None, "--set", "-s", help="Dotted override, e.g. eval.batch_size=8."),
) -> None:
    """Evaluate one method (optionally restored from a checkpoint) on one or more tasks."""
    from harness.methods import build_method
    from harness.models import load_model
    from harness.runner import evaluate
    from harness.store import atomic_write_json, atomic_write_jsonl
    from tasks.registry import get_task

    try:
        cfg = build_config(None, {"model": model, "seed": seed, "data_dir": data_dir, "dtype": dtype,
                                  "device": device, "methods": [method]}, overrides or [])
        check_methods([method])
        tasks = [get_task(t, cfg.data_dir) for t in task]
        lm = load_model(cfg.model, cfg.dtype, cfg.device, seed=cfg.seed)
        m = build_method(method, lm, cfg)
        if checkpoint is not None:
            if not checkpoint.exists():
                raise FileNotFoundError(f"checkpoint folder not found: {checkpoint}")
            m.load(checkpoint)
        results = {}
        for t in tasks:
            examples = t.load("test", limit=limit, seed=seed)
            res, samples = evaluate(m, t, examples, cfg.eval.max_new_tokens or t.max_new_tokens, lm.tokenizer)
            results[t.name] = {**res.__dict__, "task_version": t.version}
            console.print(f"{t.name}: {res.accuracy:.2f}% (n={res.n}, {res.seconds:.1f}s)")
            if out is not None:
                atomic_write_jsonl(out / f"{t.name}.samples.jsonl", samples)
        if out is not None:
            atomic_write_json(out / "eval.json", {"method": method, "model": model, "results": results})
    except USER_ERRORS as exc:
        _fail(exc)
    print(json.dumps(results, indent=2))


@app.command()
def report(
    dirs: list[Path] = typer.Argument(..., help="Run directories or output roots."),
    format: str = typer.Option("md", "--format", "-f", help="csv, latex or md."),
    matrices: bool = typer.Option(False, help="Also print each run's accuracy matrix."),
) -> None:
    """One row per method with ACC, BWT, FWT, forgetting and retention."""
    from harness.report import find_runs, matrix_table, render, summary_table

    if format not in ("csv", "latex", "md"):
        _fail(ValueError(f"unknown format {format!r}; use csv, latex or md"))
    try:
        print(render(summary_table(dirs), format, caption="Continual-learning metrics (percent)"))
        if matrices:
            for run in find_runs(dirs):
                print(f"\n{run}")
                print(render(matrix_table(run).reset_index(), format))
    except USER_ERRORS as exc:
        _fail(exc)


@app.command()
def tasks() -> None:
    """List the tasks and named sequences."""
    from tasks.registry import definitions, sequences

    t = Table("task", "version", "domain", "description", title="tasks")
    for name, d in sorted(definitions().items()):
        t.add_row(name, d.version, d.domain, d.description)
    Console().print(t)
    s = Table("sequence", "tasks", "description", title="sequences")
    for name, seq in sorted(sequences().items()):
        s.add_row(name, " -> ".join(seq["tasks"]), seq.get("description", ""))
    Console().print(s)


@app.command()
def methods() -> None:
    """List the methods."""
    t = Table("method", "description", title="methods")
    for name in method_names():
        t.add_row(name, METHOD_DESCRIPTIONS.get(name, ""))
    Console().print(t)


@app.command("config")
def show_config(
    config: Path = typer.Option(None, "--config", "-c"),
    overrides: list[str] = typer.Option(None, "--set", "-s"),
) -> None:
    """Print the resolved default config (or a YAML config with overrides) as YAML."""
    import yaml

    try:
        cfg = build_config(config, {}, overrides or [])
    except USER_ERRORS as exc:
        _fail(exc)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def main() -> None:  # pragma: no cover - console entry
    app(sys.argv[1:])


if __name__ == "__main__":  # pragma: no cover
    app()
