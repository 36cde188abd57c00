"""TextWorldExpress: games generated offline from seeds, expert trajectories, real rewards, the runner path."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

pytest.importorskip("textworld_express", reason="pip install textworld-express (scripts/setup.sh does)")
if shutil.which("java") is None:
    pytest.fail("textworld_express tests need java on PATH (apt-get install default-jre-headless)")

from harness.config import EvalConfig, RunConfig, TrainConfig  # noqa: E402
from tasks.base import TaskError  # noqa: E402
from tasks.envs.textworld_express import TextWorldExpressTask  # noqa: E402
from tasks.registry import definitions, get_task  # noqa: E402


def twx(**opts) -> TextWorldExpressTask:
    d = definitions()["textworld_express"]
    return TextWorldExpressTask(dataclasses.replace(d, options={**d.options, **opts}))


def expert_completion(task, ep) -> str:
    return json.dumps({"steps": [{"reply": r} for r in task.expert_replies(ep)]})


def test_games_are_generated_offline_and_deterministically():
    a, b = twx().load("test", limit=3, seed=1), twx().load("test", limit=3, seed=1)
    assert [e.id for e in a] == [e.id for e in b]
    assert [e.question for e in a] == [e.question for e in b]
    assert [e.meta["gold_actions"] for e in a] == [e.meta["gold_actions"] for e in b]
    assert {e.meta["fold"] for e in a} == {"test"} and all(e.meta["seed"] >= 20000 for e in a)
    assert all("Valid actions:" in e.question and e.meta["gold_actions"] for e in a)
    train_ids = {e.meta["episode"] for e in twx().load("train", limit=3, seed=1)}
    assert train_ids.isdisjoint({e.id for e in a})


def test_coin_expert_is_the_same_shortest_path_on_every_reset():
    # the simulator's own coin gold path is an unseeded random walk (3, 5, 7, ... moves for one seed)
    from tasks.envs.textworld_express import TextWorldExpressEnvironment

    params = "numLocations=3,numDistractorItems=0,includeDoors=0"
    golds = [TextWorldExpressEnvironment("coin", params, "test", 20000).expert_episode()[1] for _ in range(4)]
    assert all(g == golds[0] for g in golds)
    assert golds[0][0] == "look around" and golds[0][-1] == "take coin"
    assert len(golds[0]) <= 2 + 2  # 3 rooms: the coin is at most two moves away
    env = TextWorldExpressEnvironment("coin", "numLocations=6,numDistractorItems=0,includeDoors=1", "train", 1)
    _, gold = env.expert_episode()
    assert [env.step(a)[3]["success"] for a in gold][-1] is True and any(a.startswith("open door") for a in gold)
    env.close()


def test_expert_trajectories_score_one_and_other_completions_zero():
    task = twx(test_episodes=3)
    eps = task.load("test")
    assert {e.meta["game"] for e in eps} == {"coin", "twc", "cookingworld"}
    for ep in eps:
        assert task.score(expert_completion(task, ep), ep) == 1.0
        assert task.extract(expert_completion(task, ep)) == ep.meta["gold_actions"][-1]
        assert task.score("<action>look around</action>", ep) == 0.0
        assert task.score("not even an action", ep) == 0.0
    # an expert trajectory cut short solves nothing
    ep = next(e for e in eps if e.meta["game"] == "cookingworld")  # coin has no partial score
    short = json.dumps({"steps": [{"reply": r} for r in task.expert_replies(ep)[:-1]]})
    assert task.score(short, ep) == 0.0
    assert 0.0 < twx(score="reward").score(short, ep) < 1.0


def test_train_examples_are_expert_turns_with_history(tiny):
    task = twx()
    rows = task.load("train", limit=2, seed=0)
    eps = {r.meta["episode"] for r in rows}
    assert len(eps) == 2
    first = [r for r in rows if r.meta["turn"] == 0]
    assert len(first) == 2 and all(r.meta["messages"][0]["role"] == "system" for r in first)
    for r in rows:
        msgs = r.meta["messages"]
        assert r.target.startswith("<action>") and msgs[-1]["role"] == "user"
        assert len([m for m in msgs if m["role"] == "assistant"]) <= r.meta["turn"]  # older turns may be cut
    # scoring one reply of a turn example replays the expert's history first: the last expert turn solves it
    by_ep = [r for r in rows if r.meta["episode"] == rows[0].meta["episode"]]
    assert task.score(by_ep[-1].target, by_ep[-1]) == 1.0
    assert task.score("<action>inventory</action>", by_ep[-1]) == 0.0
    assert task.score(by_ep[-1].target, by_ep[0]) == 0.0 or len(by_ep) == 1
    tok = tiny().tokenizer
    # with the default budget, prompt + expert reply fit the default train.max_length (512): no target is cut off
    lengths = [len(tok(task.prompt(r, tok) + r.target, add_special_tokens=False).input_ids) + 1 for r in rows]
    assert max(lengths) <= TrainConfig().max_length
    prompt = task.prompt(rows[-1], tok)
    assert prompt.endswith("<|im_start|>assistant\n") and "<action>" in prompt


def test_bad_options_and_splits_fail_clearly():
    with pytest.raises(TaskError, match="options.score"):
        twx(score="accuracy")
    with pytest.raises(TaskError, match="unknown config key"):
        twx(turns=3)
    with pytest.raises(TaskError, match="no split 'val'"):
        twx().load("val")


@pytest.fixture
def one_thread():
    """Many short generate calls: with 2 cores shared by other jobs, one torch thread is far faster than two
    (measured 0.6 ms vs 17 ms for the tiny model's 64x64 linear under load)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.slow
def test_rollout_with_a_real_model_and_the_runner(tiny, tmp_path, monkeypatch, one_thread):
    """Vanilla, SFT, MemGen and both RL baselines (tiny model) play real episodes through the runner; samples hold
    trajectories. RL trains on the expert-turn examples with the environment's outcome as reward (``score``
    replays the expert's earlier replies, then the sampled one)."""
    from harness.runner import run_method

    d = definitions()["textworld_express"]
    defs = tmp_path / "defs"
    defs.mkdir()
    import yaml

    small = {**dataclasses.asdict(d), "name": "twx_smoke",
             "options": {**d.options, "max_turns": 2, "context_tokens": 300, "max_valid_actions": 8,
                         "games": {"coin": d.options["games"]["coin"]}}}
    (defs / "twx_smoke.yaml").write_text(yaml.safe_dump({k: v for k, v in small.items() if v not in (None, {}, "")}))
    monkeypatch.setenv("MEMGEN_BENCH_TASKS", str(defs))
    assert get_task("twx_smoke").options.max_turns == 2
    rl = {"grpo": {"num_generations": 2, "max_completion_length": 6},
          "reinforce_pp": {"samples_per_prompt": 2, "max_completion_length": 6}}
    for method in ("vanilla", "sft", "memgen", "grpo", "reinforce_pp"):
        cfg = RunConfig(sequence="twx_smoke", methods=(method,), model="tiny-random", limit=2, out=str(tmp_path),
                        train=TrainConfig(max_steps=2, batch_size=2), eval=EvalConfig(max_new_tokens=6),
                        method_options=rl)
        summary = run_method(method, cfg, tmp_path / method, model=tiny())
        assert summary["complete"] and all(v in (0.0, 50.0, 100.0) for row in summary["matrix"] for v in row)
        samples = [json.loads(x) for x in (tmp_path / method / "samples" / "r0_twx_smoke.jsonl").read_text().splitlines()]
        assert len(samples) == 2
        for s in samples:
            traj = json.loads(s["completion"])
            assert 1 <= traj["turns"] <= 2 and traj["messages"][0]["role"] == "system"
            assert s["score"] == float(traj["success"])
    train = json.loads((tmp_path / "sft" / "train" / "stage1.json").read_text())
    assert len(train["losses"]) == 2 and all(x > 0 for x in train["losses"])
    for method in rl:
        train = json.loads((tmp_path / method / "train" / "stage1.json").read_text())
        assert len(train["rewards"]) == 2 and all(0.0 <= r <= 1.0 for r in train["rewards"])
