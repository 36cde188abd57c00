"""``memgen-bench``: a thin Typer layer over RunConfig, the runner and the report tables.

One module per concern: ``common`` (the app, console, user errors, shared option help, config building),
``run`` (run, sweep, eval), ``analysis`` (report, verify, trigger-ablation, transfer), ``info`` (tasks, methods,
config), with ``progress`` (the live view of a run) and ``launch`` (``accelerate launch`` re-launches).
"""

from __future__ import annotations

import sys

from harness.cli.common import USER_ERRORS, app, build_config, console, model_options

# The commands register on ``app`` as their modules are imported, in the order ``--help`` lists them.
# isort: off
from harness.cli import run  # noqa: F401  run, sweep, eval
from harness.cli import analysis  # noqa: F401  report, verify, trigger-ablation, transfer
from harness.cli import info  # noqa: F401  tasks, methods, config
# isort: on

__all__ = ["USER_ERRORS", "app", "build_config", "console", "main", "model_options"]


def main() -> None:  # pragma: no cover - console entry
    app(sys.argv[1:])
