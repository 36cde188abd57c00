"""REINFORCE++ baseline on the tiny model: exact log-probs, masks, parameter updates, reference, checkpoints."""

from __future__ import annotations

import random

import pytest
import torch
from stand_in_tasks import LetterTask

from baselines.reinforce_pp import ReinforcePP, completion_mask, parse_options, prompt_batches, token_logps
from harness.config import ConfigError, RLConfig, RunConfig, TrainConfig
from harness.runner import run_method
from harness.store import read_json
from tasks.base import Example, render_prompt


class ConstTask(LetterTask):
    """Every completion scores 1: every batch's rewards tie."""

    def score(self, completion: str, example: Example) -> float:
        return 1.0


def _cfg(lora: bool = True, steps: int = 2, kl: float = 0.0, reference: str = "init") -> RunConfig:
    # train.lora_dropout stays at its 0.05 default: the RL baselines must ignore it (PPO ratio 1)
    return RunConfig(model="tiny-random", train=TrainConfig(max_steps=steps, lr=1e-2, lora=lora, warmup_ratio=0.0),
                     rl=RLConfig(kl_coef=kl, reference=reference))


def test_completion_mask_stops_after_first_stop_token():
    ids = torch.tensor([[5, 2, 2, 2], [5, 6, 7, 8], [2, 0, 0, 0], [5, 9, 2, 2]])
    assert completion_mask(ids, [2, 9]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]]


def test_prompt_batches_cover_each_pass():
    gen = prompt_batches(5, 2, random.Random(0))
    seen = [i for _ in range(5) for i in next(gen)]  # 10 indices = two full passes
    assert sorted(seen) == sorted(list(range(5)) * 2)


def test_token_logps_match_the_sampler_with_left_padding(tiny):
    lm = tiny(0)
    tok = lm.tokenizer
    tok.padding_side = "left"
    prompts = [render_prompt("A much longer question with many more tokens in it, to force padding?", tok),
               render_prompt("Hi", tok)]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert enc["attention_mask"][1].sum() < enc["attention_mask"][0].sum()
    torch.manual_seed(0)
    out = lm.model.generate(**enc, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=6, eos_token_id=[],
                            output_logits=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    new = out.sequences[:, enc["input_ids"].shape[1]:]  # (B, C)
    sampler = torch.stack(out.logits, 1).float().log_softmax(-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
    mask = torch.cat([enc["attention_mask"], torch.ones_like(new)], 1)
    with torch.no_grad():
        ours = token_logps(lm.model, out.sequences, mask, new.shape[1])
    torch.testing.assert_close(ours, sampler, atol=1e-5, rtol=1e-5)


def test_chunked_token_logps_equal_the_full_logits_values_and_gradients(tiny):
    """The chunked head (no (B, C, V) fp32 tensor) gives the full-logits values and LoRA gradients to 1e-5."""
    method = ReinforcePP(tiny(0), _cfg(), {})
    policy = method.model
    with torch.no_grad():  # a non-zero adapter, so the gradients reach both LoRA matrices
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, policy.config.vocab_size, (3, 11), generator=g)  # (B, P + C)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding on one row
    values, grads = {}, {}
    for chunked in (False, True):
        policy.zero_grad(set_to_none=True)
        logp = token_logps(policy, ids, mask, 5, temperature=0.7, chunked=chunked)  # (B, C)
        assert logp.shape == (3, 5)
        (logp * torch.arange(1.0, 6.0)).sum().backward()
        values[chunked] = logp.detach()
        grads[chunked] = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    torch.testing.assert_close(values[True], values[False], atol=1e-5, rtol=1e-5)
    assert grads[True].keys() == grads[False].keys() and any("lora_A" in n for n in grads[True])
    for n in grads[True]:
        torch.testing.assert_close(grads[True][n], grads[False][n], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_lora_training_moves_only_the_adapter_and_round_trips(tiny, tmp_path):
    opts = {"samples_per_prompt": 4, "prompts_per_step": 2, "max_completion_length": 8}
    method = ReinforcePP(tiny(0), _cfg(kl=0.1), opts)
    task = LetterTask()
    before = {n: p.detach().clone() for n, p in method.model.named_parameters()}
    stats = method.train_on_task(task, task.load("train", limit=4), stage=1)
    assert len(stats["losses"]) == 2 and all(torch.isfinite(torch.tensor(stats["losses"])))
    assert stats["kl"][0] == 0.0  # the adapter starts at zero (LoRA B = 0): policy == reference
    assert stats["kl"][1] != 0.0  # after one step the policy has moved away from the base model
    # same dropout state (none) for old and new log-probs: the PPO ratio is 1 at one epoch, nothing is clipped
    assert max(stats["ratio_dev"]) < 1e-5 and stats["clip_frac"] == [0.0, 0.0]
    # the budget of the stage: 2 steps x 2 prompts over 4 examples, 8 rollouts per step
    assert stats["prompts_per_step"] == 2 and stats["examples_seen"] == 4 and stats["optimizer_steps"] == 2
    assert stats["generated_tokens"] == round(sum(stats["lengths"]) * 8)
    assert stats["train_tokens"] > stats["generated_tokens"] > 0  # prompts + completions vs completions
    assert stats["trainable_params"] == sum(p.numel() for n, p in method.model.named_parameters() if "lora_" in n)
    changed = {n for n, p in method.model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and all("lora_" in n for n in changed), sorted(changed)[:3]
    method.save(tmp_path / "ckpt")
    again = ReinforcePP(tiny(0), _cfg(kl=0.1), opts)
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


@pytest.mark.slow
def test_full_finetuning_keeps_a_frozen_reference(tiny):
    opts = {"samples_per_prompt": 4, "max_completion_length": 6, "variant": "baseline", "ppo_epochs": 2}
    method = ReinforcePP(tiny(0), _cfg(lora=False, steps=1, kl=0.01), opts)
    ref_before = {n: p.detach().clone() for n, p in method.ref_model.named_parameters()}
    before = {n: p.detach().clone() for n, p in method.model.named_parameters()}
    method.train_on_task(LetterTask(), LetterTask().load("train", limit=2), stage=1)
    assert all(torch.equal(ref_before[n], p) for n, p in method.ref_model.named_parameters())
    moved = [n for n, p in method.model.named_parameters() if not torch.equal(before[n], p.detach())]
    assert "model.layers.0.self_attn.q_proj.weight" in moved


@pytest.mark.slow
def test_runner_resumes_reinforce_pp_exactly(tmp_path):
    """The method runs in a sequence under the runner, records its reward curve and resumes from a checkpoint."""
    from harness.config import apply_overrides

    cfg = apply_overrides(RunConfig(), [
        "model=tiny-random", "sequence=choice,arith", "limit=2", "train.max_steps=1", "eval.max_new_tokens=4",
        "method_options.reinforce_pp.samples_per_prompt=2", "method_options.reinforce_pp.max_completion_length=4"])
    run_dir = tmp_path / "reinforce_pp"
    first = run_method("reinforce_pp", cfg, run_dir)
    assert first["complete"]
    assert read_json(run_dir / "train" / "stage1.json")["rewards"]
    import shutil

    shutil.rmtree(run_dir / "checkpoints" / "stage2")
    for p in (run_dir / "cells").glob("r2_*.json"):
        p.unlink()
    resumed = run_method("reinforce_pp", cfg, run_dir)
    assert resumed["matrix"] == first["matrix"]


def test_options_are_checked():
    with pytest.raises(ConfigError, match="method_options.reinforce_pp.variant"):
        parse_options({"variant": "grpo"})
    with pytest.raises(ConfigError, match="method_options.reinforce_pp.group"):
        parse_options({"group": 8})
    with pytest.raises(ConfigError, match="samples_per_prompt >= 2"):
        parse_options({"variant": "baseline", "samples_per_prompt": 1})
    with pytest.raises(ConfigError, match="rl.kl_coef"):
        parse_options({"kl_coef": 0.01})
    with pytest.raises(ConfigError, match="does not divide train.batch_size"):
        parse_options({"samples_per_prompt": 3})
    # OpenRLHF's REINFORCE++: 1 sample x train.batch_size prompts, the same 8 generations per step as GRPO's 1 x 8
    o = parse_options({})
    assert (o.samples_per_prompt, o.prompts_per_step, o.use_kl_loss, o.kl_estimator) == (1, 8, False, "k1")
    assert parse_options({}, batch_size=16).prompts_per_step == 16 and o.gamma == 1.0
    # REINFORCE++-baseline: several prompts x a group, with OpenRLHF's k2 KL loss
    b = parse_options({"variant": "baseline"})
    assert (b.samples_per_prompt, b.prompts_per_step, b.use_kl_loss, b.kl_estimator) == (4, 2, True, "k2")
    assert parse_options({"variant": "baseline", "use_kl_loss": False}).kl_estimator == "k1"


@pytest.mark.slow
def test_tied_rewards_are_centred_not_whitened(tiny):
    """Every rollout scores 1 and the KL is non-zero: no unit-scale advantages, so the step is tiny."""
    method = ReinforcePP(tiny(0), _cfg(steps=2, kl=0.05), {"max_completion_length": 6, "prompts_per_step": 4})
    first = method.train_on_task(LetterTask(), LetterTask().load("train", limit=4), stage=1)  # moves the policy
    assert first["whitened"] == [1.0, 1.0] and max(first["adv_max"]) > 1.0  # rewards spread: unit-scale
    stats = method.train_on_task(ConstTask(), ConstTask().load("train", limit=4), stage=2)
    assert stats["rewards"] == [1.0, 1.0] and stats["whitened"] == [0.0, 0.0]
    assert all(k != 0.0 for k in stats["kl"])  # the KL is really there, and acts only at its own scale:
    assert 0.0 < max(stats["adv_max"]) < 0.5  # kl_coef * (sums of k1), not rescaled to unit size


@pytest.mark.slow
def test_baseline_variant_has_the_k2_kl_loss(tiny):
    """REINFORCE++-baseline: no KL in the reward (tied rewards give advantages of exactly 0), so once the policy has
    moved (a first task) the loss is kl_coef * the token-mean k2 KL alone (OpenRLHF's --use_kl_loss)."""
    opts = {"variant": "baseline", "samples_per_prompt": 2, "prompts_per_step": 2, "max_completion_length": 6}
    method = ReinforcePP(tiny(0), _cfg(steps=2, kl=0.5), opts)
    first = method.train_on_task(LetterTask(), LetterTask().load("train", limit=4), stage=1)
    assert first["use_kl_loss"] and first["kl"][0] == 0.0  # policy == reference before the first update
    stats = method.train_on_task(ConstTask(), ConstTask().load("train", limit=4), stage=2)
    assert stats["adv_max"] == [0.0, 0.0] and stats["kl"][0] > 0.0  # the k2 estimate is >= 0
    assert stats["losses"][0] == pytest.approx(0.5 * stats["kl"][0], rel=1e-5)


@pytest.mark.slow
def test_reference_task_start_resets_the_kl_at_each_task(tiny):
    """After a first task, rl.reference=task_start measures the KL from where the task began (0 at its first step);
    rl.reference=init from the base model (non-zero)."""
    kls = {}
    for ref in ("init", "task_start"):
        method = ReinforcePP(tiny(0), _cfg(steps=2, kl=0.1, reference=ref), {"max_completion_length": 6,
                                                                          "prompts_per_step": 4})
        method.train_on_task(LetterTask(), LetterTask().load("train", limit=4), stage=1)
        kls[ref] = method.train_on_task(LetterTask(), LetterTask().load("train", limit=4), stage=2)["kl"][0]
        assert method.ref_snapshot is None  # the snapshot lives for one task only
    assert kls["task_start"] == pytest.approx(0.0, abs=1e-6) and abs(kls["init"]) > 1e-6


def _attention_log(model) -> list[tuple[bool, str]]:
    """Records (grad enabled, attention implementation) of every forward of ``model``'s base."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    seen: list[tuple[bool, str]] = []
    base.register_forward_pre_hook(lambda m, a: seen.append((torch.is_grad_enabled(), m.config._attn_implementation)))
    return seen


def test_bf16_cpu_log_prob_forwards_run_eager_attention_and_sampling_sdpa():
    """REINFORCE++ and TRL GRPO train as SFT and MemGen do in bf16 on CPU: their log-prob forwards (the old ones and
    the gradient ones, so the ratio starts at 1) under eager attention, sampling under sdpa."""
    from baselines.grpo import GRPO
    from harness.models import load_model

    task = LetterTask()
    rpp = ReinforcePP(load_model("tiny-random", "bf16"), _cfg(steps=1),
                      {"samples_per_prompt": 2, "prompts_per_step": 2, "max_completion_length": 6})
    seen = _attention_log(rpp.model)
    rpp.train_on_task(task, task.load("train", limit=4), stage=1)
    grad = {impl for g, impl in seen if g}
    assert grad == {"eager"}, seen
    assert ("sdpa" in {impl for g, impl in seen if not g}) and ("eager" in {impl for g, impl in seen if not g})
    assert rpp.model.get_base_model().config._attn_implementation == "sdpa"  # restored
    grpo = GRPO(load_model("tiny-random", "bf16"), _cfg(steps=1),
                {"num_generations": 2, "prompts_per_step": 2, "max_completion_length": 6})
    seen = _attention_log(grpo.model)
    grpo.train_on_task(task, task.load("train", limit=4), stage=1)
    assert {impl for g, impl in seen if g} == {"eager"}, seen
    assert grpo.model.get_base_model().config._attn_implementation == "sdpa"
