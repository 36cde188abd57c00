"""The ``Method`` protocol and the method registry.

A method owns a model (and whatever memory it keeps), trains on one task at a time and generates completions.
It never scores: the runner scores every completion with the task's own scorer.

Optional attributes the runner uses when present: ``trains = False`` (the method never changes: later rows copy
row 0), ``last_prompts`` (the prompts actually used, recorded with the samples) and ``on_step`` (set by the
runner before training: call ``on_step(step, total_steps, loss)`` once per optimizer step to drive the progress
bar and the run's tracker; ``scalars={...}`` adds what else the step measured (learning_rate, reward, kl,
insert_rate, tokens_per_s...), logged as ``train/<task>/<key>``; a method that trains in several phases, as MemGen
does, adds ``phase="..."`` to tell them apart).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from harness.config import ConfigError, RunConfig
from tasks.base import Example, Task

if TYPE_CHECKING:  # keep `memgen-bench methods` free of torch imports
    from harness.models import LoadedModel


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
    "memgen": "harness.memgen.method:MemGen",
    "expel": "baselines.retrieval_expel:ExpeL",
    "awm": "baselines.retrieval_awm:AWM",
    "grpo": "baselines.grpo:GRPO",
    "reinforce_pp": "baselines.reinforce_pp:ReinforcePP",
}

METHOD_DESCRIPTIONS: dict[str, str] = {
    "vanilla": "frozen model, no training (the init row repeated)",
    "sft": "supervised fine-tuning on gold targets (LoRA by default, full with train.lora=false)",
    "memgen": "MemGen: frozen reasoner + LoRA memory weaver inserting latent tokens (weaver SFT/GRPO, "
              "optional RL-trained trigger)",
    "expel": "ExpeL-style retrieval memory: similar past successes as few-shot + model-distilled insights",
    "awm": "AWM-style workflow memory: abstract workflows induced from successes, retrieved into the prompt",
    "grpo": "GRPO on the reasoner via TRL's GRPOTrainer, task score as reward (group 8, beta 0, LoRA by default)",
    "reinforce_pp": "REINFORCE++ (OpenRLHF semantics): k1 KL in the reward, globally whitened returns (LoRA default)",
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
