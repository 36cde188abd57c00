"""AWM-style workflow memory: reusable workflows induced from successful trajectories, retrieved into the context.

Implements the idea of Agent Workflow Memory (Wang et al., "Agent Workflow Memory", 2024) in our harness. While
"training" on a task the frozen model attempts the training problems (or, with ``store=gold``, the gold solutions
are used: AWM's offline setting); successful trajectories are turned into workflows with the example-specific
values replaced by placeholders, identical workflows are merged (their ``support`` counts how many trajectories
produced them), and at test time the top-k workflows nearest to the question are put before it.

Departures from the paper:
- Induction is rule-based by default (``induction=rule``; AWM reports a rule-based variant next to its LM-based
  one): words of a question that are not the task's fixed wording (fixed = occurring in at least 80% of the
  task's training questions), every number and every single capital letter become ``{v1}, {v2}, ...`` in the
  question and in the solution; numbers that only the solution has become ``{r1}, {r2}, ...``. ``induction=model``
  asks the frozen model to write the workflow from a few successes (AWM's LM induction; weak with a 135M model).
- AWM keeps all workflows of a website in memory; here workflows from every task share one memory and the ``k``
  nearest to the question are retrieved (retrieval key: the abstract question).
- Single-turn tasks: a workflow is an abstract solution, not a sequence of web actions.
- Online (``store=self``) induction runs after each attempt round, so retries already see this task's workflows.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import Counter
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
from harness.store import atomic_write_json
from tasks.base import Example, Task

INDUCTIONS = ("rule", "model")
MAX_WORKFLOW_CHARS = 600
_TOKEN_RE = re.compile(r"\d+|[A-Za-z]+")
# Share of a task's questions a word must occur in to count as fixed wording (high, so that a value that happens
# to recur in a small sample is still abstracted).
TEMPLATE_SHARE = 0.8

INDUCTION_PROMPT = (
    "Here are solved examples of one kind of problem.\n\n{examples}\n\n"
    "Write one short reusable workflow (numbered steps) that solves any problem of this kind. Do not copy the "
    "specific values: write placeholders such as {{number}} or {{word}} instead."
)


@dataclass(frozen=True)
class AWMOptions(RetrievalOptions):
    """AWM options: the shared retrieval options plus how workflows are induced."""

    k: int = 2
    """Workflows retrieved per question."""
    induction: str = "rule"
    """``rule`` (placeholder abstraction of each success) or ``model`` (the frozen model writes the workflow)."""
    min_support: int = 1
    """A rule-induced workflow enters the memory when at least this many trajectories of the stage produce it."""
    examples_per_induction: int = 3
    """``induction=model``: successes shown in one induction call."""
    model_inductions: int = 2
    """``induction=model``: induction calls per task and round."""
    induction_tokens: int = 128
    """``induction=model``: generation budget of one induction call."""


def _is_value(tok: str, template: set[str]) -> bool:
    return tok.isdigit() or (len(tok) == 1 and tok.isupper()) or tok.lower() not in template


def _key(tok: str) -> str:
    # Single letters keep their case so an option letter "A" never matches the article "a".
    return tok if len(tok) == 1 else tok.lower()


def template_words(questions: Sequence[str]) -> set[str]:
    """Lower-cased words (not numbers or single capitals) found in at least ``TEMPLATE_SHARE`` of the questions: the task's
    fixed wording, which a workflow keeps verbatim."""
    counts: Counter[str] = Counter()
    for q in questions:
        counts.update({t.lower() for t in _TOKEN_RE.findall(q) if not t.isdigit() and not (len(t) == 1 and t.isupper())})
    return {w for w, c in counts.items() if c >= TEMPLATE_SHARE * len(questions)}


def abstract_trajectory(question: str, solution: str, template: set[str]) -> tuple[str, str]:
    """(abstract question, abstract solution): question values -> {v1}, {v2}, ... (same value, same placeholder,
    matched case-insensitively in the solution); numbers only the solution has -> {r1}, {r2}, ..."""
    values: dict[str, str] = {}
    derived: dict[str, str] = {}

    def in_question(m: re.Match[str]) -> str:
        tok = m.group(0)
        if not _is_value(tok, template):
            return tok
        return values.setdefault(_key(tok), f"{{v{len(values) + 1}}}")

    def in_solution(m: re.Match[str]) -> str:
        tok = m.group(0)
        if _key(tok) in values:
            return values[_key(tok)]
        if tok.isdigit():
            return derived.setdefault(tok, f"{{r{len(derived) + 1}}}")
        return tok

    abs_q = _TOKEN_RE.sub(in_question, question)
    return abs_q, _TOKEN_RE.sub(in_solution, solution)


def workflow_block(hits: Sequence[tuple[dict[str, Any], float]]) -> str:
    if not hits:
        return ""
    parts = [f"Workflow {i} (for questions like: {r['key']})\n{r['workflow']}" for i, (r, _) in enumerate(hits, 1)]
    return ("Workflows that solved similar problems ({v1}, {v2}, ... stand for values from the question; {r1}, "
            "{r2}, ... for values you compute):\n" + "\n\n".join(parts) + "\n\n")


class AWM:
    name = "awm"

    def __init__(self, model: LoadedModel, cfg: RunConfig, options: dict[str, Any]):
        self.opts: AWMOptions = from_dict(AWMOptions, options, prefix="method_options.awm.")
        check_options(self.opts, "awm")
        if self.opts.induction not in INDUCTIONS:
            raise ValueError(f"method_options.awm.induction={self.opts.induction!r} is not valid; use rule or model")
        if self.opts.min_support < 1 or self.opts.examples_per_induction < 1 or self.opts.model_inductions < 1:
            raise ValueError("method_options.awm: min_support, examples_per_induction and model_inductions must be >= 1")
        self.lm = model
        self.cfg = cfg
        self.memory = MemoryStore(self.opts)
        self.last_prompts: list[str] = []

    def build_prompts(self, task: Task, examples: Sequence[Example], touch: bool = False) -> list[str]:
        hits = self.memory.search([e.question for e in examples], self.opts.k, touch=touch)
        # Most similar workflow last, right before the question.
        return [chat_prompt(self.lm.tokenizer, [], workflow_block(list(reversed(h))) + user_message(task, e))
                for e, h in zip(examples, hits, strict=True)]

    def _generate(self, prompts: list[str], budget: int) -> list[str]:
        return generate_greedy(self.lm.model, self.lm.tokenizer, prompts, budget, self.cfg.eval.batch_size)

    # -- induction ---------------------------------------------------------------------------------------------
    def induce(self, task: Task, solved: Sequence[tuple[Example, str]], template: set[str], stage: int,
               source: str) -> dict[str, int]:
        """Turn (example, successful solution) pairs into workflows; merge duplicates; add to the memory."""
        if not solved:
            return {"induced": 0, "merged": 0}
        found: dict[str, dict[str, Any]] = {}
        if self.opts.induction == "rule":
            for e, sol in solved:
                abs_q, abs_s = abstract_trajectory(e.question, sol, template)
                wid = hashlib.sha256(f"{task.name}\n{abs_q}\n{abs_s}".encode()).hexdigest()[:16]
                item = found.setdefault(wid, {"id": wid, "task": task.name, "key": abs_q, "workflow": abs_s,
                                              "support": 0, "stage": stage, "source": f"{source}/rule"})
                item["support"] += 1
            found = {w: r for w, r in found.items() if r["support"] >= self.opts.min_support}
        else:
            n = self.opts.examples_per_induction
            for g in range(min(self.opts.model_inductions, -(-len(solved) // n))):
                group = solved[g * n:(g + 1) * n]
                shown = "\n\n".join(f"Example {i}:\nQuestion: {user_message(task, e)}\nSolution: {sol}"
                                    for i, (e, sol) in enumerate(group, 1))
                msg = INDUCTION_PROMPT.format(examples=shown)
                text = self._generate([chat_prompt(self.lm.tokenizer, [], msg)], self.opts.induction_tokens)[0]
                text = text.strip()[:MAX_WORKFLOW_CHARS]
                if not text:
                    continue
                abs_q, _ = abstract_trajectory(group[0][0].question, "", template)
                wid = hashlib.sha256(f"{task.name}\n{abs_q}\n{text}".encode()).hexdigest()[:16]
                found[wid] = {"id": wid, "task": task.name, "key": abs_q, "workflow": text, "support": len(group),
                              "stage": stage, "source": f"{source}/model"}
        existing = {r["id"]: r for r in self.memory.records}
        merged = 0
        for wid, item in list(found.items()):
            if wid in existing:
                existing[wid]["support"] += item["support"]
                del found[wid]
                merged += 1
        self.memory.add(list(found.values()))
        return {"induced": len(found), "merged": merged}

    # -- training ----------------------------------------------------------------------------------------------
    def train_on_task(self, task: Task, examples: Sequence[Example], stage: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        o = self.opts
        budget = self.cfg.eval.max_new_tokens or task.max_new_tokens
        self.memory.latency.clear()
        evicted_before = self.memory.evicted
        template = template_words([e.question for e in examples])  # from the inputs only
        totals = {"induced": 0, "merged": 0}

        def prompt_for(e: Example, rnd: int) -> str:
            if rnd == 0:
                return chat_prompt(self.lm.tokenizer, [], user_message(task, e))
            return self.build_prompts(task, [e], touch=True)[0]

        def induce_round(done: list[Attempt]) -> None:
            if o.store == "self":
                solved = [(examples[a.index], a.completion) for a in done if a.score >= o.success_threshold]
                for k, v in self.induce(task, solved, template, stage, "self").items():
                    totals[k] += v

        tries: list[list[Attempt]] = [[] for _ in examples]
        if o.store == "self":  # offline (gold) induction needs no attempts
            tries = attempt_examples(self._generate, task, examples, budget, prompt_for, o.retries,
                                     o.success_threshold, induce_round)
        if o.store == "gold":
            for k, v in self.induce(task, [(e, e.target) for e in examples], template, stage, "gold").items():
                totals[k] += v
        probe = self.memory.probe_latency([e.question for e in examples[:32]], o.k)
        return {
            "seconds": time.perf_counter() - t0,
            "attempts": sum(len(ts) for ts in tries),
            "solved_zero_shot": sum(ts[0].score >= o.success_threshold for ts in tries if ts),
            "solved_any_round": sum(any(a.score >= o.success_threshold for a in ts) for ts in tries),
            "workflows_induced": totals["induced"],
            "workflows_merged": totals["merged"],
            "template_words": sorted(template),
            **self.memory.stats(),
            **probe,
            "evicted_this_stage": self.memory.evicted - evicted_before,
        }

    # -- evaluation and snapshots ------------------------------------------------------------------------------
    def generate(self, task: Task, examples: Sequence[Example], max_new_tokens: int) -> list[str]:
        prompts = self.build_prompts(task, examples)  # read-only retrieval
        self.last_prompts = prompts
        return self._generate(prompts, max_new_tokens)

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.memory.save(path / "memory")
        atomic_write_json(path / "memory_stats.json", {**self.memory.stats(), "options": asdict(self.opts)})

    def load(self, path: Path) -> None:
        self.memory.load(path / "memory")
