"""The listing commands: ``tasks``, ``methods`` and ``config``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from harness.cli.common import USER_ERRORS, _fail, app, build_config
from harness.config import to_dict
from harness.methods import METHOD_DESCRIPTIONS, method_names


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
