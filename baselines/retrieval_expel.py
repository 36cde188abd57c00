"""ExpeL-style experience memory: retrieved successful trajectories as few-shot examples, plus distilled insights.

Implements the idea of ExpeL (Zhao et al., "ExpeL: LLM Agents Are Experiential Learners", AAAI 2024) in our
harness. While "training" on a task the frozen model attempts the training problems; successful attempts (judged
by the task's own scorer, ExpeL's environment success) are stored; the model itself then edits a short list of
natural-language insights from success/failure pairs with ADD / EDIT / UPVOTE / DOWNVOTE operations. At test time
the top-k most similar stored successes are put before the question as solved chat turns, and the insights are
put into the user message.

Departures from the paper:
- Experience gathering: one zero-shot attempt, then ``retries`` greedy retries of the failures with retrieved
  successes in context, instead of Reflexion with self-reflections between trials.
- Insights are distilled from (failure, success) pairs of the same problem only (not from lists of successes),
  one pair per model call, ``insight_pairs`` calls per task; ExpeL's AGREE/REMOVE are accepted as UPVOTE/DOWNVOTE.
  A new insight starts at 2 votes and is dropped at 0 (as in ExpeL); ADD is refused while the list is full.
- One memory and one insight list over the whole task sequence (task-agnostic retrieval): the question text is
  the retrieval key, and the query is the test question. Retrieval over trajectories uses the question only.
- ``store=gold`` stores the gold targets instead of self-generated successes (pairs are then failure vs gold).
- Few-shot examples are chat turns (most similar last) rather than text blocks in one prompt.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness.config import RunConfig, from_dict
from harness.generation import generate_greedy
from harness.models import LoadedModel
from harness.retrieval_index import (
    Attempt,
    MemoryStore,
    RetrievalOptions,
    attempt_examples,
    chat_prompt,
    check_options,
    user_message,
)
from harness.seeding import derive_seed
from harness.store import atomic_write_json, read_json
from tasks.base import Example, Task

MAX_INSIGHT_CHARS = 200
OP_NAMES = {"ADD": "ADD", "EDIT": "EDIT", "UPVOTE": "UPVOTE", "DOWNVOTE": "DOWNVOTE", "AGREE": "UPVOTE",
            "REMOVE": "DOWNVOTE"}
# Upper-case keywords only, and ADD needs its colon: a numbered step such as "1. Add 7 and 4: 11." is not an
# operation (small models write those all the time; matching them case-insensitively filled the list with junk).
_OP_RE = re.compile(r"^\s*(?:[-*\d.)\s]*\s)?(ADD(?=\s*:)|EDIT|UPVOTE|DOWNVOTE|AGREE|REMOVE)\b\s*(\d+)?\s*[:.-]?\s*(.*)$")

INSIGHT_PROMPT = (
    "You improve a list of rules for solving tasks. Below is one task, a failed answer and a successful answer.\n"
    "Task:\n{task}\n\nFailed answer:\n{failure}\n\nSuccessful answer:\n{success}\n\n"
    "Current rules:\n{rules}\n\n"
    "Compare the two answers and update the rules. Reply with operations only, one per line:\n"
    "ADD: <a new general rule>\nEDIT <number>: <the rewritten rule>\nUPVOTE <number>\nDOWNVOTE <number>"
)


@dataclass(frozen=True)
class ExpeLOptions(RetrievalOptions):
    """ExpeL options: the shared retrieval options plus the insight list."""

    insights: bool = True
    """Distil natural-language insights with the model and put them in the prompt."""
    max_insights: int = 8
    """Most insights kept (ADD is refused while the list is full)."""
    insight_pairs: int = 4
    """Failure/success pairs shown to the model per task (one insight call each)."""
    insight_tokens: int = 96
    """Generation budget of one insight call."""


@dataclass(frozen=True)
class InsightOp:
    op: str  # ADD, EDIT, UPVOTE or DOWNVOTE
    number: int | None  # 1-based position in the list shown to the model
    text: str


def parse_insight_ops(text: str) -> list[InsightOp]:
    """Operations in the model's reply, one per line; lines that are not operations are ignored."""
    ops = []
    for line in text.splitlines():
        m = _OP_RE.match(line)
        if not m:
            continue
        op = OP_NAMES[m.group(1)]
        number = int(m.group(2)) if m.group(2) else None
        body = m.group(3).strip().strip('"').strip()
        if op == "ADD" and number is not None and not body:
            body, number = m.group(2), None  # "ADD: 42 ..." style bodies that start with a digit
        ops.append(InsightOp(op, number, body))
    return ops


def apply_insight_ops(insights: Sequence[dict[str, Any]], ops: Sequence[InsightOp],
                      max_insights: int) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """ExpeL's update rules on a list of ``{"text", "votes"}``: ADD (2 votes, refused when full, empty, too long or
    a duplicate), EDIT n (new text, +1), UPVOTE n (+1), DOWNVOTE n (-1); insights at 0 votes are dropped at the
    end, so numbers always refer to the list as shown to the model. Returns (new list, counts)."""
    out = [dict(x) for x in insights]
    n_shown = len(out)
    counts = {"applied": 0, "rejected": 0}

    def known(text: str) -> bool:
        return any(x["text"].lower() == text.lower() for x in out)

    for op in ops:
        ok = False
        if op.op == "ADD":
            live = sum(1 for x in out if x["votes"] > 0)
            if op.text and len(op.text) <= MAX_INSIGHT_CHARS and not known(op.text) and live < max_insights:
                out.append({"text": op.text, "votes": 2})
                ok = True
        elif op.number is not None and 1 <= op.number <= n_shown and out[op.number - 1]["votes"] > 0:
            item = out[op.number - 1]
            if op.op == "EDIT" and op.text and len(op.text) <= MAX_INSIGHT_CHARS:
                item["text"], item["votes"] = op.text, item["votes"] + 1
                ok = True
            elif op.op == "UPVOTE":
                item["votes"] += 1
                ok = True
            elif op.op == "DOWNVOTE":
                item["votes"] -= 1
                ok = True
        counts["applied" if ok else "rejected"] += 1
    return [x for x in out if x["votes"] > 0], counts


def insights_block(insights: Sequence[dict[str, Any]]) -> str:
    if not insights:
        return ""
    lines = "\n".join(f"{i}. {x['text']}" for i, x in enumerate(insights, 1))
    return f"Insights from earlier tasks:\n{lines}\n\n"


class ExpeL:
    name = "expel"

    def __init__(self, model: LoadedModel, cfg: RunConfig, options: dict[str, Any]):
        self.opts: ExpeLOptions = from_dict(ExpeLOptions, options, prefix="method_options.expel.")
        check_options(self.opts, "expel")
        if self.opts.max_insights < 1 or self.opts.insight_pairs < 0:
            raise ValueError("method_options.expel: max_insights must be >= 1 and insight_pairs >= 0")
        self.lm = model
        self.cfg = cfg
        self.memory = MemoryStore(self.opts)
        self.insights: list[dict[str, Any]] = []
        self.last_prompts: list[str] = []

    # -- prompts -----------------------------------------------------------------------------------------------
    def _prompt(self, message: str, hits: Sequence[tuple[dict[str, Any], float]], insights: bool) -> str:
        turns = [(r["user"], r["completion"]) for r, _ in reversed(hits)]  # most similar right before the question
        prefix = insights_block(self.insights) if insights and self.opts.insights else ""
        return chat_prompt(self.lm.tokenizer, turns, prefix + message)

    def build_prompts(self, task: Task, examples: Sequence[Example], touch: bool = False,
                      insights: bool = True) -> list[str]:
        hits = self.memory.search([e.question for e in examples], self.opts.k, touch=touch)
        return [self._prompt(user_message(task, e), h, insights) for e, h in zip(examples, hits, strict=True)]

    def _generate(self, prompts: list[str], budget: int) -> list[str]:
        return generate_greedy(self.lm.model, self.lm.tokenizer, prompts, budget, self.cfg.eval.batch_size)

    # -- training ----------------------------------------------------------------------------------------------
    def train_on_task(self, task: Task, examples: Sequence[Example], stage: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        budget = self.cfg.eval.max_new_tokens or task.max_new_tokens
        self.memory.latency.clear()
        o = self.opts

        def record(e: Example, completion: str, score: float, source: str, rnd: int) -> dict[str, Any]:
            return {"id": f"{task.name}/{e.id}", "task": task.name, "key": e.question, "user": user_message(task, e),
                    "completion": completion, "score": score, "source": source, "stage": stage, "round": rnd}

        def prompt_for(e: Example, rnd: int) -> str:
            if rnd == 0:
                return chat_prompt(self.lm.tokenizer, [], user_message(task, e))  # plain zero-shot attempt
            return self.build_prompts(task, [e], touch=True, insights=False)[0]

        def keep_successes(done: list[Attempt]) -> None:
            if o.store == "self":
                self.memory.add([record(examples[a.index], a.completion, a.score, "self", a.round)
                                 for a in done if a.score >= o.success_threshold])

        retries = o.retries if o.store == "self" else 0  # gold memory: the retries would not change what is stored
        tries: list[list[Attempt]] = [[] for _ in examples]
        if o.store == "self" or o.insights:  # a gold memory without insights needs no attempts at all
            tries = attempt_examples(self._generate, task, examples, budget, prompt_for, retries,
                                     o.success_threshold, keep_successes)
        evicted_before = self.memory.evicted
        if o.store == "gold":
            self.memory.add([record(e, e.target, 1.0, "gold", -1) for e in examples])
        # (failure, success) pairs of the same problem: ExpeL's comparison material for insights.
        pairs = []
        for e, ts in zip(examples, tries, strict=True):
            fail = next((a for a in ts if a.score < o.success_threshold), None)
            good = next((a.completion for a in ts if a.score >= o.success_threshold), None)
            if o.store == "gold":
                good = e.target
            if fail is not None and good is not None:
                pairs.append((e, fail.completion, good))
        insight_stats = self._update_insights(task, pairs, stage) if o.insights else {}
        n_success = sum(any(a.score >= o.success_threshold for a in ts) for ts in tries)
        probe = self.memory.probe_latency([e.question for e in examples[:32]], o.k)
        return {
            "seconds": time.perf_counter() - t0,
            "attempts": sum(len(ts) for ts in tries),
            "solved_zero_shot": sum(ts[0].score >= o.success_threshold for ts in tries if ts),
            "solved_any_round": n_success,
            "pairs": len(pairs),
            "insights": [x["text"] for x in self.insights],
            **insight_stats,
            **self.memory.stats(),
            **probe,
            "evicted_this_stage": self.memory.evicted - evicted_before,
        }

    def _update_insights(self, task: Task, pairs: list[tuple[Example, str, str]], stage: int) -> dict[str, Any]:
        chosen = pairs
        if len(pairs) > self.opts.insight_pairs:
            rng = random.Random(derive_seed(self.cfg.seed, "expel-insights", stage))
            chosen = [pairs[i] for i in sorted(rng.sample(range(len(pairs)), self.opts.insight_pairs))]
        applied = rejected = 0
        replies = []
        for e, failure, success in chosen:
            rules = "\n".join(f"{i}. {x['text']}" for i, x in enumerate(self.insights, 1)) or "(none yet)"
            msg = INSIGHT_PROMPT.format(task=user_message(task, e), failure=failure, success=success, rules=rules)
            reply = self._generate([chat_prompt(self.lm.tokenizer, [], msg)], self.opts.insight_tokens)[0]
            self.insights, counts = apply_insight_ops(self.insights, parse_insight_ops(reply), self.opts.max_insights)
            applied, rejected = applied + counts["applied"], rejected + counts["rejected"]
            replies.append(reply)
        return {"insight_calls": len(chosen), "insight_ops_applied": applied, "insight_ops_rejected": rejected,
                "insight_replies": replies}

    # -- evaluation ----------------------------------------------------------------------------------------------
    def generate(self, task: Task, examples: Sequence[Example], max_new_tokens: int) -> list[str]:
        prompts = self.build_prompts(task, examples)  # read-only retrieval
        self.last_prompts = prompts
        return self._generate(prompts, max_new_tokens)

    # -- snapshots -------------------------------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.memory.save(path / "memory")
        atomic_write_json(path / "insights.json", self.insights)
        atomic_write_json(path / "memory_stats.json", {**self.memory.stats(), "options": asdict(self.opts)})

    def load(self, path: Path) -> None:
        self.memory.load(path / "memory")
        self.insights = read_json(path / "insights.json")
