"""The agent loop: action parsing, the context budget, rendering hooks and whole episodes on a small real game."""

from __future__ import annotations

import json

import pytest

from harness.agent import (
    AgentConfig,
    InvalidAction,
    assistant_starts,
    episode_stats,
    fit_context,
    parse_command,
    parse_tagged,
    render_messages,
    run_episodes,
)


class GuessGame:
    """A complete (if small) text game: guess the hidden number 0-9; the reply 'higher'/'lower' guides you."""

    def __init__(self, secret: int):
        self.secret = secret
        self.closed = False

    def reset(self) -> str:
        return "Guess my number (0-9). Reply <action>guess N</action>."

    def step(self, action: str):
        if not action.startswith("guess ") or not action[6:].strip().isdigit():
            return "Unknown command.", 0.0, False, {}
        n = int(action[6:])
        if n == self.secret:
            return "Correct!", 1.0, True, {"success": True}
        return ("higher" if n < self.secret else "lower"), 0.0, False, {"success": False}

    def close(self) -> None:
        self.closed = True


def bisect_policy(convs, ids):
    """A rule-based agent that reads the game's feedback from the conversation (binary search)."""
    out = []
    for msgs in convs:
        lo, hi = 0, 9
        guesses = [m["content"] for m in msgs if m["role"] == "assistant"]
        feedback = [m["content"] for m in msgs if m["role"] == "user"][1:]
        for g, f in zip(guesses, feedback, strict=False):
            try:
                n = int(parse_command(g).split()[-1])
            except (InvalidAction, ValueError):
                continue
            lo, hi = (n + 1, hi) if f.startswith("higher") else (lo, n - 1) if f.startswith("lower") else (lo, hi)
        out.append(f"I think <action>guess {(lo + hi) // 2}</action>")
    return out


def test_parse_command_accepts_tags_and_fallbacks():
    assert parse_command("Let me look. <action>Look  Around</action> then more") == "look around"
    assert parse_command("<action>take coin") == "take coin"  # generation stopped before the closing tag
    assert parse_command("thinking...\nAction: open fridge.") == "open fridge"
    assert parse_command("> go north") == "go north"
    assert parse_tagged("<answer>Paris</answer> <search>x</search>", ["search", "answer"]) == ("answer", "Paris")
    assert parse_tagged("a <search>capital of France</search>", ["search", "answer"]) == ("search", "capital of France")


@pytest.mark.parametrize("reply", ["", "I will go north", "<action>   </action>", "Action:   "])
def test_malformed_actions_raise_invalid_action(reply):
    with pytest.raises(InvalidAction, match="Invalid action"):
        parse_command(reply)


def test_fit_context_drops_oldest_pairs_and_keeps_goal():
    msgs = [{"role": "system", "content": "S" * 10}, {"role": "user", "content": "G" * 10}]
    for k in range(4):
        msgs += [{"role": "assistant", "content": f"a{k}" * 5}, {"role": "user", "content": f"o{k}" * 5}]
    # cost = len(content) + 4 per message: head 28, each message 14 -> whole = 28 + 8 * 14 = 140
    assert fit_context(msgs, 140, count=len) == msgs
    kept = fit_context(msgs, 100, count=len)
    # 28 + tail + 16 <= 100 -> tail <= 56 -> 4 messages (2 pairs) kept, 2 pairs dropped
    assert kept[0] == msgs[0] and kept[1]["content"] == "G" * 10 + "\n\n[2 earlier turn(s) omitted]"
    assert kept[2]["role"] == "assistant" and kept[2]["content"].startswith("a2")
    assert len(kept) == 6 and kept[-1]["content"] == "o3" * 5
    roles = [m["role"] for m in kept]
    assert all(a != b for a, b in zip(roles[1:], roles[2:], strict=False))
    # the goal and the newest message survive any budget
    tiny = fit_context(msgs, 1, count=len)
    assert tiny[0] == msgs[0] and tiny[1]["content"].startswith("G" * 10) and tiny[-1] == msgs[-1]


def test_assistant_starts_mark_each_assistant_turn(tiny):
    tok = tiny().tokenizer
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<action>a</action>"},
            {"role": "user", "content": "obs"}]
    text = render_messages(msgs, tok)
    starts = assistant_starts(msgs, tok)
    assert len(starts) == 2
    assert text[starts[0]:].startswith("<action>a</action>")
    assert starts[1] == len(text) and text.endswith("<|im_start|>assistant\n")


def test_run_episodes_plays_to_success_and_records(tmp_path):
    envs = [GuessGame(7), GuessGame(0), GuessGame(3)]
    path = tmp_path / "traj.jsonl"
    trajs = run_episodes(bisect_policy, envs, ["a", "b", "c"], AgentConfig(max_turns=6), trajectory_path=path)
    # binary search over 0-9 starting at 4: 7 -> 4,7 (2 turns); 0 -> 4,1,0 (3); 3 -> 4,1,2,3 (4)
    assert [t.turns for t in trajs] == [2, 3, 4]
    assert all(t.success and t.reward == 1.0 for t in trajs)
    assert all(e.closed for e in envs)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    assert rows[0]["messages"][-1]["role"] == "assistant" and rows[0]["steps"][-1]["observation"] == "Correct!"
    stats = episode_stats(rows)
    assert stats["success_rate"] == 100.0 and stats["mean_turns"] == 3.0


def test_invalid_moves_use_up_turns_without_crashing():
    replies = iter(["no idea", "<action>guess 5</action>", "<action></action>", "<action>guess 6</action>"])
    trajs = run_episodes(lambda convs, ids: [next(replies) for _ in convs], [GuessGame(9)], ["x"],
                         AgentConfig(max_turns=4))
    t = trajs[0]
    assert t.turns == 4 and not t.success and not t.done and t.invalid_actions == 2
    assert t.steps[0].observation.startswith("Invalid action") and t.steps[1].observation == "higher"
    # the invalid move's error is shown to the agent as the next observation
    assert t.messages[2]["content"].startswith("Invalid action")
