"""GRPO baseline (TRL GRPOTrainer) on the tiny model: TRL's advantages equal ours, LoRA-only updates, checkpoints."""

from __future__ import annotations

import pytest
import torch
from stand_in_tasks import LetterTask

from baselines.grpo import GRPO, build_trainer, grpo_config, parse_options
from harness import rl
from harness.config import ConfigError, RLConfig, RunConfig, TrainConfig


def _cfg(kl: float = 0.0, reference: str = "init", **train) -> RunConfig:
    train = {"max_steps": 1, "lr": 1e-2, "warmup_ratio": 0.0, **train}
    return RunConfig(model="tiny-random", train=TrainConfig(**train), rl=RLConfig(kl_coef=kl, reference=reference))


@pytest.mark.slow
@pytest.mark.parametrize("scale", ["group", "batch"])
def test_trl_advantages_equal_pure_function(tiny, scale):
    lm = tiny(0)
    task = LetterTask()
    examples = task.load("train", limit=4)
    opts = parse_options({"num_generations": 4, "prompts_per_step": 2, "scale_rewards": scale})
    args = grpo_config(_cfg(), opts, seed=1, max_steps=1, max_completion_length=8)
    prompts = [task.prompt(e, lm.tokenizer) for e in examples]

    def task_score(completions, idx, **_):
        return [task.score(c, examples[i]) for c, i in zip(completions, idx, strict=True)]

    trainer = build_trainer(lm.model, lm.tokenizer, prompts, task_score, args)
    trainer.train()
    rewards = torch.tensor(list(trainer._logs["rewards"]["task_score"]))
    trl_adv = torch.tensor(list(trainer._logs["advantages"]))
    assert rewards.numel() == 8 and rewards.std() > 0  # a real spread of rewards, not a trivial all-zero batch
    ours = rl.group_advantages(rewards, 4, scale, eps=1e-4)
    torch.testing.assert_close(trl_adv, ours, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_grpo_trains_only_lora_and_checkpoint_round_trips(tiny, tmp_path):
    cfg = _cfg(max_steps=1)
    opts = {"num_generations": 4, "prompts_per_step": 2, "max_completion_length": 8}
    method = GRPO(tiny(0), cfg, opts)
    task = LetterTask()
    before = {n: p.detach().clone() for n, p in method.model.named_parameters()}
    stats = method.train_on_task(task, task.load("train", limit=4), stage=1)
    assert len(stats["losses"]) == 1 and all(torch.isfinite(torch.tensor(stats["losses"])))
    assert len(stats["rewards"]) == 1
    # the stage's budget: 1 step x 2 prompts x 4 generations
    assert stats["prompts_per_step"] == 2 and stats["examples_seen"] == 2 and stats["optimizer_steps"] == 1
    assert 0 < stats["generated_tokens"] <= 8 * 8 < stats["train_tokens"]  # completions; prompts + completions
    assert stats["trainable_params"] == sum(p.numel() for n, p in method.model.named_parameters() if "lora_" in n)
    changed = {n for n, p in method.model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed, "no parameter moved"
    assert all("lora_" in n for n in changed), f"non-LoRA parameters changed: {sorted(changed)[:3]}"
    method.save(tmp_path / "ckpt")
    again = GRPO(tiny(0), cfg, opts)
    again.load(tmp_path / "ckpt")
    for (n, p), (_, q) in zip(method.model.named_parameters(), again.model.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    examples = task.load("test", limit=3)
    assert again.generate(task, examples, 6) == method.generate(task, examples, 6)
    # resuming from the checkpoint repeats the next stage exactly (seeds derive from the stage)
    method.train_on_task(task, task.load("train", limit=4), stage=2)
    again.train_on_task(task, task.load("train", limit=4), stage=2)
    for (n, p), (_, q) in zip(method.model.named_parameters(), again.model.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_grpo_options_are_checked(tiny):
    with pytest.raises(ConfigError, match="method_options.grpo.group"):
        parse_options({"group": 8})
    with pytest.raises(ConfigError, match="num_generations must be >= 2"):
        parse_options({"num_generations": 1})
    with pytest.raises(ConfigError, match="loss_type"):
        parse_options({"loss_type": "ppo"})
    with pytest.raises(ConfigError, match="rl.kl_coef"):
        parse_options({"beta": 0.04})
    with pytest.raises(ConfigError, match="does not divide train.batch_size"):
        parse_options({"num_generations": 3})
    # the budget rule: train.batch_size rollouts per step, 1 prompt x 8 by default
    assert parse_options({}).num_generations == 8 and parse_options({}).prompts_per_step == 1
    assert parse_options({"num_generations": 4}, batch_size=16).prompts_per_step == 4
    assert _cfg().rl.kl_coef == RunConfig().rl.kl_coef == 0.0  # one default for both RL baselines


def test_trl_sees_the_evaluation_prompt_ids_and_stops(tiny):
    """With a tokenizer that adds BOS (Llama-style), TRL's string path would put a second BOS in front of the chat
    template's; ours feeds the ids evaluation feeds, and rollouts stop on evaluation's stop tokens."""
    import copy

    from harness.training import rollout_stop_ids

    lm = tiny(0)
    tok = copy.deepcopy(lm.tokenizer)
    tok.add_bos_token = True
    prompt = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"  # the template's own leading token
    assert tok(prompt).input_ids[0] == tok.bos_token_id and tok(prompt).input_ids[1] == tok.bos_token_id
    opts = parse_options({"num_generations": 2, "prompts_per_step": 1})
    args = grpo_config(_cfg(), opts, seed=1, max_steps=1, max_completion_length=4)
    trainer = build_trainer(lm.model, tok, [prompt], lambda completions, **_: [0.0] * len(completions), args)
    ids, _, _ = trainer._tokenize_prompts([prompt])
    assert ids == [tok(prompt, add_special_tokens=False).input_ids]  # what generate_greedy tokenises
    stops = rollout_stop_ids(tok, lm.model)
    assert trainer.eos_token_ids == stops and trainer.generation_config.eos_token_id == stops


@pytest.mark.parametrize("reference", ["init", "task_start"])
def test_grpo_kl_reference_follows_rl_reference(tiny, reference):
    """rl.reference=init: no "ref" adapter, so TRL's reference forward runs with the adapters off (the base model);
    task_start: TRL's frozen copy of the adapter as it was when the task began."""
    method = GRPO(tiny(0), _cfg(kl=0.04, reference=reference), {"num_generations": 2, "max_completion_length": 4})
    task = LetterTask()
    args = grpo_config(method.cfg, method.opts, seed=1, max_steps=1, max_completion_length=4)
    trainer = build_trainer(method.model, method.tokenizer, [task.prompt(e, method.tokenizer) for e in
                                                             task.load("train", limit=2)], lambda c, **_: [0.0] * len(c),
                            args)
    assert args.beta == 0.04
    method._set_reference(trainer)
    assert ("ref" in method.model.peft_config) == (reference == "task_start")


@pytest.mark.slow
def test_grpo_with_kl_drops_its_reference_adapter_between_tasks(tiny, tmp_path):
    method = GRPO(tiny(0), _cfg(kl=0.04, reference="task_start"), {"num_generations": 2, "prompts_per_step": 2,
                                                                    "max_completion_length": 4})
    task = LetterTask()
    for stage in (1, 2):  # a second task must be able to add a fresh reference adapter again
        stats = method.train_on_task(task, task.load("train", limit=2), stage=stage)
        assert all(torch.isfinite(torch.tensor(stats["losses"])))
        assert list(method.model.peft_config) == ["default"]
    method.save(tmp_path / "ckpt")
    assert not any("ref" in p.name for p in (tmp_path / "ckpt").rglob("*"))


def test_registered_and_built_from_run_config(tiny):
    from harness.config import apply_overrides
    from harness.methods import build_method

    cfg = apply_overrides(RunConfig(), ["model=tiny-random", "method_options.grpo.num_generations=4"])
    method = build_method("grpo", tiny(0), cfg)
    assert isinstance(method, GRPO) and method.opts.num_generations == 4


@pytest.mark.slow
def test_grpo_full_finetuning_checkpoint_round_trips(tiny, tmp_path):
    cfg = _cfg(lora=False, lr=1e-3)
    opts = {"num_generations": 2, "prompts_per_step": 2, "max_completion_length": 4}
    method = GRPO(tiny(0), cfg, opts)
    task = LetterTask()
    before = {n: p.detach().clone() for n, p in method.model.named_parameters()}
    method.train_on_task(task, task.load("train", limit=2), stage=1)
    assert any(not torch.equal(before[n], p.detach()) for n, p in method.model.named_parameters())
    method.save(tmp_path / "ckpt")
    again = GRPO(tiny(0), cfg, opts)
    again.load(tmp_path / "ckpt")
    for (n, p), (_, q) in zip(method.model.named_parameters(), again.model.named_parameters(), strict=True):
        assert torch.equal(p, q), n
