"""The commands over finished runs: ``report``, ``verify``, ``trigger-ablation``, and ``transfer``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from harness.cli.common import METHODS_HELP, USER_ERRORS, _fail, app, build_config, console
from harness.methods import check_methods


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
    methods: str = typer.Option(None, help=METHODS_HELP),
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
