"""``memgen-bench``: a thin Typer layer over RunConfig, the runner and the report tables."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from harness.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    from_dict,
    load_yaml,
    parse_model_args,
    to_dict,
)
from harness.errors import ModelLoadError, NonFiniteLossError
from harness.methods import METHOD_DESCRIPTIONS, check_methods, method_names
from harness.sharded import SHARDING_METHODS, unsharded_methods
from tasks.base import TaskError

app = typer.Typer(add_completion=False, no_args_is_help=False, help="Continual-learning benchmark harness: MemGen "
                  "latent memory vs weight updates vs retrieval.", pretty_exceptions_enable=False)
console = Console(stderr=True, soft_wrap=True)  # log files get whole lines, not lines hard-wrapped at 80 columns
USER_ERRORS = (ConfigError, TaskError, ModelLoadError, NonFiniteLossError, FileNotFoundError, ValueError)
DTYPE_HELP = "fp32, bf16, fp16 or auto (the checkpoint's dtype on GPU; fp32 on CPU unless native bf16)."
DEVICE_HELP = "cpu, cuda or cuda:N."
PROBES_HELP = "Comma-separated probe tasks, evaluated in every row and never trained ('none': no probes; " \
              "default: the sequence's own probes)."


def _fail(exc: BaseException) -> None:
    # soft_wrap: one line in a log file (rich would hard-wrap at 80 columns where stderr is not a terminal);
    # escape: messages name extras as [rl], which rich would read as markup
    console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
    raise typer.Exit(2)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"memgen-bench {version('memgen-bench')}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Continual-learning benchmark harness: MemGen latent memory vs weight updates vs retrieval."""


def model_options(model_args: str | None, chat_template: str | None, system_prompt: str | None,
                  report_to: str | None) -> dict[str, Any]:
    """The RunConfig fields of the model/tracking options shared by run and eval (None = not given)."""
    return {"model_args": parse_model_args(model_args) if model_args else None, "chat_template": chat_template,
            "system_prompt": system_prompt, "report_to": report_to}


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
        elif kind == "eval_progress":  # inside a cell (harness/progress.py): a bar on a terminal, else a line
            line = f"  eval row {info['row']} {info['task']}: {info['text']}"
            if self.p.console.is_terminal:
                if getattr(self, "eval_bar", None) is None:
                    self.eval_bar = self.p.add_task(line, total=info["total"])
                self.p.update(self.eval_bar, completed=info["done"], description=line)
            elif info["line_due"]:
                self.p.console.print(f"  {info['method']:>10}{line}")
        elif kind == "eval_end":
            if getattr(self, "eval_bar", None) is not None:
                self.p.remove_task(self.eval_bar)
                self.eval_bar = None
            self.p.advance(self.bar)
            self.p.console.print(f"  {info['method']:>10} row {info['row']} {info['task']:<12} "
                                 f"acc {info['accuracy']:6.2f}%  (n={info['n']}, {info['seconds']:.1f}s)")
        elif kind == "train_start":
            self.p.update(self.bar, description=f"{info['method']}: training on {info['task']} ({info['n']} ex)")
            self.train_bar = self.p.add_task(f"  train {info['task']}", total=None)
        elif kind == "train_step" and getattr(self, "train_bar", None) is not None:
            what = f"{info['task']} {info.get('phase', '')}".strip()  # e.g. "arith trigger" (MemGen's phases)
            self.p.update(self.train_bar, completed=info["step"], total=info["total"],
                          description=f"  train {what} loss {info['loss']:.3f}")
            step, total = info["step"], info["total"] or 0
            if not self.p.console.is_terminal and (step == total or step % max(1, total // 10) == 0):
                # a log file (SLURM, nohup) gets no live bar: a line every tenth of the steps instead
                self.p.console.print(f"  {info['method']:>10} train {what} step {step}/{total} "
                                     f"loss {info['loss']:.4f}")
        elif kind == "train_end":
            if getattr(self, "train_bar", None) is not None:
                self.p.remove_task(self.train_bar)
                self.train_bar = None
            self.p.console.print(f"  {info['method']:>10} trained on {info['task']} in {info.get('seconds', 0):.1f}s")
        elif kind == "resume":
            self.p.console.print(f"  {info['method']}: resuming after stage {info['stage']}")


@app.command()
def run(
    sequence: str = typer.Option(None, help="Named sequence or inline 'a,b,c' (default: quick)."),
    probes: str = typer.Option(None, help=PROBES_HELP),
    methods: str = typer.Option(None, help="Comma-separated methods (default: vanilla,sft)."),
    model: str = typer.Option(None, help="Hub id, local folder, .gguf, smollm2-135m or tiny-random."),
    seed: int = typer.Option(None, help="Master seed (default 0)."),
    limit: int = typer.Option(None, help="Cap train and test examples per task (smoke runs)."),
    out: str = typer.Option(None, help="Output root (default runs/default)."),
    data_dir: str = typer.Option(None, "--data-dir", help="Folder of local benchmark JSONL files."),
    dtype: str = typer.Option(None, help=DTYPE_HELP),
    device: str = typer.Option(None, help=DEVICE_HELP),
    config: Path = typer.Option(None, "--config", "-c", help="YAML file with RunConfig fields."),
    overrides: list[str] = typer.Option(None, "--set", "-s", help="Dotted override, e.g. train.lr=1e-4."),
    backend: str = typer.Option(None, "--backend", help="Generation backend: hf or vllm (eval.backend)."),
    model_args: str = typer.Option(None, "--model-args", help="from_pretrained arguments as lm-eval takes them: "
                                   "revision=...,trust_remote_code=true,attn_implementation=...,device_map=..."),
    chat_template: str = typer.Option(None, "--chat-template", help="native, chatml, none or a Jinja file."),
    system_prompt: str = typer.Option(None, "--system-prompt", help="System message before every conversation."),
    report_to: str = typer.Option(None, "--report-to", help="Tracking: none, tensorboard or wandb (logs under "
                                  "each run directory)."),
    num_processes: int = typer.Option(1, "--num-processes", help="Re-launch under `accelerate launch` with N "
                                      "processes (data-parallel evaluation, DDP training)."),
    accelerate_config: Path = typer.Option(None, "--accelerate-config", help="With --num-processes: launch with "
                                           "this accelerate config (configs/accelerate/: fsdp, zero2, zero3, ...)."),
) -> None:
    """Run a task sequence for each method; fill and export the accuracy matrix (resumes a killed run)."""
    from harness.distributed import is_main, launched, single_process_cpu_launch
    from harness.report import render, summary_table
    from harness.runner import run_method
    from tasks.registry import resolve_sequence

    if accelerate_config is not None and not launched():
        if not accelerate_config.exists():
            _fail(ConfigError(f"--accelerate-config {accelerate_config}: no such file; see configs/accelerate/"))
        if num_processes < 2:
            _fail(ConfigError("--accelerate-config needs --num-processes N (N >= 2)"))
    if single_process_cpu_launch():
        _fail(ConfigError("`accelerate launch --cpu --num_processes N` started a single process (accelerate's CPU "
                          "launcher needs MPI for more); use `memgen-bench run --num-processes N` or "
                          "`ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N ...`"))

    try:
        opts = {"sequence": sequence, "model": model, "seed": seed, "limit": limit, "out": out,
                "data_dir": data_dir, "dtype": dtype, "device": device,
                "methods": methods.split(",") if methods else None, "probes": probes,
                **model_options(model_args, chat_template, system_prompt, report_to)}
        cfg = build_config(config, opts, [*([f"eval.backend={backend}"] if backend else []), *(overrides or [])])
        from harness.preflight import preflight

        cfg = preflight(cfg)  # the whole command is valid before anything loads or is written
        tasks = resolve_sequence(cfg.sequence)
        from harness.runner import _check_resumable

        for name in cfg.methods:  # an --out that holds another config's results is refused now, not mid-way
            _check_resumable(Path(cfg.out) / name, dataclasses.replace(cfg, methods=(name,)))
    except USER_ERRORS as exc:
        _fail(exc)
    if num_processes > 1 and not launched():  # after validation: a bad option fails here, not in N processes
        # the device of the resolved config (--device, --config or --set device=...): CPU launches need gloo
        raise typer.Exit(_relaunch(num_processes, "cpu" if cfg.device == "cpu" else "cuda", accelerate_config))
    if is_main():
        console.print(f"[bold]memgen-bench run[/] sequence={'->'.join(tasks)} methods={','.join(cfg.methods)} "
                      f"model={cfg.model} seed={cfg.seed} out={cfg.out}")
    plain = unsharded_methods(cfg.methods)
    if plain and is_main():
        console.print(f"note: this FSDP/DeepSpeed launch shards only {', '.join(SHARDING_METHODS)}; "
                      f"{', '.join(plain)} train data-parallel with whole weights on every process")
    started = time.perf_counter()
    n_cells = (len(tasks) + 1) * (len(tasks) + len(cfg.probes or ()))
    dirs = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        for name in cfg.methods:
            run_dir = Path(cfg.out) / name
            try:
                run_method(name, cfg, run_dir, on_event=_Progress(progress, n_cells, name) if is_main() else None)
            except USER_ERRORS as exc:
                _fail(exc)
            dirs.append(run_dir)
    if not is_main():
        return
    console.print(f"finished in {time.perf_counter() - started:.0f}s")
    table = summary_table(dirs)
    print(render(table, "md"))
    for d in dirs:
        print(f"\n{d}/matrix.csv")
        print((d / "matrix.csv").read_text())


def _launch(argv: list[str], n: int, device: str, accelerate_config: Path | str | None = None) -> int:
    """Run ``harness.cli argv`` under ``accelerate launch`` with ``n`` processes (gloo on CPU), with the defaults of
    a DDP launch or with ``accelerate_config``; returns its exit status."""
    import subprocess

    import yaml

    # ``--multi_gpu`` starts n processes through torchrun; ``--cpu`` would start only one (accelerate's simple
    # launcher needs an MPI hostfile for more), so CPU runs say ACCELERATE_USE_CPU instead: n gloo processes.
    # Port 0: a free rendezvous port, so concurrent launches do not collide.
    head = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n), "--main_process_port", "0"]
    extra: dict[str, str] = {}
    if accelerate_config is None:
        head += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        extra = {"ACCELERATE_USE_CPU": "true"} if device == "cpu" else {}
    else:
        head += ["--config_file", str(accelerate_config)]
        kind = (yaml.safe_load(Path(accelerate_config).read_text()) or {}).get("distributed_type", "")
        if device == "cpu":
            # accelerate drops DeepSpeed from a CPU launch: DeepSpeed's own CPU accelerator (gloo) instead; FSDP and
            # DDP configs run as gloo CPU processes (configs/accelerate/*_cpu.yaml)
            extra = {"DS_ACCELERATOR": "cpu"} if kind == "DEEPSPEED" else {"ACCELERATE_USE_CPU": "true"}
    cmd = [*head, "-m", "harness.cli", *argv]
    console.print(f"launching: {' '.join(f'{k}={v}' for k, v in extra.items())} {' '.join(cmd)}".strip())
    return subprocess.run(cmd, env={**os.environ, **extra}).returncode


def _relaunch(n: int, device: str, accelerate_config: Path | None = None) -> int:
    """Run this same ``run`` command under ``accelerate launch`` (``_launch``), less the options that asked so."""
    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if a in ("--num-processes", "--accelerate-config"):
            skip = True
            continue
        if a.startswith(("--num-processes=", "--accelerate-config=")):
            continue
        argv.append(a)
    return _launch(argv, n, device, accelerate_config)


@app.command()
def sweep(
    spec_file: Path = typer.Option(None, "--grid", "-g", help="Sweep YAML (base, sequence, orders, methods, seeds)."),
    sequence: str = typer.Option(None, help="Sequence whose orders are swept."),
    probes: str = typer.Option(None, help=PROBES_HELP),
    orders: str = typer.Option(None, help="given or latin."),
    n_orders: int = typer.Option(None, help="Number of Latin-square orders."),
    methods: str = typer.Option(None, help="Comma-separated methods."),
    seeds: str = typer.Option(None, help="Comma-separated seeds, e.g. 0,1,2."),
    out: Path = typer.Option(Path("runs/sweep"), help="Sweep root: <out>/<order>/seed<S>/<method>."),
    emit: bool = typer.Option(False, help="Do not run: write one `accelerate launch` line per unfinished cell "
                              "(commands.txt) and a SLURM array script (slurm_array.sh)."),
    num_processes: int = typer.Option(1, "--num-processes", help="Processes per cell: in emitted commands, and "
                                      "locally (N > 1: each cell runs under `accelerate launch`)."),
    accelerate_config: str = typer.Option(None, help="--config_file for each cell's `accelerate launch`."),
) -> None:
    """Run (or emit commands for) a grid of methods x task orders x seeds; finished cells are skipped."""
    from harness.runner import run_method
    from harness.store import atomic_write_text
    from harness.sweep import cell_config, cells, launch_commands, load_spec, slurm_script, write_base_config
    from tasks.registry import resolve_probes

    try:
        spec = load_spec(spec_file, {"sequence": sequence, "orders": orders, "n_orders": n_orders,
                                     "methods": methods, "seeds": seeds})
        if probes is not None:  # through the base, as every other RunConfig field a sweep shares
            spec = dataclasses.replace(spec, base={**spec.base, "probes": probes})
        resolve_probes(spec.sequence, cell_config(spec, cells(spec, out)[0]).probes)  # one line, before writing
        grid = cells(spec, out)
        from harness.preflight import preflight_cells

        preflight_cells([(f"{c.method} order={c.sequence} seed={c.seed}", cell_config(spec, c), c.run_dir)
                         for c in grid if not c.complete()])  # every cell valid before any runs or is written
        if accelerate_config and not emit and num_processes < 2:
            raise ConfigError("--accelerate-config needs --num-processes N (N >= 2) to run cells locally")
        if emit:
            lines = launch_commands(spec, out, num_processes, accelerate_config)
            cmds = out / "commands.txt"
            atomic_write_text(cmds, "".join(line + "\n" for line in lines))
            atomic_write_text(out / "slurm_array.sh", slurm_script(cmds, len(lines), num_processes))
            print("\n".join(lines))
            console.print(f"{len(lines)} unfinished of {len(grid)} cells -> {cmds} and {out / 'slurm_array.sh'}")
            return
        todo = [c for c in grid if not c.complete()]
        console.print(f"sweep: {len(grid)} cells, {len(grid) - len(todo)} already complete")
        base = write_base_config(spec, out) if num_processes > 1 else None
        for i, c in enumerate(todo, 1):
            console.print(f"[{i}/{len(todo)}] {c.method} order={c.sequence} seed={c.seed}")
            if base is None:
                run_method(c.method, cell_config(spec, c), c.run_dir)
                continue
            # one `accelerate launch` per cell, as the emitted commands do; a failed cell stops the sweep (the
            # finished ones stay complete and are skipped by the next call)
            argv = ["run", "--config", str(base), "--sequence", c.sequence, "--methods", c.method,
                    "--seed", str(c.seed), "--out", str(c.run_dir.parent)]
            if rc := _launch(argv, num_processes, cell_config(spec, c).device, accelerate_config):
                raise typer.Exit(rc)
    except USER_ERRORS as exc:
        _fail(exc)


@app.command("eval")
def eval_cmd(
    task: list[str] = typer.Option(..., "--task", "-t", help="Task(s) to evaluate."),
    method: str = typer.Option(None, help="Method whose generate() is used (default: the checkpoint's run's, "
                               "else vanilla)."),
    checkpoint: Path = typer.Option(None, help="A checkpoint folder written by the method (RUN/checkpoints/stageN); "
                                    "the run's config.json supplies model, dtype, LoRA/full and method options."),
    model: str = typer.Option(None, help="Reasoner model (default: the checkpoint's run's, else smollm2-135m)."),
    limit: int = typer.Option(None, help="Test examples per task."),
    seed: int = typer.Option(None, help="Seed of the subsample (default: the run's, else 0)."),
    data_dir: str = typer.Option(None, "--data-dir", help="Folder of local benchmark JSONL files."),
    out: Path = typer.Option(None, help="Write samples and scores here."),
    dtype: str = typer.Option(None, help=DTYPE_HELP),
    device: str = typer.Option(None, help=DEVICE_HELP),
    overrides: list[str] = typer.Option(None, "--set", "-s", help="Dotted override, e.g. eval.batch_size=8."),
    backend: str = typer.Option(None, "--backend", help="Generation backend: hf or vllm (eval.backend)."),
    model_args: str = typer.Option(None, "--model-args", help="from_pretrained arguments (k=v,k=v)."),
    chat_template: str = typer.Option(None, "--chat-template", help="native, chatml, none or a Jinja file."),
    system_prompt: str = typer.Option(None, "--system-prompt", help="System message before every conversation."),
) -> None:
    """Evaluate one method (optionally restored from a checkpoint) on one or more tasks."""
    from harness.methods import build_method
    from harness.models import load_run_model
    from harness.runner import evaluate
    from harness.store import atomic_write_json, atomic_write_jsonl
    from tasks.registry import get_task

    try:
        # RUN/checkpoints/stageN -> RUN/config.json: the run's own settings, so nothing is repeated by hand
        run_cfg = checkpoint.parent.parent / "config.json" if checkpoint is not None else None
        base = json.loads(run_cfg.read_text()) if run_cfg is not None and run_cfg.is_file() else {}
        method = method or (base.get("methods") or ["vanilla"])[0]
        opts = {"model": model, "seed": seed, "data_dir": data_dir, "dtype": dtype, "device": device,
                "methods": [method], **model_options(model_args, chat_template, system_prompt, None)}
        data = {k: v for k, v in base.items() if k not in ("out", "report_to")}
        data.update({k: v for k, v in opts.items() if v is not None})
        cfg = apply_overrides(from_dict(RunConfig, data),
                              [*([f"eval.backend={backend}"] if backend else []), *(overrides or [])])
        if base:
            console.print(f"settings of {run_cfg} (model {cfg.model}, dtype {cfg.dtype}, "
                          f"lora={cfg.train.lora}, method {method})")
        from harness.preflight import check_method_options, check_model

        check_methods([method])
        check_method_options(cfg)
        cfg = check_model(cfg)
        seed = cfg.seed
        tasks = [get_task(t, cfg.data_dir) for t in task]
        lm = load_run_model(cfg)
        m = build_method(method, lm, cfg)
        from harness.vllm_backend import fallback_note, use_backend

        used = use_backend(method, lm, cfg)
        if note := fallback_note(method, cfg):
            console.print(note)
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
            atomic_write_json(out / "eval.json", {"method": method, "model": cfg.model, "backend": used,
                                                  "results": results})
    except USER_ERRORS as exc:
        _fail(exc)
    print(json.dumps(results, indent=2))


@app.command()
def report(
    dirs: list[Path] = typer.Argument(..., help="Run directories or output roots (sweep roots: ROOT/*/METHOD)."),
    format: str = typer.Option("md", "--format", "-f", help="Output format: csv, latex, md or json (json implies "
                               "--ci)."),
    matrices: bool = typer.Option(False, help="Also print each run's accuracy matrix."),
    ci: bool = typer.Option(False, "--ci", help="Aggregate runs per method: mean +- 95% bootstrap CI."),
    plots: bool = typer.Option(False, "--plots", help="Write PNG+PDF figures (heatmaps, curves, bars)."),
    out: Path = typer.Option(None, "--out", "-o", help="Write tidy CSV, MD, LaTeX, JSON (+ plots) here."),
    conventions: str = typer.Option("gem", help="Metric conventions: gem, gem-code, trace, avalanche, chaudhry, "
                                    "incremental."),
    resamples: int = typer.Option(1000, help="Bootstrap resamples."),
    table: str = typer.Option("main", help="With --ci: main, final, retention, forgetting, bwt, fwt, learned."),
    compare: list[str] = typer.Option(None, "--compare", help="METHOD_A:METHOD_B (repeatable; implies --ci): the "
                                      "paired difference A - B of every metric with its 95% CI."),
) -> None:
    """One row per method with ACC, BWT, FWT, forgetting and retention (per run, or with --ci over runs)."""
    from harness.report import analysis_report, find_runs, matrix_table, render, summary_table

    if format not in ("csv", "latex", "md", "json"):
        _fail(ValueError(f"unknown format {format!r}; use csv, latex, md or json"))
    if resamples < 1:
        _fail(ValueError(f"bad --resamples {resamples}: use 1 or more (default 1000)"))
    try:
        from harness.vllm_backend import mixed_backend_warning

        if warning := mixed_backend_warning(dirs):
            console.print(warning)
        from harness.provenance import provenance_warnings

        for line in provenance_warnings(find_runs(dirs)):  # model, template, data, generation, hardware
            console.print(escape(line), soft_wrap=True)
        if ci or plots or out is not None or format == "json" or compare:
            from harness.analysis import tables

            target = out if out is not None else (dirs[0] / "report" if plots else None)
            a, written = analysis_report(dirs, target, conventions, resamples, plots, compare=compare or ())
            if format == "json":
                print(json.dumps(tables.to_json(a), indent=2))
            elif format == "csv":
                print(tables.to_csv(a))
            else:
                print(tables.to_latex(a, table) if format == "latex" else tables.to_markdown(a, table))
            if compare and format in ("md", "latex"):
                pairs = tables.parse_compare(compare, a.methods)
                print(f"\nPaired differences (first minus second). {tables.compare_note(a)}\n")
                print(tables.compare_table(a, pairs))
            for path in written:
                console.print(f"wrote {path}")
            for path in a.skipped:
                console.print(f"[yellow]left out unfinished run[/] {path}")
        else:
            print(render(summary_table(dirs, conventions), format,
                         caption=f"Continual-learning metrics (percent, {conventions} conventions)"))
        # the budget each row was given (harness/analysis/budget.py): per run, or with --ci the mean per method
        from harness.analysis.budget import budget_table, render_budget, write_budget

        # a folder holding only a report (cl_analysis.json, no run directories) has no budgets to show
        budget = budget_table(dirs, aggregate=ci) if any(next(Path(d).rglob("summary.json"), None) for d in dirs) \
            else None
        if budget is not None and format in ("md", "latex"):  # csv and json stay one machine-readable table
            print(f"\nTraining budget ({'mean per method over runs' if ci else 'per run'}):")
            print(render_budget(budget, format))
        if budget is not None and out is not None:
            console.print(f"wrote {write_budget(budget, out)}")
        if matrices:
            for run in find_runs(dirs):
                print(f"\n{run}")
                print(render(matrix_table(run).reset_index(), "md" if format == "json" else format))
    except USER_ERRORS as exc:
        _fail(exc)


@app.command()
def verify(
    run_dir: Path = typer.Argument(..., help="One method's run directory (holding summary.json)."),
    cells: str = typer.Option("all", help="Cells to re-run: all, or e.g. r0_arith,r3_choice or r2 (a row)."),
    retrain: bool = typer.Option(False, help="Re-train stage i from checkpoint i-1 instead of loading stage i."),
    tolerance: float = typer.Option(0.0, help="Allowed drift per cell in percentage points."),
) -> None:
    """Re-run chosen cells of an existing run and report the drift per cell (exit 1 if any exceeds tolerance)."""
    from harness.analysis.verify import verify_run

    def show(info: dict[str, Any]) -> None:
        console.print(f"  r{info['row']}_{info['task']}: stored {info['stored']:.2f} now {info['now']:.2f} "
                      f"(delta {info['delta']:+.2f}, {info['changed']} of {info['n']} samples changed)")

    try:
        df = verify_run(run_dir, cells, retrain, on_cell=show)
    except USER_ERRORS as exc:
        _fail(exc)
    df["ok"] = df["delta"].abs() <= tolerance + 1e-9
    print(df.to_markdown(index=False, floatfmt=".2f"))
    bad = int((~df["ok"]).sum())
    print(f"{bad} of {len(df)} cells drifted by more than {tolerance} points")
    if bad:
        raise typer.Exit(1)


@app.command("trigger-ablation")
def trigger_ablation_cmd(
    run_dir: Path = typer.Argument(..., help="A memgen run directory made with method_options.memgen.trigger=trained."),
    all_tasks: bool = typer.Option(False, "--all-tasks", help="Every task after every stage, not only the diagonal."),
    out: Path = typer.Option(None, "--out", "-o", help="Also write the table here (.csv, .md or .json)."),
) -> None:
    """Accuracy and insertion rate per task: the trained trigger vs always-insert, with the same weaver."""
    from harness.analysis.trigger_ablation import trigger_ablation
    from harness.store import atomic_write_text

    def show(r: dict[str, Any]) -> None:
        console.print(f"  after {r['learned']}, {r['task']}: trigger {r['trigger_acc']:.1f}% (rate "
                      f"{r['trigger_rate']:.1f}%) vs always {r['always_acc']:.1f}%")

    try:
        df = trigger_ablation(run_dir, all_tasks, on_row=show)
    except USER_ERRORS as exc:
        _fail(exc)
    text = df.to_markdown(index=False, floatfmt=".2f")
    print(text)
    if out is not None:
        body = {".csv": df.to_csv(index=False), ".json": df.to_json(orient="records", indent=1)}.get(out.suffix, text)
        atomic_write_text(out, body + "\n")


@app.command()
def transfer(
    sequence: str = typer.Option(None, help="Tasks to cross (named sequence or 'a,b,c'; default: quick)."),
    methods: str = typer.Option(None, help="Comma-separated methods (default: vanilla,sft)."),
    model: str = typer.Option(None, help="Reasoner model."),
    seed: int = typer.Option(None, help="Master seed."),
    limit: int = typer.Option(None, help="Cap train and test examples per task."),
    out: str = typer.Option("runs/transfer", help="Output root; one folder per method (and seed)."),
    by: str = typer.Option("task", help="Source unit: task, or domain (train on all tasks of a domain)."),
    data_dir: str = typer.Option(None, "--data-dir", help="Folder of local benchmark JSONL files."),
    dtype: str = typer.Option(None, help="fp32, bf16 or fp16."),
    device: str = typer.Option(None, help="cpu, cuda or cuda:N."),
    config: Path = typer.Option(None, "--config", "-c", help="YAML file with RunConfig fields."),
    overrides: list[str] = typer.Option(None, "--set", "-s", help="Dotted override, e.g. train.max_steps=8."),
    format: str = typer.Option("md", "--format", "-f", help="md or latex."),
) -> None:
    """Cross-domain transfer: train on one source, evaluate on all targets; table source x target minus init."""
    from harness.analysis.transfer import run_transfer, transfer_matrix, transfer_table

    try:
        opts = {"sequence": sequence, "model": model, "seed": seed, "limit": limit, "data_dir": data_dir,
                "dtype": dtype, "device": device, "methods": methods.split(",") if methods else None}
        cfg = build_config(config, opts, overrides or [])
        check_methods(cfg.methods)
        dirs = []
        for name in cfg.methods:
            d = Path(out) / f"{name}-s{cfg.seed}"
            run_transfer(name, cfg, d, by, on_event=lambda kind, i: console.print(
                f"  {i['method']} {i['source']}: " + (f"eval {i['task']} {i['accuracy']:.2f}% (n={i['n']})"
                                                      if kind == "eval_end" else f"training on {i['task']}")))
            dirs.append(d)
        df = transfer_table([Path(out)])  # every seed run into this root so far
        from harness.store import atomic_write_text

        atomic_write_text(Path(out) / "transfer_table.csv", df.to_csv(index=False, float_format="%.4f"))
    except USER_ERRORS as exc:
        _fail(exc)
    for name in cfg.methods:
        m = transfer_matrix(df, name, format)
        print(m.to_latex(escape=False) if format == "latex" else m.to_markdown())
        print()


@app.command()
def tasks() -> None:
    """List the tasks and named sequences."""
    from tasks.registry import definitions, sequences

    t = Table("task", "version", "domain", "description", title="tasks")
    for name, d in sorted(definitions().items()):
        t.add_row(name, d.version, d.domain, d.description)
    Console().print(t)
    s = Table("sequence", "tasks", "probes", "description", title="sequences")
    for name, seq in sorted(sequences().items()):
        s.add_row(name, " -> ".join(seq["tasks"]), ", ".join(seq.get("probes") or []), seq.get("description", ""))
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
        from harness.preflight import preflight

        cfg = preflight(build_config(config, {}, overrides or []))  # validated as `run` validates it
        out = to_dict(cfg)
        if "memgen" in cfg.methods:  # every MemGen option, defaults included, validated by its own dataclass
            from harness.memgen.options import resolved_options

            out["resolved_method_options"] = {"memgen": resolved_options(cfg.method_options.get("memgen", {}))}
    except USER_ERRORS as exc:
        _fail(exc)
    print(yaml.safe_dump(out, sort_keys=False))


def main() -> None:  # pragma: no cover - console entry
    app(sys.argv[1:])


if __name__ == "__main__":  # pragma: no cover
    app()
