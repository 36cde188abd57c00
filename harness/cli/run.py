"""The commands that load a model: ``run``, ``sweep`` and ``eval``."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from harness.cli.common import (
    DEVICE_HELP,
    DTYPE_HELP,
    METHODS_HELP,
    PROBES_HELP,
    USER_ERRORS,
    _fail,
    app,
    build_config,
    console,
    model_options,
)
from harness.cli.launch import _launch, _relaunch
from harness.cli.progress import _Progress
from harness.config import ConfigError, RunConfig, apply_overrides, from_dict
from harness.methods import check_methods
from harness.sharded import SHARDING_METHODS, unsharded_methods


@app.command()
def run(
    sequence: str = typer.Option(None, help="Named sequence or inline 'a,b,c' (default: quick)."),
    probes: str = typer.Option(None, help=PROBES_HELP),
    methods: str = typer.Option(None, help=METHODS_HELP),
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
    from harness.analysis.budget import budget_table, render_budget
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
    print("\nbudget used (harness/budget.py; train s = training wall time):")
    print(render_budget(budget_table(dirs), "md"))
    for d in dirs:
        print(f"\n{d}/matrix.csv")
        print((d / "matrix.csv").read_text())


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
