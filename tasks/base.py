"""The ``Task`` protocol and the data-driven task built from a versioned YAML definition.

A task turns rows (a local JSONL file, a Hub dataset, or a seeded generator) into ``Example``s, builds prompts,
extracts answers and scores completions. The score is also the RL reward. Methods never score themselves.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from tasks.scoring import FILTERS, METRICS, cut_at_stops, explain_extraction


class TaskError(ValueError):
    """Bad task input (unknown task, missing file, malformed row); the message says what and how to fix it."""


@dataclass(frozen=True)
class Example:
    """One problem. ``target`` is the gold completion used for SFT; ``answer`` the gold the scorer compares to."""

    id: str
    question: str
    answer: str
    target: str
    meta: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Task(Protocol):
    name: str
    version: str
    domain: str
    max_new_tokens: int

    def load(self, split: str, limit: int | None = None, seed: int = 0) -> list[Example]: ...

    def prompt(self, example: Example, tokenizer: Any = None) -> str: ...

    def extract(self, completion: str) -> str | None: ...

    def score(self, completion: str, example: Example) -> float: ...


@dataclass(frozen=True)
class TaskDefinition:
    """A benchmark as data. Bump ``version`` whenever the prompt, the adapter or the scoring changes."""

    name: str
    """Registry name, e.g. ``gsm8k``."""
    version: str
    """Stored with every result; results of different versions are not comparable."""
    domain: str
    """Skill family (math, code, symbolic, choice, ...), used by cross-domain tables."""
    prompt: str
    """User-message template; ``{question}`` is replaced by the example's question."""
    filter: str
    """Name of the answer extractor in ``tasks.scoring.FILTERS``."""
    metric: str
    """Name of the comparison in ``tasks.scoring.METRICS``."""
    max_new_tokens: int = 256
    """Generation budget at evaluation."""
    adapter: str = "fields"
    """How a raw row becomes an Example: a name in ``tasks.adapters.ADAPTERS`` (``fields`` maps columns)."""
    fields: dict[str, str] = field(default_factory=dict)
    """For the ``fields`` adapter: ``question``/``answer``/``target`` -> column name."""
    hub: str | None = None
    """Hugging Face dataset id, used when no local data directory holds the files."""
    hub_config: str | None = None
    """Dataset config name on the Hub."""
    local: str | None = None
    """Sub-folder of the data directory that holds ``<split file>.jsonl``."""
    splits: dict[str, str] = field(default_factory=dict)
    """Our split name (train/test) -> the Hub dataset's split (and the local file stem unless overridden)."""
    local_splits: dict[str, str] = field(default_factory=dict)
    """Overrides of ``splits`` for local files (e.g. AQuA offline trains on its validation file)."""
    implementation: str | None = None
    """``module:Class`` for tasks that need code (e.g. an execution sandbox); called as Class(definition, data_root)."""
    generator: str | None = None
    """For procedural tasks: a name in ``tasks.synthetic.GENERATORS`` (then no files are read)."""
    generator_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the generator (sizes of the splits, difficulty)."""
    description: str = ""
    """One line for ``memgen-bench tasks``."""
    options: dict[str, Any] = field(default_factory=dict)
    """Settings read by an ``implementation`` class (environment parameters, a retrieval corpus, turn limits)."""
    until: list[str] = field(default_factory=list)
    """Stop strings (lm-eval's ``until``): a completion is cut at the first of them before it is scored, in
    evaluation and as an RL reward; generation itself stops on the model's own stop tokens."""


def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The local data root: the explicit argument, else ``$MEMGEN_BENCH_DATA``, else None (use the Hub)."""
    root = explicit or os.environ.get("MEMGEN_BENCH_DATA")
    return Path(root) if root else None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise TaskError(f"data file not found: {path} (set --data-dir or MEMGEN_BENCH_DATA to the folder holding it)")
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskError(f"{path}:{lineno}: malformed JSON ({exc.msg}); fix or remove that line") from exc
            if not isinstance(row, dict):
                raise TaskError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
            row["_line"] = lineno
            rows.append(row)
    return rows


def subsample(items: list, limit: int | None, seed: int) -> list:
    """A seeded subset of ``limit`` items (order kept stable), or all of them."""
    if limit is None or limit >= len(items):
        return list(items)
    idx = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in idx]


class DefinedTask:
    """A ``Task`` driven entirely by a ``TaskDefinition``."""

    def __init__(self, definition: TaskDefinition, data_root: str | os.PathLike | None = None):
        if definition.filter not in FILTERS:
            raise TaskError(f"task {definition.name}: unknown filter {definition.filter!r}; valid: {sorted(FILTERS)}")
        if definition.metric not in METRICS:
            raise TaskError(f"task {definition.name}: unknown metric {definition.metric!r}; valid: {sorted(METRICS)}")
        self.definition = definition
        self.name = definition.name
        self.version = definition.version
        self.domain = definition.domain
        self.max_new_tokens = definition.max_new_tokens
        self._data_root = data_root
        self._filter: Callable[[str], str | None] = FILTERS[definition.filter]
        self._metric = METRICS[definition.metric]

    # -- loading -------------------------------------------------------------------------------------------
    def raw_rows(self, split: str) -> tuple[list[dict[str, Any]], str]:
        d = self.definition
        if split not in d.splits:
            raise TaskError(f"task {d.name} has no split {split!r}; it has {sorted(d.splits)}")
        stem = d.splits[split]
        root = data_dir(self._data_root)
        if root is not None and d.local is not None:
            path = root / d.local / f"{d.local_splits.get(split, stem)}.jsonl"
            return read_jsonl(path), str(path)
        if d.hub is None:
            raise TaskError(f"task {d.name}: no local data (set --data-dir / MEMGEN_BENCH_DATA) and no Hub id")
        import datasets

        try:
            ds = datasets.load_dataset(d.hub, d.hub_config, split=stem)
        except Exception as exc:  # noqa: BLE001
            raise TaskError(
                f"task {d.name}: could not load {d.hub} split {stem} from the Hub ({type(exc).__name__}); "
                f"offline? pass --data-dir with {d.local}/{stem}.jsonl"
            ) from exc
        rows = [dict(r, _line=i + 1) for i, r in enumerate(ds)]
        return rows, f"hf://{d.hub}/{stem}"

    def load(self, split: str, limit: int | None = None, seed: int = 0) -> list[Example]:
        from tasks.adapters import ADAPTERS
        from tasks.synthetic import GENERATORS

        d = self.definition
        if d.generator is not None:
            if split not in d.splits:
                raise TaskError(f"task {d.name} has no split {split!r}; it has {sorted(d.splits)}")
            examples = GENERATORS[d.generator](split=split, **d.generator_args)
            return subsample(examples, limit, seed)
        rows, origin = self.raw_rows(split)
        if d.adapter not in ADAPTERS:
            raise TaskError(f"task {d.name}: unknown adapter {d.adapter!r}; valid: {sorted(ADAPTERS)}")
        adapt = ADAPTERS[d.adapter]
        examples = []
        for row in subsample(rows, limit, seed):
            try:
                examples.append(adapt(row, d))
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                raise TaskError(
                    f"{origin}:{row.get('_line', '?')}: malformed row for task {d.name} "
                    f"({type(exc).__name__}: {exc}); expected columns {sorted(d.fields.values()) or 'see adapter'}"
                ) from exc
        return examples

    # -- prompting and scoring ----------------------------------------------------------------------------
    def user_message(self, example: Example) -> str:
        return self.definition.prompt.replace("{question}", example.question)

    def prompt(self, example: Example, tokenizer: Any = None) -> str:
        return render_prompt(self.user_message(example), tokenizer)

    def truncate(self, completion: str) -> str:
        """The completion up to the first of the task's ``until`` stop strings."""
        return cut_at_stops(completion, self.definition.until)

    def extract(self, completion: str) -> str | None:
        return self._filter(self.truncate(completion))

    def explain(self, completion: str) -> tuple[str | None, str | None]:
        """The extracted answer and the name of the filter rule that found it (stored with each sample); the rule
        is None when nothing was found or a subclass extracts its own way."""
        if type(self).extract is not DefinedTask.extract:
            return self.extract(completion), None
        return explain_extraction(self.definition.filter, self.truncate(completion))

    def score(self, completion: str, example: Example) -> float:
        return float(self._metric(self.extract(completion), example.answer))


def render_prompt(user_message: str, tokenizer: Any = None) -> str:
    """Apply the tokenizer's chat template (one user turn, generation prompt) when it has one."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user_message}], tokenize=False, add_generation_prompt=True
        )
    return user_message + "\n"
