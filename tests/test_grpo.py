"""GRPO baseline (TRL GRPOTrainer) on the tiny model: TRL's advantages equal ours, LoRA-only updates, checkpoints."""

from __future__ import annotations

import pytest
import torch

from baselines.grpo import GRPO, build_trainer, grpo_config, parse_options
from harness import rl
from harness.config import ConfigError, RunConfig, TrainConfig
from tasks.base import Example, render_prompt


class LetterTask:
    """A real task whose score varies on random text: the fraction of ASCII letters in the completion.

    The tiny random model almost never scores on the benchmark tasks, which would give GRPO zero advantages and
    nothing to test; this scorer gives every group a spread of rewards."""

    name, version, domain, max_new_tokens = "letters", "1", "test", 8

    def load(self, split: str, limit: int | None = None, seed: int = 0) -> list[Example]:
        return [Example(id=f"l{i}", question=f"Write some letters ({i}).", answer="", target="abc")
                for i in range(limit or 8)]

    def prompt(self, example: Example, tokenizer=None) -> str:
        return render_prompt(example.question, tokenizer)

    def extract(self, completion: str) -> str | None:
        return completion

    def score(self, completion: str, example: Example) -> float:
        return sum(c.isascii() and c.isalpha() for c in completion) / max(len(completion), 1)


def _cfg(**train) -> RunConfig:
    train = {"max_steps": 1, "lr": 1e-2, "warmup_ratio": 0.0, **train}
    return RunConfig(model="tiny-random", train=TrainConfig(**train))


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
    assert parse_options({}).num_generations == 8 and parse_options({}).beta == 0.0


@pytest.mark.slow
def test_grpo_with_kl_drops_its_reference_adapter_between_tasks(tiny, tmp_path):
    method = GRPO(tiny(0), _cfg(), {"num_generations": 2, "prompts_per_step": 2, "max_completion_length": 4,
                                    "beta": 0.04})
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
