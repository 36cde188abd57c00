"""``EnvTask``: a task whose examples are episodes of a text environment, run through ``harness.agent``.

- test examples are episodes; ``rollout`` plays them with the method as the policy and returns one JSON
  trajectory per episode as the "completion";
- train examples are expert trajectories cut into one example per assistant turn (``meta["messages"]`` = the
  history, ``target`` = the expert's reply), so SFT-style methods get a turn-level loss on the assistant turns;
- ``score`` replays the replies of a completion in a fresh copy of the episode and returns its success (or
  score), so the number depends only on (completion, example) and is usable as an RL reward.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from harness.agent import (
    AgentConfig,
    Environment,
    InvalidAction,
    Message,
    Trajectory,
    fit_context,
    parse_command,
    render_messages,
    run_episodes,
)
from tasks.base import Example, TaskDefinition, TaskError, subsample

DEFAULT_SYSTEM = (
    "You are an agent in a text-based environment. Each turn, read the observation and reply with exactly one "
    "command inside <action>...</action>, for example <action>look around</action>."
)


@dataclass(frozen=True)
class AgentTaskOptions:
    """Options shared by every environment task (``options:`` in its YAML definition)."""

    max_turns: int = 20
    """Assistant turns per episode before it ends unsolved."""
    context_tokens: int = 1536
    """Prompt budget per turn (approximate tokens, 4 characters each); older turns are dropped to fit."""
    system_prompt: str = DEFAULT_SYSTEM
    """System message of every episode."""
    score: str = "success"
    """``success`` (1 if the episode's task is solved) or ``reward`` (the environment's final score in [0, 1])."""


class EnvTask:
    """Base class; subclasses provide ``episodes``, ``make_env`` and ``expert_replies``."""

    options_class: type = AgentTaskOptions

    def __init__(self, definition: TaskDefinition, data_root: str | os.PathLike | None = None):
        from harness.config import ConfigError, from_dict

        self.definition = definition
        self.name = definition.name
        self.version = definition.version
        self.domain = definition.domain
        self.max_new_tokens = definition.max_new_tokens  # per turn
        self._data_root = data_root
        try:
            self.options = from_dict(self.options_class, dict(definition.options), prefix="options.")
        except ConfigError as exc:
            raise TaskError(f"task {definition.name}: {exc}") from exc
        if self.options.score not in ("success", "reward"):
            raise TaskError(f"task {self.name}: options.score must be 'success' or 'reward', got {self.options.score!r}")

    # -- to implement -------------------------------------------------------------------------------------
    def episodes(self, split: str) -> list[Example]:
        """All episodes of ``split`` (question = the first observation; meta = what ``make_env`` needs)."""
        raise NotImplementedError

    def make_env(self, example: Example) -> Environment:
        raise NotImplementedError

    def expert_replies(self, example: Example) -> list[str]:
        """The expert's replies for a train episode (each one holds one action)."""
        raise NotImplementedError

    def parse(self, reply: str) -> str:
        return parse_command(reply)

    # -- Task protocol ------------------------------------------------------------------------------------
    def agent_config(self, max_new_tokens: int | None = None) -> AgentConfig:
        o = self.options
        return AgentConfig(max_turns=o.max_turns, context_tokens=o.context_tokens,
                           max_new_tokens=max_new_tokens or self.max_new_tokens, system_prompt=o.system_prompt)

    def initial_messages(self, example: Example) -> list[Message]:
        sys = [{"role": "system", "content": self.options.system_prompt}] if self.options.system_prompt else []
        return [*sys, {"role": "user", "content": example.question}]

    def load(self, split: str, limit: int | None = None, seed: int = 0) -> list[Example]:
        """Test: episodes. Train: a seeded subset of ``limit`` expert episodes, one example per expert turn."""
        eps = subsample(self.episodes(split), limit, seed)
        if split != "train":
            return eps
        out = []
        for ep in eps:
            out.extend(self.turn_examples(ep, self.expert_replies(ep)))
        return out

    def turn_examples(self, ep: Example, replies: Sequence[str]) -> list[Example]:
        """Play ``replies`` in the episode; one example per reply whose prompt is the history before it."""
        env = self.make_env(ep)
        msgs = self.initial_messages(ep)
        # reset() reproduces ep.question: the history the model sees in training is the one it sees at test time.
        msgs[-1] = {"role": "user", "content": env.reset()}
        out = []
        try:
            for k, reply in enumerate(replies):
                ctx = fit_context(msgs, self.options.context_tokens)
                # "history" (the expert's earlier replies, never truncated) lets score() replay up to this turn.
                out.append(Example(id=f"{ep.id}-t{k}", question=ctx[-1]["content"], answer=ep.answer, target=reply,
                                   meta={**ep.meta, "messages": ctx, "episode": ep.id, "turn": k,
                                         "history": list(replies[:k])}))
                msgs.append({"role": "assistant", "content": reply})
                obs, _, done, _ = env.step(self.parse(reply))
                if done:
                    break
                msgs.append({"role": "user", "content": obs})
        finally:
            env.close()
        return out

    def messages(self, example: Example) -> list[Message]:
        return list(example.meta.get("messages") or self.initial_messages(example))

    def prompt(self, example: Example, tokenizer: Any = None) -> str:
        return render_messages(self.messages(example), tokenizer)

    def rollout(self, method: Any, examples: Sequence[Example], max_new_tokens: int, tokenizer: Any = None,
                batch_size: int = 8) -> list[str]:
        """Play each episode with ``method.generate`` as the policy; one JSON trajectory per example."""
        by_id = {e.id: e for e in examples}

        def policy(convs: list[list[Message]], ids: list[str]) -> list[str]:
            # The expert's actions stay out of what the method sees at test time.
            meta = {i: {k: v for k, v in by_id[i].meta.items() if k != "gold_actions"} for i in ids}
            turn = [Example(id=f"{i}-t{len(c)}", question=c[-1]["content"], answer=by_id[i].answer, target="",
                            meta={**meta[i], "messages": c, "episode": i}) for c, i in zip(convs, ids, strict=True)]
            return method.generate(self, turn, max_new_tokens)

        out: list[str] = []
        cfg = self.agent_config(max_new_tokens)
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            trajs = run_episodes(policy, [self.make_env(e) for e in chunk], [e.id for e in chunk], cfg, self.parse)
            out.extend(json.dumps(t.to_dict(), ensure_ascii=False) for t in trajs)
        return out

    @staticmethod
    def replies_of(completion: str) -> list[str]:
        """The assistant replies in a completion: a rollout's JSON trajectory, or a single plain reply."""
        try:
            d = json.loads(completion)
        except (json.JSONDecodeError, TypeError):
            return [completion]
        if isinstance(d, dict) and isinstance(d.get("steps"), list):
            return [str(s.get("reply", "")) for s in d["steps"]]
        return [completion]

    def extract(self, completion: str) -> str | None:
        """The last well-formed action of the completion."""
        last = None
        for r in self.replies_of(completion):
            try:
                last = self.parse(r)
            except InvalidAction:
                pass
        return last

    def replay(self, completion: str, example: Example) -> Trajectory:
        """Play the completion's replies in a fresh copy of the episode; for a train turn example, the expert's
        earlier replies first (so an RL method scoring one reply gets the episode's outcome after it)."""
        history = list(example.meta.get("history", []))
        replies = (history + self.replies_of(completion))[: max(self.options.max_turns, len(history) + 1)]
        it = iter(replies)
        cfg = AgentConfig(max_turns=len(replies), context_tokens=10**9, system_prompt=self.options.system_prompt)
        return run_episodes(lambda convs, ids: [next(it)], [self.make_env(example)], [example.id], cfg, self.parse)[0]

    def score(self, completion: str, example: Example) -> float:
        tr = self.replay(completion, example)
        if self.options.score == "success":
            return 1.0 if tr.success else 0.0
        return max(0.0, min(1.0, tr.reward))
