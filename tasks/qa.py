"""Knowledge tasks: open-domain QA (TriviaQA, PopQA) with an optional search tool, and science multiple choice
(GPQA, ARC-Challenge) with options shuffled by a fixed per-question seed.

QA is closed-book by default (one turn, ``<answer>...</answer>``). Given a corpus (``options.corpus``: a JSONL of
passages with a ``text`` field, relative paths read from the data directory), the model may call
``<search>query</search>`` and gets the top-k BM25 passages (``bm25s``) back as ``<information>...</information>``,
Search-R1 style, through the multi-turn loop of ``harness.agent``, until it answers or runs out of turns. The corpus
is read through ``datasets`` (memory-mapped) and its index saved once and reloaded (``harness/bm25.py``).
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import string
from collections import Counter
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from harness.agent import AgentConfig, InvalidAction, Message, parse_tagged, render_messages, run_episodes
from harness.bm25 import BM25, Corpus, corpus_index
from tasks.base import DefinedTask, Example, TaskDefinition, TaskError, data_dir, subsample

# --- answer normalisation and scores (pure) -----------------------------------------------------------------


def normalize_answer(text: str | None) -> str:
    """SQuAD/TriviaQA normalisation: lower-case, drop punctuation and articles, collapse whitespace."""
    if not text:
        return ""
    t = text.lower()
    t = "".join(ch for ch in t if ch not in set(string.punctuation))
    t = re.sub(r"\b(a|an|the)\b", " ", t)
    return " ".join(t.split())


def exact_match(pred: str | None, aliases: list[str]) -> float:
    p = normalize_answer(pred)
    return float(bool(p) and any(p == normalize_answer(a) for a in aliases))


def token_f1(pred: str | None, aliases: list[str]) -> float:
    """The best token-level F1 between the prediction and any alias."""
    p = normalize_answer(pred).split()
    best = 0.0
    for a in aliases:
        g = normalize_answer(a).split()
        common = sum((Counter(p) & Counter(g)).values())
        if common:
            prec, rec = common / len(p), common / len(g)
            best = max(best, 2 * prec * rec / (prec + rec))
    return best


def alias_match(pred: str | None, aliases: list[str]) -> float:
    """1 if a normalised alias occurs in the normalised prediction as whole words (the usual 'cover EM')."""
    p = f" {normalize_answer(pred)} "
    return float(any(n and f" {n} " in p for n in (normalize_answer(a) for a in aliases)))


QA_METRICS = {"match": alias_match, "em": exact_match, "f1": token_f1}


def extract_answer(text: str) -> str | None:
    """The last ``<answer>...</answer>``; else the text after a final 'Answer:'; else the first line."""
    found = re.findall(r"<answer>(.*?)(?:</answer>|$)", text, flags=re.S | re.I)
    found = [f.strip() for f in found if f.strip()]
    if found:
        return found[-1]
    from tasks.scoring import extract_answer_line

    return extract_answer_line(re.sub(r"<[^>]+>", " ", text))


# --- retrieval -------------------------------------------------------------------------------------------------


@cache
def _index_for(path: str) -> tuple[Corpus, BM25]:
    """The corpus (memory-mapped through ``datasets``) and its BM25 index, built once and then reloaded from the
    cache (``harness/bm25.py``); kept for the process's lifetime."""
    return corpus_index(Path(path))


class SearchEnvironment:
    """One question: ``<search>q</search>`` returns passages, ``<answer>a</answer>`` ends the episode with its score."""

    def __init__(self, first_message: str, search: tuple[Corpus, BM25], aliases: list[str], top_k: int,
                 metric: str):
        self.first, self.aliases, self.top_k, self.metric = first_message, aliases, top_k, metric
        self.corpus, self.index = search

    def reset(self) -> str:
        return self.first

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        kind, _, arg = action.partition(":")
        if kind == "answer":
            r = QA_METRICS[self.metric](arg, self.aliases)
            return "", r, True, {"success": r >= 1.0}
        docs = [self.corpus[i] for i, _ in self.index.top(arg, self.top_k)]
        body = "\n".join(f"Doc {i + 1}: {d}" for i, d in enumerate(docs)) or "No results."
        return f"<information>\n{body}\n</information>", 0.0, False, {}

    def close(self) -> None:
        pass


def parse_search_action(reply: str) -> str:
    tag, content = parse_tagged(reply, ["search", "answer"])
    return f"{tag}:{content}"


# --- open-domain QA ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QAOptions:
    """Options of the open-domain QA tasks (``options:`` in their YAML definition)."""

    metric: str = "match"
    """Score: ``match`` (an alias occurs in the answer as whole words), ``em`` (exact match) or ``f1``."""
    corpus: str | None = None
    """JSONL of passages for the search tool (relative to the data directory); None = closed-book."""
    top_k: int = 3
    """Passages returned per search."""
    max_turns: int = 5
    """Assistant turns per question with the search tool (the last one should answer)."""
    context_tokens: int = 2048
    """Prompt budget per turn (approximate tokens); older searches are dropped to fit."""
    search_prompt: str = (
        "Answer the question. You may search a knowledge source by writing <search>query</search>; results come "
        "back inside <information>...</information>. When you know the answer, write <answer>answer</answer>."
        "\nQuestion: {question}"
    )
    """User message when a corpus is given (``{question}`` is replaced)."""
    train_fraction: float | None = None
    """When train and test name the same source split (PopQA has only ``test``): the share of rows, chosen by a
    hash of the id, that forms the train split; the rest is the test split. None = use the splits as named."""


def triviaqa_row(row: dict[str, Any], d: TaskDefinition) -> Example:
    """mandarjoshi/trivia_qa (rc.*): question, question_id, answer{value, aliases, normalized_aliases, ...}."""
    ans = row["answer"]
    aliases = list(dict.fromkeys([ans["value"], *ans.get("aliases", []), *ans.get("normalized_aliases", [])]))
    return Example(id=str(row["question_id"]), question=str(row["question"]).strip(), answer=str(ans["value"]),
                   target=f"<answer>{ans['value']}</answer>", meta={"aliases": aliases})


def popqa_row(row: dict[str, Any], d: TaskDefinition) -> Example:
    """akariasai/PopQA: id, question, obj, possible_answers (a JSON-encoded list), s_pop, prop, ..."""
    answers = row["possible_answers"]
    answers = json.loads(answers) if isinstance(answers, str) else list(answers)
    if not answers:
        raise ValueError("possible_answers is empty")
    meta = {"aliases": [str(a) for a in answers], **{k: row[k] for k in ("s_pop", "prop") if k in row}}
    return Example(id=str(row["id"]), question=str(row["question"]).strip(), answer=str(answers[0]),
                   target=f"<answer>{answers[0]}</answer>", meta=meta)


QA_ADAPTERS = {"triviaqa": triviaqa_row, "popqa": popqa_row}


class OpenQATask(DefinedTask):
    """TriviaQA / PopQA: closed-book by default; multi-turn with the search tool when a corpus is given."""

    def __init__(self, definition: TaskDefinition, data_root: str | os.PathLike | None = None):
        from harness.config import ConfigError, from_dict

        if definition.adapter not in QA_ADAPTERS:
            raise TaskError(f"task {definition.name}: adapter must be one of {sorted(QA_ADAPTERS)}")
        super().__init__(definition, data_root)
        try:
            self.options = from_dict(QAOptions, dict(definition.options), prefix="options.")
        except ConfigError as exc:
            raise TaskError(f"task {definition.name}: {exc}") from exc
        if self.options.metric not in QA_METRICS:
            raise TaskError(f"task {self.name}: options.metric must be one of {sorted(QA_METRICS)}")
        self._corpus = self._resolve(self.options.corpus) if self.options.corpus else None

    def _resolve(self, corpus: str) -> Path:
        p = Path(corpus)
        root = data_dir(self._data_root)
        if not p.is_absolute() and root is not None and (root / p).exists():
            p = root / p
        if not p.exists():
            raise TaskError(f"task {self.name}: search corpus {corpus} not found (a JSONL of {{\"text\": ...}} "
                            f"passages; relative paths are read from the data directory)")
        return p

    @property
    def closed_book(self) -> bool:
        return self._corpus is None

    def load(self, split: str, limit: int | None = None, seed: int = 0) -> list[Example]:
        rows, origin = self.raw_rows(split)
        frac = self.options.train_fraction
        if frac is not None and split in ("train", "test"):
            # A stable split of one source: the same rows land in train on every machine and every run.
            import hashlib

            def in_train(r: dict[str, Any]) -> bool:
                key = str(r.get("id", r.get("question_id", r.get("question", ""))))
                return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 16**8 < frac

            rows = [r for r in rows if in_train(r) == (split == "train")]
        adapt = QA_ADAPTERS[self.definition.adapter]
        out = []
        for row in subsample(rows, limit, seed):
            try:
                out.append(adapt(row, self.definition))
            except (KeyError, TypeError, ValueError) as exc:
                raise TaskError(f"{origin}:{row.get('_line', '?')}: malformed {self.definition.adapter} row "
                                f"({type(exc).__name__}: {exc})") from exc
        return out

    def user_message(self, example: Example) -> str:
        template = self.definition.prompt if self.closed_book else self.options.search_prompt
        return template.replace("{question}", example.question)

    def prompt(self, example: Example, tokenizer: Any = None) -> str:
        msgs = example.meta.get("messages") or [{"role": "user", "content": self.user_message(example)}]
        return render_messages(msgs, tokenizer)

    def extract(self, completion: str) -> str | None:
        from tasks.envs.base import EnvTask

        replies = EnvTask.replies_of(completion) if not self.closed_book else [completion]
        for reply in reversed(replies):
            if "<answer>" in reply.lower():
                return extract_answer(reply)
        return extract_answer(replies[-1]) if self.closed_book and replies else None

    def score(self, completion: str, example: Example) -> float:
        aliases = example.meta.get("aliases") or [example.answer]
        return float(QA_METRICS[self.options.metric](self.extract(completion), aliases))

    @property
    def rollout(self):
        """None in closed-book mode (the runner then calls ``method.generate`` once); else the search loop."""
        return None if self.closed_book else self._rollout

    def _rollout(self, method: Any, examples: list[Example], max_new_tokens: int, tokenizer: Any = None,
                 batch_size: int = 8) -> list[str]:
        index = _index_for(str(self._corpus))
        by_id = {e.id: e for e in examples}

        def policy(convs: list[list[Message]], ids: list[str]) -> list[str]:
            turn = [Example(id=f"{i}-t{len(c)}", question=by_id[i].question, answer=by_id[i].answer, target="",
                            meta={**by_id[i].meta, "messages": c, "episode": i}) for c, i in zip(convs, ids, strict=True)]
            return method.generate(self, turn, max_new_tokens)

        def parse(reply: str) -> str:
            try:
                return parse_search_action(reply)
            except InvalidAction:
                raise InvalidAction("Invalid action: write <search>query</search> or <answer>answer</answer>.") from None

        cfg = AgentConfig(max_turns=self.options.max_turns, context_tokens=self.options.context_tokens,
                          max_new_tokens=max_new_tokens)
        out: list[str] = []
        for s in range(0, len(examples), batch_size):
            chunk = examples[s : s + batch_size]
            envs = [SearchEnvironment(self.user_message(e), index, e.meta.get("aliases") or [e.answer],
                                      self.options.top_k, self.options.metric) for e in chunk]
            out.extend(json.dumps(t.to_dict(), ensure_ascii=False)
                       for t in run_episodes(policy, envs, [e.id for e in chunk], cfg, parse))
        return out


# --- science multiple choice -----------------------------------------------------------------------------------

LETTERS = "ABCDEFGH"


def shuffled_options(correct: str, wrong: list[str], key: str) -> tuple[list[str], str]:
    """Options in an order fixed by ``key`` (the question's id), and the correct letter."""
    opts = [correct, *wrong]
    order = list(range(len(opts)))
    random.Random(f"options:{key}").shuffle(order)
    return [opts[i] for i in order], LETTERS[order.index(0)]


def format_choices(question: str, options: list[str]) -> str:
    return question.strip() + "\n" + "\n".join(f"{LETTERS[i]}. {o.strip()}" for i, o in enumerate(options))


def gpqa_row(row: dict[str, Any], d: TaskDefinition) -> Example:
    """Idavidrein/gpqa: Question, Correct Answer, Incorrect Answer 1-3, Explanation, Record ID."""
    wrong = [str(row[f"Incorrect Answer {i}"]) for i in (1, 2, 3)]
    rid = str(row.get("Record ID") or row["Question"][:64])
    options, letter = shuffled_options(str(row["Correct Answer"]), wrong, rid)
    expl = str(row.get("Explanation") or "").strip()
    return Example(id=rid, question=format_choices(str(row["Question"]), options), answer=letter,
                   target=f"{expl}\nThe answer is \\boxed{{{letter}}}.".strip(), meta={"options": options})


def arc_row(row: dict[str, Any], d: TaskDefinition) -> Example:
    """allenai/ai2_arc: id, question, choices{text, label}, answerKey (labels may be A-E or 1-5)."""
    texts, labels = list(row["choices"]["text"]), [str(x) for x in row["choices"]["label"]]
    key = str(row["answerKey"])
    if key not in labels:
        raise ValueError(f"answerKey {key!r} is not among the labels {labels}")
    correct = texts[labels.index(key)]
    wrong = [t for t, lab in zip(texts, labels, strict=True) if lab != key]
    options, letter = shuffled_options(correct, wrong, str(row["id"]))
    return Example(id=str(row["id"]), question=format_choices(str(row["question"]), options), answer=letter,
                   target=f"The answer is \\boxed{{{letter}}}.", meta={"options": options})


MC_ADAPTERS = {"gpqa": gpqa_row, "arc": arc_row}


@dataclass(frozen=True)
class ChoiceOptions:
    """Options of the science multiple-choice tasks."""

    split_configs: dict[str, str] | None = None
    """Our split -> Hub config (GPQA: train from gpqa_main, test from gpqa_diamond); None = ``hub_config``."""
    exclude_test_from_train: bool = True
    """Drop train rows whose question also appears in the test split (GPQA diamond is a subset of main)."""


class ChoiceTask(DefinedTask):
    """GPQA / ARC-Challenge: shuffled lettered options, the answer letter scored by the ``choice`` metric.

    Local data: ``<data dir>/<local>/<file>.csv`` (GPQA's official CSV layout) or ``.jsonl`` (any layout above).
    """

    def __init__(self, definition: TaskDefinition, data_root: str | os.PathLike | None = None):
        from harness.config import ConfigError, from_dict

        if definition.adapter not in MC_ADAPTERS:
            raise TaskError(f"task {definition.name}: adapter must be one of {sorted(MC_ADAPTERS)}")
        super().__init__(definition, data_root)
        try:
            self.options = from_dict(ChoiceOptions, dict(definition.options), prefix="options.")
        except ConfigError as exc:
            raise TaskError(f"task {definition.name}: {exc}") from exc

    def raw_rows(self, split: str) -> tuple[list[dict[str, Any]], str]:
        d = self.definition
        if split not in d.splits:
            raise TaskError(f"task {d.name} has no split {split!r}; it has {sorted(d.splits)}")
        root = data_dir(self._data_root)
        stem = d.local_splits.get(split, d.splits[split])
        if root is not None and d.local is not None:
            csv_path = root / d.local / f"{stem}.csv"
            if csv_path.exists():
                with csv_path.open(encoding="utf-8", newline="") as fh:
                    return [dict(r, _line=i + 2) for i, r in enumerate(csv.DictReader(fh))], str(csv_path)
            if (root / d.local / f"{stem}.jsonl").exists():
                return super().raw_rows(split)
        configs = self.options.split_configs or {}
        if d.hub is not None:
            import datasets

            config = configs.get(split, d.hub_config)
            hub_split = d.splits[split]
            try:
                ds = datasets.load_dataset(d.hub, config, split=hub_split)
            except Exception as exc:  # noqa: BLE001
                raise TaskError(f"task {d.name}: could not load {d.hub} ({config}, split {hub_split}) from the Hub "
                                f"({type(exc).__name__}); it may be gated (accept its terms and log in) or you are "
                                f"offline: put {d.local}/{stem}.csv or .jsonl in the data directory") from exc
            return [dict(r, _line=i + 1) for i, r in enumerate(ds)], f"hf://{d.hub}/{config}/{hub_split}"
        raise TaskError(f"task {d.name}: no {d.local}/{stem}.csv or .jsonl in the data directory and no Hub id")

    def load(self, split: str, limit: int | None = None, seed: int = 0) -> list[Example]:
        rows, origin = self.raw_rows(split)
        if split == "train" and self.options.exclude_test_from_train and "test" in self.definition.splits:
            test_q = {str(r.get("Question", r.get("question", ""))).strip() for r in self.raw_rows("test")[0]}
            rows = [r for r in rows if str(r.get("Question", r.get("question", ""))).strip() not in test_q]
        adapt = MC_ADAPTERS[self.definition.adapter]
        out = []
        for row in subsample(rows, limit, seed):
            try:
                out.append(adapt(row, self.definition))
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                raise TaskError(f"{origin}:{row.get('_line', '?')}: malformed {self.definition.adapter} row "
                                f"({type(exc).__name__}: {exc})") from exc
        return out
