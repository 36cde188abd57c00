"""AWM-style workflow memory: reusable workflows induced across solved examples, retrieved into the context.

Implements Agent Workflow Memory (Wang et al., "Agent Workflow Memory", 2024; reference code
zorazrw/agent-workflow-memory) in our harness. AWM's offline induction (``mind2web/offline_induction.py``) gives an
LM all training examples of one website in one prompt and asks for the common sub-routines as "summary workflows",
with example-specific values replaced by named placeholders ("{product-name}"); its rule-based variant
(``webarena/workflow_induction.py``) abstracts each trajectory to its sequence of action types and keeps one
trajectory per distinct abstract sequence. At test time every workflow of the website is in the agent's context.

Here (``induction=rule``, the default) workflows are induced across several solved examples of a task by
anti-unification: solutions are split into tokens (numbers, words, single punctuation marks) and grouped by shape
(the token classes, punctuation kept literal); in a group of at least ``min_support`` examples a token that is the
same in every example is part of the workflow, and a token that differs is an example value, so it becomes a
placeholder: ``{v1}, {v2}, ...`` when it is a value from the question (same values across the group = same
placeholder, numbered in question order), ``{r1}, {r2}, ...`` when the solution computes it. The retrieval key is
the group's question anti-unified the same way. One workflow thus stands for the common sub-routine of every
example of its group, with what the examples do not share abstracted away; an identical workflow from a later
stage adds to the ``support`` of the stored one. ``induction=model`` asks the frozen model to write a workflow
from ``examples_per_induction`` solved examples per call (AWM's LM induction; weak with a 135M model). Workflows
go before the text of the task's first user message in its real message list (a multi-turn task keeps its
conversation).

Departures from the paper:
- The rule induction generalises over whole solutions of one shape (AWM's LM finds sub-routines inside
  trajectories; its rule variant dedups whole trajectories but abstracts nothing). Environment episodes rarely
  share a shape, so they yield few rule workflows.
- Workflows from every task share one memory and the ``k`` nearest to the question are retrieved (AWM puts all
  workflows of the website in context); ``task_scoped`` retrieves only the current task's.
- Online (``store=self``) induction runs once per task over all of its successes (AWM online induces after each
  test query); attempts stop after ``give_up_after`` attempts without a success.
"""

from __future__ import annotations

import hashlib
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
    MemoryStore,
    RetrievalOptions,
    approx_tokens,
    attempt_examples,
    chat_prompt,
    check_options,
    last_turn_per_episode,
    memory_prompt,
    retrieval_key,
    shot_turns,
    task_messages,
    turns_text,
)
from harness.store import atomic_write_json
from tasks.base import Example, Task

INDUCTIONS = ("rule", "model")
MAX_WORKFLOW_CHARS = 600
# A number (with its sign when the minus is attached), a word, or one punctuation mark.
_LEX_RE = re.compile(r"-?\d+(?:\.\d+)?|[A-Za-z]+|[^\sA-Za-z\d]")

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
    """``rule`` (anti-unification across solved examples of one shape) or ``model`` (the model writes them)."""
    min_support: int = 2
    """``induction=rule``: solved examples a workflow must generalise (at least 2: one example abstracts nothing)."""
    examples_per_induction: int = 3
    """``induction=model``: successes shown in one induction call."""
    model_inductions: int = 2
    """``induction=model``: induction calls per task."""
    induction_tokens: int = 128
    """``induction=model``: generation budget of one induction call."""


# -- pure induction functions ----------------------------------------------------------------------------------
def lex(text: str) -> tuple[list[str], list[str]]:
    """(tokens, separators): ``separators[i]`` is the text before token i, the last one the text after the end, so
    ``"".join(s + t for s, t in zip(seps, toks)) + seps[-1] == text``."""
    toks, seps, pos = [], [], 0
    for m in _LEX_RE.finditer(text):
        seps.append(text[pos : m.start()])
        toks.append(m.group(0))
        pos = m.end()
    return toks, [*seps, text[pos:]]


def _cls(tok: str) -> str:
    return "N" if tok[-1].isdigit() else ("W" if tok[0].isalpha() else tok)


def shape(text: str) -> tuple[str, ...]:
    """Token classes: N (number), W (word), punctuation as itself."""
    return tuple(_cls(t) for t in lex(text)[0])


def _norm(tok: str) -> str:
    return tok if len(tok) == 1 else tok.lower()  # an option letter "A" never matches the article "a"


def anti_unify(questions: Sequence[str], solutions: Sequence[str]) -> tuple[str | None, str]:
    """The least general (question, solution) pattern of examples whose solutions share one shape.

    A position whose token is the same in every example stays; one that differs becomes a placeholder named by its
    values across the examples (equal values, compared case-insensitively, share a placeholder): ``{vN}`` when the
    values occur in the questions (numbered in question order), ``{rN}`` when only the solutions have them. The
    question pattern is None when the questions do not share one shape (then values are looked up in each
    example's question tokens). Text between tokens is taken from the first example."""
    sol = [lex(s) for s in solutions]
    if len({len(t) for t, _ in sol}) != 1 or len({shape(s) for s in solutions}) != 1:
        raise ValueError("anti_unify needs solutions of one shape")
    qs = [lex(q) for q in questions]
    joint = len({shape(q) for q in questions}) == 1
    names: dict[tuple[str, ...], str] = {}

    def name(sig: tuple[str, ...], from_question: bool) -> str:
        if sig not in names:
            kind = "v" if from_question else "r"
            names[sig] = f"{{{kind}{sum(n[1] == kind for n in names.values()) + 1}}}"
        return names[sig]

    def build(lexed: list[tuple[list[str], list[str]]], question: bool) -> str:
        toks0, seps0 = lexed[0]
        out = []
        for i, tok in enumerate(toks0):
            sig = tuple(_norm(t[i]) for t, _ in lexed)
            if len(set(sig)) == 1:
                out.append(seps0[i] + tok)
            elif question or sig in names:
                out.append(seps0[i] + name(sig, True) if question else seps0[i] + names[sig])
            else:
                in_q = not joint and all(v in {_norm(t) for t in q[0]} for v, q in zip(sig, qs, strict=True))
                out.append(seps0[i] + name(sig, in_q))
        return "".join(out) + seps0[-1]

    abs_q = build(qs, True) if joint else None
    return abs_q, build(sol, False)


def induce_rule_workflows(items: Sequence[tuple[str, str, str]], min_support: int) -> list[dict[str, Any]]:
    """Workflows from (question, retrieval key, solution) triples: one per solution shape with at least
    ``min_support`` examples, as ``{"key", "workflow", "support"}`` (key: the anti-unified question, else the first
    example's key), largest groups first."""
    groups: dict[tuple[str, ...], list[tuple[str, str, str]]] = {}
    for it in items:
        groups.setdefault(shape(it[2]), []).append(it)
    out = []
    for members in sorted(groups.values(), key=len, reverse=True):
        if len(members) < min_support:
            continue
        abs_q, abs_s = anti_unify([m[0] for m in members], [m[2] for m in members])
        out.append({"key": abs_q if abs_q is not None else members[0][1], "workflow": abs_s.strip(),
                    "support": len(members)})
    return out


def workflow_block(hits: Sequence[tuple[dict[str, Any], float]], max_tokens: int) -> str:
    """The retrieved workflows as text, best first kept within ``max_tokens``, shown most similar last."""
    parts, room = [], max_tokens
    for r, _ in hits:
        part = f"(for questions like: {r['key']}; from {r['support']} solved examples)\n{r['workflow']}"
        if approx_tokens(part) <= room:
            parts.append(part)
            room -= approx_tokens(part)
    if not parts:
        return ""
    body = "\n\n".join(f"Workflow {i} {p}" for i, p in enumerate(reversed(parts), 1))
    return ("Workflows that solved similar problems ({v1}, {v2}, ... stand for values from the question, {r1}, "
            "{r2}, ... for values you compute; write the values, not the placeholders):\n" + body + "\n\n")


class AWM:
    name = "awm"

    def __init__(self, model: LoadedModel, cfg: RunConfig, options: dict[str, Any]):
        self.opts: AWMOptions = from_dict(AWMOptions, options, prefix="method_options.awm.")
        check_options(self.opts, "awm")
        if self.opts.induction not in INDUCTIONS:
            raise ValueError(f"method_options.awm.induction={self.opts.induction!r} is not valid; use rule or model")
        if self.opts.min_support < 2 or self.opts.examples_per_induction < 1 or self.opts.model_inductions < 1:
            raise ValueError("method_options.awm: min_support must be >= 2, examples_per_induction and "
                             "model_inductions >= 1")
        self.lm = model
        self.cfg = cfg
        self.memory = MemoryStore(self.opts)
        self.last_prompts: list[str] = []
        self.generated_tokens = 0

    def build_prompts(self, task: Task, examples: Sequence[Example], touch: bool = False) -> list[str]:
        scope = task.name if self.opts.task_scoped else None
        hits = self.memory.search([retrieval_key(task, e) for e in examples], self.opts.k, touch=touch, task=scope)
        return [memory_prompt(task, e, self.lm.tokenizer, (), workflow_block(h, self.opts.max_memory_tokens))
                for e, h in zip(examples, hits, strict=True)]

    def _generate(self, prompts: list[str], budget: int) -> list[str]:
        outs = generate_greedy(self.lm.model, self.lm.tokenizer, prompts, budget, self.cfg.eval.batch_size)
        self.generated_tokens += sum(len(self.lm.tokenizer(o, add_special_tokens=False).input_ids) for o in outs)
        return outs

    # -- induction ---------------------------------------------------------------------------------------------
    def induce(self, task: Task, solved: Sequence[tuple[Example, str]], stage: int, source: str) -> dict[str, int]:
        """Induce workflows from (example, successful reply) pairs; merge ones already stored; add the rest."""
        solved = last_turn_per_episode([(e, (e, r)) for e, r in solved])
        found: dict[str, dict[str, Any]] = {}

        def keep(key: str, text: str, support: int, how: str) -> None:
            wid = hashlib.sha256(f"{task.name}\n{key}\n{text}".encode()).hexdigest()[:16]
            item = found.setdefault(wid, {"id": wid, "task": task.name, "key": key, "workflow": text, "support": 0,
                                          "stage": stage, "source": f"{source}/{how}"})
            item["support"] += support

        if self.opts.induction == "rule":
            items = [(retrieval_key(task, e), retrieval_key(task, e), solution_text(task, e, r)) for e, r in solved]
            for w in induce_rule_workflows(items, self.opts.min_support):
                keep(w["key"], w["workflow"], w["support"], "rule")
        else:
            n = self.opts.examples_per_induction
            for g in range(min(self.opts.model_inductions, -(-len(solved) // n))):
                group = solved[g * n:(g + 1) * n]
                shown = "\n\n".join(f"Example {i}:\n{turns_text(shot_turns(task, e, r), 600)}"
                                    for i, (e, r) in enumerate(group, 1))
                msg = INDUCTION_PROMPT.format(examples=shown)
                text = self._generate([chat_prompt(self.lm.tokenizer, [], msg)], self.opts.induction_tokens)[0]
                text = text.strip()[:MAX_WORKFLOW_CHARS]
                if text:
                    keep(retrieval_key(task, group[0][0]), text, len(group), "model")
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
        self.generated_tokens = 0
        evicted_before = self.memory.evicted

        def prompt_for(e: Example, rnd: int) -> str:
            if rnd == 0:
                return task.prompt(e, self.lm.tokenizer)  # the vanilla prompt
            return self.build_prompts(task, [e], touch=True)[0]

        tries: list[list] = [[] for _ in examples]
        gave_up = False
        if o.store == "self":  # offline (gold) induction needs no attempts
            log = attempt_examples(self._generate, task, examples, budget, prompt_for, o.retries,
                                   o.success_threshold, give_up_after=o.give_up_after)
            tries, gave_up = log.tries, log.gave_up
            solved = [(examples[i], next(a.completion for a in ts if a.score >= o.success_threshold))
                      for i, ts in enumerate(tries) if any(a.score >= o.success_threshold for a in ts)]
        else:
            solved = [(e, e.target) for e in examples]
        totals = self.induce(task, solved, stage, o.store)
        probe = self.memory.probe_latency([retrieval_key(task, e) for e in examples[:32]], o.k)
        return {
            "seconds": time.perf_counter() - t0,
            "examples_seen": len(examples) if o.store == "gold" else sum(bool(ts) for ts in tries),
            "attempts": sum(len(ts) for ts in tries),
            "attempts_cap": o.give_up_after if o.store == "self" else None,
            "gave_up": gave_up,
            "solved_zero_shot": sum(ts[0].score >= o.success_threshold for ts in tries if ts),
            "solved_any_round": sum(any(a.score >= o.success_threshold for a in ts) for ts in tries),
            "optimizer_steps": 0, "train_tokens": 0, "trainable_params": 0,  # harness.budget keys
            "generated_tokens": self.generated_tokens,
            "budget_notes": "no weights trained; " + (f"{sum(len(ts) for ts in tries)} attempts" + (
                " (stopped: no success within give_up_after)" if gave_up else "") if o.store == "self"
                else "workflows induced from the gold solutions"),
            "workflows_induced": totals["induced"],
            "workflows_merged": totals["merged"],
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


def solution_text(task: Task, example: Example, reply: str) -> str:
    """What a workflow abstracts: the reply, after the assistant's earlier replies of a multi-turn episode."""
    earlier = [m["content"] for m in task_messages(task, example) if m["role"] == "assistant"]
    return "\n".join([*earlier, reply])
