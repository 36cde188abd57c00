"""Multi-turn agent loop: an ``Environment`` protocol, robust action parsing, a context budget and trajectories.

Design (how methods stay unaware of environments): an environment task owns the episode loop. At every turn it
turns each live conversation into an ``Example`` whose ``meta["messages"]`` holds the chat so far, and calls the
method's ordinary ``generate(task, turn_examples, max_new_tokens)``; the task's ``prompt`` renders those messages
with the chat template, ending in the assistant generation prompt. So vanilla, SFT and anything else that builds
its prompts with ``task.prompt`` works unchanged, and a latent-memory method that inserts latents at the end of the
prompt inserts them at the start of every assistant turn (``assistant_starts`` gives the earlier turns' starts).
Expert trajectories become one SFT example per assistant turn (history -> that reply), i.e. a turn-level loss on
the assistant turns. The runner only needs to call ``task.rollout`` when a task has one (see harness/runner.py).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

Message = dict[str, str]
Policy = Callable[[list[list[Message]], list[str]], list[str]]  # (conversations, episode ids) -> replies


@runtime_checkable
class Environment(Protocol):
    """One episode of a text environment. ``reset`` starts it and returns the first observation."""

    def reset(self) -> str: ...

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        """Apply ``action``; returns (observation, reward, done, info). ``info["success"]`` marks a solved task."""
        ...

    def close(self) -> None: ...


class InvalidAction(ValueError):
    """The model's reply holds no well-formed action; the message is shown to the agent as the observation."""


@dataclass(frozen=True)
class AgentConfig:
    """How the agent loop runs one batch of episodes."""

    max_turns: int = 20
    """Assistant turns per episode; the episode ends unsolved when they run out."""
    context_tokens: int = 2048
    """Budget for the prompt of one turn; the oldest (action, observation) pairs are dropped to fit it."""
    max_new_tokens: int = 48
    """Tokens the model may generate per turn."""
    system_prompt: str = ""
    """System message opening every conversation (empty: none)."""


# --- action parsing ------------------------------------------------------------------------------------------

_TAG = "<{t}>(.*?)(?:</{t}>|$)"


def parse_tagged(reply: str, tags: Sequence[str]) -> tuple[str, str]:
    """The first ``<tag>content</tag>`` in ``reply`` among ``tags`` -> (tag, content).

    The closing tag may be missing at the very end (generation can stop on it). Raises ``InvalidAction``
    with a message for the agent when no tag with non-empty content is present.
    """
    best: tuple[int, str, str] | None = None
    for t in tags:
        m = re.search(_TAG.format(t=re.escape(t)), reply, flags=re.S | re.I)
        if m and m.group(1).strip() and (best is None or m.start() < best[0]):
            best = (m.start(), t, m.group(1).strip())
    if best is None:
        wanted = " or ".join(f"<{t}>...</{t}>" for t in tags)
        raise InvalidAction(f"Invalid action: your reply must contain {wanted}. Try again.")
    return best[1], best[2]


def parse_command(reply: str) -> str:
    """An environment command: ``<action>go north</action>``, else an ``Action: go north`` / ``> go north`` line.

    Whitespace is collapsed and the command lower-cased (text games are case-insensitive)."""
    try:
        _, cmd = parse_tagged(reply, ["action"])
    except InvalidAction:
        m = re.search(r"^\s*(?:action\s*:|>)\s*(.+)$", reply, flags=re.I | re.M)
        if not m or not m.group(1).strip():
            raise InvalidAction(
                "Invalid action: reply with exactly one command inside <action>...</action>, "
                "e.g. <action>look around</action>."
            ) from None
        cmd = m.group(1)
    cmd = re.sub(r"\s+", " ", cmd.splitlines()[0] if cmd.strip() else cmd).strip().strip(".").lower()
    if not cmd:
        raise InvalidAction("Invalid action: the command is empty.")
    return cmd


# --- context budget ------------------------------------------------------------------------------------------


def approx_tokens(text: str) -> int:
    """A tokenizer-free estimate (4 characters per token), used when no tokenizer is given."""
    return (len(text) + 3) // 4


def fit_context(
    messages: Sequence[Message], budget: int, count: Callable[[str], int] = approx_tokens, per_message: int = 4
) -> list[Message]:
    """Keep the system message(s), the first user message (the goal) and the most recent turns within ``budget``.

    Turns are dropped oldest first, whole (assistant, user) pairs at a time so the roles keep alternating; a note
    in place of the dropped turns tells the agent they are gone. The head and the last message are always kept,
    even if they alone exceed the budget (the prompt is then over budget rather than meaningless).
    """
    msgs = list(messages)
    head_end = next((i + 1 for i, m in enumerate(msgs) if m["role"] == "user"), len(msgs))
    head, tail = msgs[:head_end], msgs[head_end:]

    def cost(ms: Sequence[Message]) -> int:
        return sum(count(m["content"]) + per_message for m in ms)

    if cost(msgs) <= budget:
        return msgs
    dropped = 0
    # Tail alternates assistant, user, assistant, ...; drop from the front in pairs, keep at least the last one.
    while len(tail) > 1 and cost(head) + cost(tail) + 16 > budget:
        n = 2 if len(tail) > 2 else 1
        tail = tail[n:]
        dropped += n
    if dropped and head and head[-1]["role"] == "user":
        # The note goes after the goal (not as a message of its own), so the roles keep alternating.
        note = f"\n\n[{dropped // 2 or 1} earlier turn(s) omitted]"
        head = [*head[:-1], {"role": "user", "content": head[-1]["content"] + note}]
    return head + tail


# --- rendering (the hook for latent-memory methods) ------------------------------------------------------------


def render_messages(messages: Sequence[Message], tokenizer: Any = None) -> str:
    """The chat-formatted prompt for the next assistant turn (plain 'role: content' lines without a template)."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


def assistant_starts(messages: Sequence[Message], tokenizer: Any = None) -> list[int]:
    """Character offsets in ``render_messages(messages)`` where each assistant turn starts, the new one last.

    This is where MemGen inserts its prompt latents ("at the start of every assistant turn"): the rendering of the
    history before an assistant message, with the generation prompt, is a prefix of the full rendering.
    """
    starts = [len(render_messages(messages[:k], tokenizer)) for k, m in enumerate(messages) if m["role"] == "assistant"]
    return [*starts, len(render_messages(messages, tokenizer))]


# --- the loop --------------------------------------------------------------------------------------------------


@dataclass
class Step:
    reply: str
    action: str | None
    observation: str
    reward: float
    done: bool
    valid: bool


@dataclass
class Trajectory:
    id: str
    messages: list[Message]
    steps: list[Step] = field(default_factory=list)
    reward: float = 0.0
    success: bool = False
    seconds: float = 0.0
    done: bool = False

    @property
    def turns(self) -> int:
        return len(self.steps)

    @property
    def invalid_actions(self) -> int:
        return sum(not s.valid for s in self.steps)

    @property
    def replies(self) -> list[str]:
        return [s.reply for s in self.steps]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(turns=self.turns, invalid_actions=self.invalid_actions)
        return d


def run_episodes(
    policy: Policy,
    envs: Sequence[Environment],
    ids: Sequence[str],
    cfg: AgentConfig,
    parse: Callable[[str], str] = parse_command,
    count: Callable[[str], int] = approx_tokens,
    trajectory_path: Path | None = None,
) -> list[Trajectory]:
    """Run one episode per environment, all turns batched through ``policy``; returns the trajectories.

    ``parse`` turns a reply into the action passed to ``env.step``; an ``InvalidAction`` becomes an invalid
    move (the error is the next observation, the turn is used up), never a crash. ``reward`` of a trajectory is
    the last reward the environment returned (environments report the episode score there).
    """
    t0 = time.perf_counter()
    trajs = []
    for env, ep_id in zip(envs, ids, strict=True):
        msgs: list[Message] = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
        msgs.append({"role": "user", "content": env.reset()})
        trajs.append(Trajectory(id=ep_id, messages=msgs))
    for _turn in range(cfg.max_turns):
        live = [i for i, tr in enumerate(trajs) if not tr.done]
        if not live:
            break
        replies = policy([fit_context(trajs[i].messages, cfg.context_tokens, count) for i in live],
                         [trajs[i].id for i in live])
        if len(replies) != len(live):
            raise RuntimeError(f"policy returned {len(replies)} replies for {len(live)} conversations")
        for i, reply in zip(live, replies, strict=True):
            tr, env = trajs[i], envs[i]
            tr.messages.append({"role": "assistant", "content": reply})
            try:
                action: str | None = parse(reply)
            except InvalidAction as exc:
                action = None
                obs, reward, done, info = str(exc), tr.reward, False, {}
            else:
                obs, reward, done, info = env.step(action)
            tr.steps.append(Step(reply, action, obs, float(reward), bool(done), action is not None))
            tr.reward = float(reward)
            tr.success = bool(info.get("success", tr.success))
            if done:
                tr.done = True
                tr.seconds = time.perf_counter() - t0
            else:
                tr.messages.append({"role": "user", "content": obs})
    for tr in trajs:
        if not tr.done:
            tr.seconds = time.perf_counter() - t0
    for env in envs:
        env.close()
    if trajectory_path is not None:
        write_trajectories(trajectory_path, trajs)
    return trajs


def write_trajectories(path: Path, trajs: Sequence[Trajectory]) -> None:
    """Append trajectories as JSONL (one object per episode: messages, steps, reward, turns, seconds)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        for tr in trajs:
            fh.write(json.dumps(tr.to_dict(), ensure_ascii=False) + "\n")


def episode_stats(trajs: Sequence[Trajectory | dict[str, Any]]) -> dict[str, float]:
    """Success rate (percent), mean turns, mean seconds and invalid actions per episode."""
    rows = [t.to_dict() if isinstance(t, Trajectory) else t for t in trajs]
    n = max(len(rows), 1)
    return {
        "episodes": len(rows),
        "success_rate": 100.0 * sum(bool(r["success"]) for r in rows) / n,
        "mean_turns": sum(r["turns"] for r in rows) / n,
        "mean_seconds": sum(r["seconds"] for r in rows) / n,
        "mean_invalid_actions": sum(r["invalid_actions"] for r in rows) / n,
    }
