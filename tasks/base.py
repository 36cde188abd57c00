"""The ``Task`` protocol and the data-driven task built from a versioned YAML definition.

A task turns rows (a local JSONL file, a Hub dataset, or a seeded generator) into ``Example``s, builds prompts,
extracts answers and scores completions. The score is also the RL reward. Methods never score themselves.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
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
    """User-message template over the row: ``{question}`` (the example's question) and ``{column}`` for any column
    of the row, or a Jinja2 template (``{{ Body }}``, ``{% if ... %}``) when it holds ``{{`` or ``{%``. An unknown
    column is a one-line error naming it and the row's columns."""
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
    hub_revision: str | None = None
    """Git revision (commit, tag or branch) of the Hub dataset, for a pinned copy; recorded in meta.json."""
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
    method_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-method option defaults on this task, e.g. ``{memgen: {max_insertions: 3}}`` (the MemGen public code's cap
    on GSM8K); options the run sets explicitly win. MemGen accepts the keys in ``harness.memgen.options.PER_TASK``."""
    instruction: str = ""
    """Text put before the few-shot examples and the prompt (lm-eval's ``description``)."""
    num_fewshot: int = 0
    """Solved examples of ``fewshot_split`` put before the prompt (each: rendered prompt, a space, its target),
    chosen once per task with a fixed seed; the example being asked is never its own shot."""
    fewshot_split: str = "train"
    """The split the few-shot examples come from."""


_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def is_jinja(template: str) -> bool:
    return "{{" in template or "{%" in template


def template_columns(template: str) -> set[str]:
    """The ``{column}`` fields a non-Jinja template uses (Jinja templates: checked when rendered)."""
    return set() if is_jinja(template) else set(_FIELD.findall(template))


def render_template(template: str, context: dict[str, Any], where: str) -> str:
    """``template`` filled from ``context``: Jinja2 (strict: an unknown name fails) or ``{column}`` fields replaced
    in one pass (so braces inside the values, e.g. code, are never read as fields). ``where`` names the task and
    the data in the error."""
    if is_jinja(template):
        import jinja2

        try:
            return jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True).from_string(
                template).render(**context)
        except jinja2.UndefinedError as exc:
            raise TaskError(f"{where}: the prompt template uses an unknown column ({exc.message}); columns: "
                            f"{sorted(context)}") from exc
        except jinja2.TemplateError as exc:
            raise TaskError(f"{where}: bad Jinja2 prompt template ({type(exc).__name__}: {exc})") from exc
    unknown = sorted(template_columns(template) - set(context))
    if unknown:
        raise TaskError(f"{where}: the prompt template uses unknown column(s) {unknown}; columns: {sorted(context)}")
    return _FIELD.sub(lambda m: str(context[m.group(1)]), template)


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
        path = self.local_path(split)
        if path is not None:
            return read_jsonl(path), str(path)
        if d.hub is None:
            raise TaskError(f"task {d.name}: no local data (set --data-dir / MEMGEN_BENCH_DATA) and no Hub id")
        import datasets

        try:
            ds = datasets.load_dataset(d.hub, d.hub_config, split=stem, revision=d.hub_revision)
        except Exception as exc:  # noqa: BLE001
            raise TaskError(
                f"task {d.name}: could not load {d.hub} split {stem} from the Hub ({type(exc).__name__}); "
                f"offline? pass --data-dir with {d.local}/{stem}.jsonl"
            ) from exc
        rows = [dict(r, _line=i + 1) for i, r in enumerate(ds)]
        return rows, f"hf://{d.hub}/{stem}"

    def local_path(self, split: str) -> Path | None:
        """The local JSONL file of ``split``, or None where the Hub serves it: no data root, no local layout, or an
        existing data root without this task's folder while the task has a Hub id (the Hub is the fallback; a
        data root that does not exist is an error, not a fallback)."""
        d = self.definition
        root = data_dir(self._data_root)
        if root is None or d.local is None or (d.hub is not None and root.is_dir() and not (root / d.local).is_dir()):
            return None
        return root / d.local / f"{d.local_splits.get(split, d.splits[split])}.jsonl"

    def data_source(self, split: str) -> dict[str, Any]:
        """Where ``split`` comes from, for meta.json: a generator, a local file (with its sha256) or a Hub dataset
        (id, config, split, pinned revision)."""
        d = self.definition
        if d.generator is not None:
            return {"kind": "generator", "generator": d.generator, "args": dict(d.generator_args)}
        if split not in d.splits:
            return {"kind": "none"}
        path = self.local_path(split)
        if path is not None:
            digest = hashlib.sha256()
            if path.exists():
                with path.open("rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        digest.update(chunk)
            return {"kind": "local", "path": str(path), "sha256": digest.hexdigest() if path.exists() else None}
        return {"kind": "hub", "id": d.hub, "config": d.hub_config, "split": d.splits[split],
                "revision": d.hub_revision}

    def check_data(self, splits: tuple[str, ...] = ("train", "test")) -> None:
        """Fail now, with the file named, where a split's local file is missing or its first row does not fit the
        prompt template (the Hub is not contacted here; a Hub split fails when it loads)."""
        d = self.definition
        if d.generator is not None:
            return
        for split in (s for s in splits if s in d.splits):
            path = self.local_path(split)
            if path is None:
                if d.hub is None:
                    raise TaskError(f"task {d.name}: no local data (set --data-dir / MEMGEN_BENCH_DATA) and no Hub id")
                continue
            if not path.exists():
                read_jsonl(path)  # its one-line "data file not found" error
            if type(self).user_message is DefinedTask.user_message and type(self).load is DefinedTask.load:
                with path.open(encoding="utf-8") as fh:
                    first = next((line for line in fh if line.strip()), None)
                if first is not None:
                    self._examples([{**json.loads(first), "_line": 1}], str(path))

    def load(self, split: str, limit: int | None = None, seed: int = 0) -> list[Example]:
        from tasks.synthetic import GENERATORS

        d = self.definition
        if d.generator is not None:
            if split not in d.splits:
                raise TaskError(f"task {d.name} has no split {split!r}; it has {sorted(d.splits)}")
            examples = GENERATORS[d.generator](split=split, **d.generator_args)
            return subsample(examples, limit, seed)
        rows, origin = self.raw_rows(split)
        return self._examples(subsample(rows, limit, seed), origin)

    def _examples(self, rows: list[dict[str, Any]], origin: str) -> list[Example]:
        """Rows -> Examples through the adapter; rows travel along (``meta["row"]``) when the prompt template uses
        columns beyond the question, and the first example's prompt is rendered so a bad column fails here."""
        from tasks.adapters import ADAPTERS

        d = self.definition
        if d.adapter not in ADAPTERS:
            raise TaskError(f"task {d.name}: unknown adapter {d.adapter!r}; valid: {sorted(ADAPTERS)}")
        adapt = ADAPTERS[d.adapter]
        keep_row = is_jinja(d.prompt) or bool(template_columns(d.prompt) - {"question"})
        examples = []
        for row in rows:
            try:
                ex = adapt(row, d)
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                raise TaskError(
                    f"{origin}:{row.get('_line', '?')}: malformed row for task {d.name} "
                    f"({type(exc).__name__}: {exc}); expected columns {sorted(d.fields.values()) or 'see adapter'}"
                ) from exc
            if keep_row:
                ex = dataclasses.replace(ex, meta={**ex.meta, "row": {k: v for k, v in row.items() if k != "_line"}})
            examples.append(ex)
        if examples:
            self._render(examples[0], f"task {d.name} ({origin}:{rows[0].get('_line', '?')})")
        return examples

    # -- prompting and scoring ----------------------------------------------------------------------------
    def _render(self, example: Example, where: str) -> str:
        context = {**example.meta.get("row", {}), "question": example.question}
        return render_template(self.definition.prompt, context, where)

    def _shots(self, example: Example) -> list[Example]:
        """``num_fewshot`` examples of ``fewshot_split``, the same for every prompt except that an example never
        shows itself (one extra is drawn to replace it)."""
        d = self.definition
        if not hasattr(self, "_fewshot_pool"):
            pool = self.load(d.fewshot_split)
            k = min(len(pool), d.num_fewshot + 1)
            self._fewshot_pool = [pool[i] for i in random.Random(f"{d.name}:fewshot").sample(range(len(pool)), k)]
        return [s for s in self._fewshot_pool if s.id != example.id][: d.num_fewshot]

    def user_message(self, example: Example) -> str:
        d = self.definition
        text = self._render(example, f"task {d.name}")
        if d.num_fewshot > 0:  # lm-eval's layout: prompt, " ", target per shot, shots joined by a blank line
            shots = [f"{self._render(s, f'task {d.name}')} {s.target}" for s in self._shots(example)]
            text = "\n\n".join([*shots, text])
        return d.instruction + text

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
