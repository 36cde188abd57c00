"""ExpeL-style experience memory: retrieved successful trajectories as few-shot examples, plus distilled insights.

Implements ExpeL (Zhao et al., "ExpeL: LLM Agents Are Experiential Learners", AAAI 2024; reference code
LeapLabTHU/ExpeL, ``agent/expel.py``) in our harness. While "training" on a task the frozen model attempts the
training problems; successful attempts (judged by the task's own scorer, ExpeL's environment success) are stored;
the model then maintains a list of natural-language insights with ExpeL's operations, from two kinds of material as
in the paper: a failed and a successful attempt at the same problem ("compare"), and a set of successes of
different problems ("all_success"). At test time the top-k stored successes nearest to the question are put into
the task's real message list as solved chat turns (after its system message, before the conversation), and the
insights before the text of its first user message; a multi-turn task keeps its whole conversation.

Insight operations (``apply_insight_ops``, as ExpeL's ``update_rules``): ADD (importance 2), EDIT n (new text, +1;
an EDIT whose text is already an insight counts as UPVOTE of it), UPVOTE/AGREE n (+1), DOWNVOTE/REMOVE n (-1, or -3
once the list holds ``max_insights``), applied in ExpeL's order (downvotes, upvotes, edits, adds); an insight at
importance 0 is removed and the list is kept sorted by importance. ADD is never refused for a full list (ExpeL
only tells the model the list is full and makes downvotes stronger), so later tasks can still add insights; the
prompt shows the ``max_insights`` most important ones.

Departures from the paper:
- Experience gathering: one zero-shot attempt, then ``retries`` greedy retries of the failures with retrieved
  successes in context, instead of Reflexion with self-reflections between trials. With ``store=self`` attempting
  a task stops once ``give_up_after`` attempts have produced no success (recorded as ``gave_up``).
- Insights are updated after each task from at most ``insight_pairs`` compare calls and ``insight_sets``
  success-set calls (ExpeL runs one pass over all pairs and all success chunks after the whole training set).
- Operations refer to insights by number (ExpeL matches the quoted rule text); at most ``max_ops_per_call`` are
  applied per reply; a reply without any well-formed operation counts as a parse failure.
- Few-shot examples are chat turns (most similar last) rather than text blocks in one prompt, and retrieval uses
  the question (for an environment task its goal) as key and query, task-agnostic unless ``task_scoped``
  (ExpeL retrieves within the environment; ``task_scoped`` also keeps one insight list per task).
- ``store=gold`` stores the gold targets instead of self-generated successes (pairs are then failure vs gold).
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
    approx_tokens,
    attempt_examples,
    chat_prompt,
    check_options,
    last_turn_per_episode,
    memory_prompt,
    retrieval_key,
    shot_turns,
    turns_text,
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
_KEYWORD_RE = re.compile(r"\b(ADD|EDIT|UPVOTE|DOWNVOTE|AGREE|REMOVE)\b")
GLOBAL_SCOPE = "*"

_OPS_HELP = ("Reply with operations only, one per line:\nADD: <a new general rule>\nEDIT <number>: <the rewritten "
             "rule>\nUPVOTE <number>\nDOWNVOTE <number>")
COMPARE_PROMPT = (
    "You improve a list of rules for solving tasks. Below is one task, a failed attempt and a successful attempt.\n"
    "Failed attempt:\n{failure}\n\nSuccessful attempt:\n{success}\n\nCurrent rules:\n{rules}\n\n"
    "Compare the two attempts and update the rules.{full} " + _OPS_HELP
)
SUCCESS_PROMPT = (
    "You improve a list of rules for solving tasks. Below are successful attempts at several tasks.\n\n"
    "{successes}\n\nCurrent rules:\n{rules}\n\n"
    "Find what these successes have in common and update the rules.{full} " + _OPS_HELP
)
FULL_NOTE = " The list is full: prefer EDIT, UPVOTE and DOWNVOTE to ADD."


@dataclass(frozen=True)
class ExpeLOptions(RetrievalOptions):
    """ExpeL options: the shared retrieval options plus the insight list."""

    insights: bool = True
    """Maintain natural-language insights with the model and put them in the prompt."""
    max_insights: int = 8
    """Insights shown in a test prompt (the most important); at this many the list counts as full (ExpeL's
    ``max_num_rules``): the update prompt says so and a DOWNVOTE weighs 3. ADD is still accepted."""
    insight_pairs: int = 4
    """Compare calls per task: a failed and a successful attempt at the same problem, one model call each."""
    insight_sets: int = 2
    """Success-set calls per task: ``success_set_size`` successes of different problems, one call each."""
    success_set_size: int = 4
    """Successes shown in one success-set call (ExpeL's ``success_critique_num``)."""
    max_ops_per_call: int = 4
    """Operations applied from one reply (the rest count as rejected)."""
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


def valid_insight_text(text: str) -> bool:
    """A usable insight: non-empty, at most ``MAX_INSIGHT_CHARS``, at least two words, no operation keyword inside
    (ExpeL's ``parse_rules`` drops texts with ADD/AGREE/EDIT in them: the model has run two operations together)."""
    return bool(text) and len(text) <= MAX_INSIGHT_CHARS and len(text.split()) >= 2 and not _KEYWORD_RE.search(text)


def apply_insight_ops(insights: Sequence[dict[str, Any]], ops: Sequence[InsightOp],
                      max_insights: int) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """ExpeL's update of a list of ``{"text", "votes"}`` (votes = importance) by ``ops``, numbers referring to
    ``insights`` as given. Order as ExpeL's ``update_rules``: DOWNVOTE (-1; -3 when the list is full, i.e. holds
    ``max_insights``), UPVOTE (+1), EDIT (new text, +1; an EDIT to the text of an existing insight is an UPVOTE of
    it), ADD (importance 2; refused when empty, invalid or a duplicate, never for a full list); then insights at
    importance <= 0 are removed and the rest sorted by importance (stable). Returns (new list, counts)."""
    out = [dict(x) for x in insights]
    n_shown = len(out)
    full = n_shown >= max_insights
    counts = {"applied": 0, "rejected": 0}

    def find(text: str) -> int | None:
        return next((i for i, x in enumerate(out) if x["text"].lower() == text.lower()), None)

    def target(op: InsightOp) -> int | None:
        return op.number - 1 if op.number is not None and 1 <= op.number <= n_shown else None

    for kind in ("DOWNVOTE", "UPVOTE", "EDIT", "ADD"):
        for op in ops:
            if op.op != kind:
                continue
            ok = False
            i = target(op)
            if kind == "ADD":
                if valid_insight_text(op.text) and find(op.text) is None:
                    out.append({"text": op.text, "votes": 2})
                    ok = True
            elif kind == "EDIT":
                same = find(op.text) if op.text else None
                if same is not None:
                    out[same]["votes"] += 1
                    ok = True
                elif i is not None and valid_insight_text(op.text):
                    out[i]["text"], out[i]["votes"] = op.text, out[i]["votes"] + 1
                    ok = True
            elif i is not None:
                out[i]["votes"] += 1 if kind == "UPVOTE" else (-3 if full else -1)
                ok = True
            counts["applied" if ok else "rejected"] += 1
    kept = [x for x in out if x["votes"] > 0]
    return sorted(kept, key=lambda x: -x["votes"]), counts


def insights_block(insights: Sequence[dict[str, Any]]) -> str:
    if not insights:
        return ""
    lines = "\n".join(f"{i}. {x['text']}" for i, x in enumerate(insights, 1))
    return f"Insights from earlier tasks:\n{lines}\n\n"


def numbered(insights: Sequence[dict[str, Any]]) -> str:
    return "\n".join(f"{i}. {x['text']}" for i, x in enumerate(insights, 1)) or "(none yet)"


class ExpeL:
    name = "expel"

    def __init__(self, model: LoadedModel, cfg: RunConfig, options: dict[str, Any]):
        self.opts: ExpeLOptions = from_dict(ExpeLOptions, options, prefix="method_options.expel.")
        check_options(self.opts, "expel")
        o = self.opts
        if o.max_insights < 1 or min(o.insight_pairs, o.insight_sets) < 0 or min(o.success_set_size,
                                                                                  o.max_ops_per_call) < 1:
            raise ValueError("method_options.expel: max_insights, success_set_size and max_ops_per_call must be >= 1, "
                             "insight_pairs and insight_sets >= 0")
        self.lm = model
        self.cfg = cfg
        self.memory = MemoryStore(self.opts)
        self.insights: dict[str, list[dict[str, Any]]] = {}  # scope (task name, or "*") -> insights
        self.last_prompts: list[str] = []
        self.generated_tokens = 0

    # -- prompts -----------------------------------------------------------------------------------------------
    def _scope(self, task: Task) -> str:
        return task.name if self.opts.task_scoped else GLOBAL_SCOPE

    def _memory_parts(self, task: Task, hits: Sequence[tuple[dict[str, Any], float]],
                      insights: bool) -> tuple[list[list[dict[str, str]]], str]:
        prefix = ""
        if insights and self.opts.insights:
            prefix = insights_block(self.insights.get(self._scope(task), [])[: self.opts.max_insights])
        room = self.opts.max_memory_tokens - approx_tokens(prefix)
        shots = []
        for r, _ in hits:  # best first: the least similar shots are the ones left out
            turns = record_turns(r)
            cost = sum(approx_tokens(m["content"]) + 4 for m in turns)
            if cost <= room:
                shots.append(turns)
                room -= cost
        return list(reversed(shots)), prefix  # most similar right before the conversation

    def build_prompts(self, task: Task, examples: Sequence[Example], touch: bool = False,
                      insights: bool = True) -> list[str]:
        scope = task.name if self.opts.task_scoped else None
        hits = self.memory.search([retrieval_key(task, e) for e in examples], self.opts.k, touch=touch, task=scope)
        out = []
        for e, h in zip(examples, hits, strict=True):
            shots, prefix = self._memory_parts(task, h, insights)
            out.append(memory_prompt(task, e, self.lm.tokenizer, shots, prefix))
        return out

    def _generate(self, prompts: list[str], budget: int) -> list[str]:
        outs = generate_greedy(self.lm.model, self.lm.tokenizer, prompts, budget, self.cfg.eval.batch_size)
        self.generated_tokens += sum(len(self.lm.tokenizer(o, add_special_tokens=False).input_ids) for o in outs)
        return outs

    # -- training ----------------------------------------------------------------------------------------------
    def train_on_task(self, task: Task, examples: Sequence[Example], stage: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        budget = self.cfg.eval.max_new_tokens or task.max_new_tokens
        self.memory.latency.clear()
        self.generated_tokens = 0
        o = self.opts

        def record(e: Example, completion: str, score: float, source: str, rnd: int) -> dict[str, Any]:
            return {"id": f"{task.name}/{e.id}", "task": task.name, "key": retrieval_key(task, e),
                    "turns": shot_turns(task, e, completion), "score": score, "source": source, "stage": stage,
                    "round": rnd}

        def prompt_for(e: Example, rnd: int) -> str:
            if rnd == 0:
                return task.prompt(e, self.lm.tokenizer)  # plain zero-shot attempt: the vanilla prompt
            return self.build_prompts(task, [e], touch=True, insights=False)[0]

        def keep_successes(done: list[Attempt]) -> None:
            if o.store == "self":
                self.memory.add(last_turn_per_episode(
                    [(examples[a.index], record(examples[a.index], a.completion, a.score, "self", a.round))
                     for a in done if a.score >= o.success_threshold]))

        retries = o.retries if o.store == "self" else 0  # gold memory: the retries would not change what is stored
        tries: list[list[Attempt]] = [[] for _ in examples]
        gave_up = False
        if o.store == "self" or o.insights:  # a gold memory without insights needs no attempts at all
            log = attempt_examples(self._generate, task, examples, budget, prompt_for, retries, o.success_threshold,
                                   keep_successes, give_up_after=o.give_up_after if o.store == "self" else None)
            tries, gave_up = log.tries, log.gave_up
        attempt_tokens = self.generated_tokens
        evicted_before = self.memory.evicted
        if o.store == "gold":
            self.memory.add(last_turn_per_episode([(e, record(e, e.target, 1.0, "gold", -1)) for e in examples]))
        # ExpeL's two kinds of comparison material: (failure, success) of one problem, and successes of many.
        pairs, successes = [], []
        for e, ts in zip(examples, tries, strict=True):
            fail = next((a for a in ts if a.score < o.success_threshold), None)
            good = e.target if o.store == "gold" else next(
                (a.completion for a in ts if a.score >= o.success_threshold), None)
            if good is not None and (ts or o.store == "gold"):
                successes.append((e, good))
            if fail is not None and good is not None:
                pairs.append((e, fail.completion, good))
        insight_stats = self._update_insights(task, pairs, successes, stage) if o.insights else {}
        n_success = sum(any(a.score >= o.success_threshold for a in ts) for ts in tries)
        probe = self.memory.probe_latency([retrieval_key(task, e) for e in examples[:32]], o.k)
        n_attempts = sum(len(ts) for ts in tries)
        return {
            "seconds": time.perf_counter() - t0,
            # distinct training problems used: all of them for a gold memory, else the ones attempted
            "examples_seen": len(examples) if o.store == "gold" else sum(bool(ts) for ts in tries),
            "attempts": n_attempts,
            "attempts_cap": o.give_up_after if o.store == "self" else None,
            "gave_up": gave_up,
            "solved_zero_shot": sum(ts[0].score >= o.success_threshold for ts in tries if ts),
            "solved_any_round": n_success,
            "pairs": len(pairs),
            "successes": len(successes),
            # harness.budget keys: no weights change; the budget is generation (attempts and insight calls)
            "optimizer_steps": 0, "train_tokens": 0, "trainable_params": 0,
            "generated_tokens": self.generated_tokens,
            "generated_tokens_attempts": attempt_tokens,
            "budget_notes": (f"no weights trained; {n_attempts} attempts at {len(examples)} training problems"
                             + (" (stopped: no success within give_up_after)" if gave_up else "")
                             + f", {insight_stats.get('insight_calls', 0)} insight calls"),
            "insights": {k: [x["text"] for x in v] for k, v in self.insights.items()},
            **insight_stats,
            **self.memory.stats(),
            **probe,
            "evicted_this_stage": self.memory.evicted - evicted_before,
        }

    def _update_insights(self, task: Task, pairs: list[tuple[Example, str, str]],
                         successes: list[tuple[Example, str]], stage: int) -> dict[str, Any]:
        o = self.opts
        rng = random.Random(derive_seed(self.cfg.seed, "expel-insights", stage))
        chosen = [pairs[i] for i in sorted(rng.sample(range(len(pairs)), min(len(pairs), o.insight_pairs)))]
        pool = list(successes)
        rng.shuffle(pool)
        sets = [pool[i:i + o.success_set_size] for i in range(0, len(pool), o.success_set_size)]
        sets = [s for s in sets if len(s) >= 2][: o.insight_sets]  # a "set" of one success compares nothing
        scope = self._scope(task)
        tokens_before = self.generated_tokens
        totals = {"applied": 0, "rejected": 0, "parse_failures": 0, "ops_dropped": 0}
        replies = []

        def call(msg: str) -> None:
            reply = self._generate([chat_prompt(self.lm.tokenizer, [], msg)], o.insight_tokens)[0]
            ops = parse_insight_ops(reply)
            totals["parse_failures"] += not ops
            totals["ops_dropped"] += max(0, len(ops) - o.max_ops_per_call)
            self.insights[scope], counts = apply_insight_ops(self.insights.get(scope, []), ops[: o.max_ops_per_call],
                                                             o.max_insights)
            totals["applied"] += counts["applied"]
            totals["rejected"] += counts["rejected"]
            replies.append(reply)

        def full() -> str:
            return FULL_NOTE if len(self.insights.get(scope, [])) >= o.max_insights else ""

        for e, failure, success in chosen:
            call(COMPARE_PROMPT.format(failure=turns_text(shot_turns(task, e, failure), 800),
                                       success=turns_text(shot_turns(task, e, success), 800),
                                       rules=numbered(self.insights.get(scope, [])), full=full()))
        for group in sets:
            shown = "\n\n".join(f"Success {i}:\n{turns_text(shot_turns(task, e, s), 500)}"
                                for i, (e, s) in enumerate(group, 1))
            call(SUCCESS_PROMPT.format(successes=shown, rules=numbered(self.insights.get(scope, [])), full=full()))
        return {"insight_calls": len(chosen) + len(sets), "insight_compare_calls": len(chosen),
                "insight_success_calls": len(sets), "insight_ops_applied": totals["applied"],
                "insight_ops_rejected": totals["rejected"], "insight_ops_dropped": totals["ops_dropped"],
                "insight_parse_failures": totals["parse_failures"],
                "generated_tokens_insights": self.generated_tokens - tokens_before, "insight_replies": replies}

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
        saved = read_json(path / "insights.json")
        self.insights = {GLOBAL_SCOPE: saved} if isinstance(saved, list) else saved  # a list: an older checkpoint


def record_turns(r: dict[str, Any]) -> list[dict[str, str]]:
    """A stored success as chat turns (records written before ``turns`` existed hold ``user`` + ``completion``)."""
    if "turns" in r:
        return r["turns"]
    return [{"role": "user", "content": r["user"]}, {"role": "assistant", "content": r["completion"]}]

