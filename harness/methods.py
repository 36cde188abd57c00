"""The ``Method`` protocol and the method registry.

A method owns a model (and whatever memory it keeps), trains on one task at a time and generates completions.
It never scores: the runner scores every completion with the task's own scorer.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from harness.config import ConfigError, RunConfig
from harness.models import LoadedModel
from tasks.base import Example, Task


@runtime_checkable
class Method(Protocol):
    name: str

    def train_on_task(self, task: Task, examples: Sequence[Example], stage: int) -> dict[str, Any]:
        """Learn ``task`` from its training ``examples``; returns training statistics (loss curve, time)."""
        ...

    def generate(self, task: Task, examples: Sequence[Example], max_new_tokens: int) -> list[str]:
        """Completions for ``examples`` (the method builds its own prompts from ``task``)."""
        ...

    def save(self, path: Path) -> None:
        """Write everything needed to restore the method's learned state into folder ``path``."""
        ...

    def load(self, path: Path) -> None:
        """Restore the state written by ``save``."""
        ...


# name -> "module:Class"; imported lazily so that `memgen-bench methods` stays fast.
METHODS: dict[str, str] = {
    "vanilla": "baselines.vanilla:Vanilla",
    "sft": "baselines.sft:SFT",
}

METHOD_DESCRIPTIONS: dict[str, str] = {
    "vanilla": "frozen model, no training (the init row repeated)",
    "sft": "supervised fine-tuning on gold targets (LoRA by default, full with train.lora=false)",
}


def method_names() -> list[str]:
    return sorted(METHODS)


def check_methods(names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; valid methods: {', '.join(method_names())}")


def build_method(name: str, model: LoadedModel, cfg: RunConfig) -> Method:
    check_methods([name])
    module, _, attr = METHODS[name].partition(":")
    cls = getattr(importlib.import_module(module), attr)
    return cls(model, cfg, dict(cfg.method_options.get(name, {})))
