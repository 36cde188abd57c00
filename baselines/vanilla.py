"""Vanilla: the frozen model, no training. Its rows after ``init`` repeat the init row (a check of determinism)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.config import RunConfig
from harness.generation import generate_greedy
from harness.models import LoadedModel
from tasks.base import Example, Task


class Vanilla:
    name = "vanilla"
    trains = False  # the runner copies row 0 into later rows instead of re-generating identical outputs

    def __init__(self, model: LoadedModel, cfg: RunConfig, options: dict[str, Any]):
        if options:
            raise ValueError(f"method vanilla takes no options, got {sorted(options)}")
        self.lm = model
        self.cfg = cfg

    def train_on_task(self, task: Task, examples: Sequence[Example], stage: int) -> dict[str, Any]:
        return {"trained": False}

    def generate(self, task: Task, examples: Sequence[Example], max_new_tokens: int) -> list[str]:
        prompts = [task.prompt(e, self.lm.tokenizer) for e in examples]
        return generate_greedy(self.lm.model, self.lm.tokenizer, prompts, max_new_tokens, self.cfg.eval.batch_size)

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)

    def load(self, path: Path) -> None:
        pass
