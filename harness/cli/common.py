"""The Typer app and what its commands share: the console, the user-error types, option help and config
building."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from harness.config import ConfigError, RunConfig, apply_overrides, from_dict, load_yaml, parse_model_args
from harness.errors import ModelLoadError, NonFiniteLossError
from tasks.base import TaskError

app = typer.Typer(add_completion=False, no_args_is_help=False, help="Continual-learning benchmark harness: MemGen "
                  "latent memory vs weight updates vs retrieval.", pretty_exceptions_enable=False)
console = Console(stderr=True, soft_wrap=True)  # log files get whole lines, not lines hard-wrapped at 80 columns
USER_ERRORS = (ConfigError, TaskError, ModelLoadError, NonFiniteLossError, FileNotFoundError, ValueError)
DTYPE_HELP = "fp32, bf16, fp16 or auto (default: the checkpoint's dtype on GPU; on CPU bf16 for a bf16 checkpoint with native bf16 kernels, else fp32)."
DEVICE_HELP = "cpu, cuda or cuda:N."
# From RunConfig itself, so the help cannot drift from the default it describes.
METHODS_HELP = f"Comma-separated methods (default: {','.join(RunConfig().methods)})."
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
