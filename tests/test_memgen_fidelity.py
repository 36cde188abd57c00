"""MemGen trained as the paper trains it: fp32 weaver/trigger parameters under a bf16 model, GRPO log-probs of the
policy that sampled (temperature, dropout), a reasoner that stays frozen and deterministic, checkpoint checks,
the paper's options (aggregation, invocation rate, trigger at the prompt, per-task defaults, ChatML)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from harness import rl
from harness.memgen.grpo import WeaverGRPOSchedule, rollout_logprobs, sample_rollouts, train_weaver_grpo
from harness.memgen.options import MemGenOptions
from harness.memgen.sft import SFTSchedule, train_weaver
from harness.memgen.trigger import TriggerSchedule, train_trigger
from harness.memgen.trigger_lm import TriggerHead, TriggerLM
from harness.memgen.weaver import MemGenModel
from harness.models import load_model
from tests.test_grpo_memgen import LetterTask


def _delims(mm: MemGenModel) -> torch.Tensor:
    return torch.ones(mm.lm_head.weight.shape[0], dtype=torch.bool)  # every token: as many insertions as the cap


def _rows(mm: MemGenModel) -> list[tuple[list[int], list[int]]]:
    tok = mm.tokenizer
    out = []
    for q, a in (("What is 2+3?", "First, 2. Then, 3. So 5."), ("Name a colour.", "Red, or blue.\nRed.")):
        p = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        out.append((tok(p, add_special_tokens=False).input_ids, tok(a, add_special_tokens=False).input_ids))
    return out


def _snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


@pytest.mark.slow
def test_bf16_weaver_sft_moves_every_weaver_tensor_at_paper_lr_and_never_the_reasoner():
    lm = load_model("tiny-random", dtype="bf16", seed=0)
    torch.manual_seed(0)
    mm = MemGenModel(lm, MemGenOptions(k_prompt=2, k_infer=2, max_insertions=2, lora_r=4))
    named = {n: p for n, p in mm.peft.named_parameters() if "lora_" in n} | {
        f"heads.{n}": p for n, p in mm.heads.named_parameters()}
    assert {p.dtype for p in named.values()} == {torch.float32}, "weaver parameters must be fp32 under bf16"
    assert mm.embed.weight.dtype == torch.bfloat16
    before = {n: p.detach().clone() for n, p in named.items()}
    reasoner = {k: v.clone() for k, v in mm.reasoner_state().items()}
    is_delim = torch.zeros(mm.lm_head.weight.shape[0], dtype=torch.bool)
    is_delim[[mm.tokenizer.convert_tokens_to_ids(t) for t in (",", ".")]] = True
    sch = SFTSchedule(steps=3, batch_size=2, lr=1e-5, warmup_ratio=0.0, scheduler="constant", max_grad_norm=1.0,
                      weight_decay=0.0, seed=0)
    train_weaver(mm, _rows(mm), is_delim, 2, sch)
    unchanged = [n for n, p in named.items() if torch.equal(p.detach(), before[n])]
    assert not unchanged, f"weaver tensors that did not move in bf16 at lr 1e-5: {unchanged}"
    # both query sets, LayerNorms, scales and projections are among them (names listed for a readable failure)
    for part in ("prompt.queries", "prompt.norm.weight", "prompt.scale", "infer.queries", "infer.norm.weight",
                 "infer.scale", "proj_in.weight", "proj_out.weight"):
        assert f"heads.{part}" in named
    assert any("lora_A" in n for n in named) and any("lora_B" in n for n in named)
    after = mm.reasoner_state()
    assert all(torch.equal(after[k], v) for k, v in reasoner.items()), "the reasoner changed"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "head"])
def test_bf16_trigger_training_moves_every_trigger_tensor(kind):
    lm = load_model("tiny-random", dtype="bf16", seed=0)
    torch.manual_seed(0)
    opts = MemGenOptions(k_prompt=2, k_infer=2, max_insertions=3, lora_r=4, trigger="trained", trigger_model=kind)
    mm = MemGenModel(lm, opts)
    from harness.memgen.rl_stages import build_trigger

    trig = build_trigger(mm, seed=0)
    params = trig.parameters_to_train() if isinstance(trig, TriggerLM) else list(trig.parameters())
    own = list(trig.parameters())
    assert {p.dtype for p in own} == {torch.float32}
    before = _snapshot(params)
    weaver_before = _snapshot(mm.weaver_parameters())
    reasoner = {k: v.clone() for k, v in mm.reasoner_state().items()}
    task = LetterTask()
    sch = TriggerSchedule(steps=3, prompts_per_step=1, group=4, lr=1e-5, seed=0, max_new_tokens=6, lam=1.0,
                          trigger_prompt=True)
    train_trigger(mm, trig, task, task.load("train", 4), _delims(mm), sch)
    moved = [not torch.equal(p.detach(), b) for p, b in zip(params, before, strict=True)]
    assert all(moved), f"{moved.count(False)} of {len(moved)} trigger tensors did not move in bf16 at lr 1e-5"
    assert all(torch.equal(p.detach(), b) for p, b in zip(mm.weaver_parameters(), weaver_before, strict=True))
    after = mm.reasoner_state()
    assert all(torch.equal(after[k], v) for k, v in reasoner.items())
    assert isinstance(trig, TriggerLM | TriggerHead)


@pytest.mark.slow
def test_grpo_recomputed_logprobs_equal_the_sampling_policy_at_temperature(tiny):
    lm = tiny(0)
    torch.manual_seed(0)
    mm = MemGenModel(lm, MemGenOptions(k_prompt=2, k_infer=2, max_insertions=3, lora_r=4, lora_dropout=0.3))
    with torch.no_grad():  # a non-trivial weaver, so the latents matter
        for n, p in mm.peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    tok = mm.tokenizer
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True), add_special_tokens=False).input_ids
               for q in ("Hi", "A longer question here?")]
    ro = sample_rollouts(mm, prompts, 2, 10, _delims(mm), temperature=0.7,
                         generator=torch.Generator().manual_seed(0), keep_logprobs=True)
    assert any(len(p) > 1 for p in ro.points), "no in-decoding insertion happened"
    mm.eval()  # the GRPO step recomputes with LoRA dropout off, as the rollout sampled
    with torch.no_grad():
        logp, mask = rollout_logprobs(mm, ro, temperature=0.7)  # (B, T)
    for b, rec in enumerate(ro.logprobs):
        got = logp[b, : len(rec)]
        assert mask[b, : len(rec)].all()
        torch.testing.assert_close(got, torch.tensor(rec), atol=1e-5, rtol=0)
    with torch.no_grad():  # the temperature matters: T = 1 gives other numbers
        wrong, _ = rollout_logprobs(mm, ro, temperature=1.0)
    assert not torch.allclose(wrong[mask.bool()], logp[mask.bool()], atol=1e-3)


def _dropout_model():
    lm = load_model("tiny-random", seed=0)
    for layer in lm.model.model.layers:  # a reasoner with real dropout: train mode would make it random
        layer.self_attn.attention_dropout = 0.5
    return lm


@pytest.mark.slow
def test_reasoner_with_dropout_stays_deterministic_during_weaver_sft_and_grpo():
    lm = _dropout_model()
    torch.manual_seed(0)
    mm = MemGenModel(lm, MemGenOptions(k_prompt=2, k_infer=2, max_insertions=2, lora_r=4))
    ids = torch.tensor([_rows(mm)[0][0]])
    seen_training: list[str] = []
    for name, mod in mm.reasoner_lm.named_modules():
        if name.endswith("self_attn"):
            mod.register_forward_pre_hook(lambda m, a, n=name: seen_training.append(n) if m.training else None)
    checks: list[bool] = []

    def probe(step, total, loss, **_):  # the reasoner's output twice on the same input, mid-training
        with torch.no_grad(), mm.reasoner_mode():
            a = mm.reasoner(input_ids=ids).last_hidden_state
            b = mm.reasoner(input_ids=ids).last_hidden_state
        checks.append(torch.equal(a, b))

    sch = SFTSchedule(steps=2, batch_size=2, lr=1e-3, warmup_ratio=0.0, scheduler="constant", max_grad_norm=1.0,
                      weight_decay=0.0, seed=0)
    train_weaver(mm, _rows(mm), _delims(mm), 2, sch, on_step=probe)
    task = LetterTask()
    gsch = WeaverGRPOSchedule(steps=2, prompts_per_step=1, group=2, lr=1e-3, warmup_ratio=0.0, scheduler="constant",
                              max_grad_norm=1.0, weight_decay=0.0, seed=0, max_new_tokens=5)
    train_weaver_grpo(mm, task, task.load("train", 2), _delims(mm), gsch, on_step=probe)
    assert checks and all(checks), "the frozen reasoner was not deterministic during weaver training"
    assert not seen_training, f"reasoner modules ran in train mode: {sorted(set(seen_training))[:3]}"


def test_adapter_switches_never_touch_requires_grad(tiny):
    mm = MemGenModel(tiny(0), MemGenOptions(k_prompt=2, k_infer=2, lora_r=4))
    for _ in range(2):
        with mm.reasoner_mode():
            pass
        with mm.weaver_mode():
            pass
    assert all(p.requires_grad for p in mm.weaver_parameters())
    mm.check_trainable("test")
    next(p for n, p in mm.peft.named_parameters() if "lora_A" in n).requires_grad_(False)
    with pytest.raises(RuntimeError, match="requires_grad"):
        mm.check_trainable("test")


@pytest.mark.slow
@pytest.mark.parametrize(("key", "value"), [("lora_alpha", 8), ("trigger_model", "head")])
def test_checkpoint_load_checks_lora_alpha_and_trigger_kind(tiny, tmp_path, key, value):
    from harness.config import RunConfig
    from harness.memgen.method import MemGen

    base = {"k_prompt": 2, "k_infer": 2, "lora_r": 4, "trigger": "trained"}
    m = MemGen(tiny(0), RunConfig(model="tiny-random"), base)
    m.trained = m.trigger_trained = True
    m.save(tmp_path)
    other = MemGen(tiny(0), RunConfig(model="tiny-random"), {**base, key: value})
    with pytest.raises(ValueError, match=key):
        other.load(tmp_path)


def test_sparsity_rate_over_every_delimiter_hand_computed():
    # one group of 2 rollouts: rewards 1 and 0; decisions at the queried delimiters [1, 1] and [1, 0]
    rewards = torch.tensor([1.0, 0.0])
    dec = torch.tensor([[1, 1], [1, 0]])
    mask = torch.ones(2, 2, dtype=torch.long)
    # queried rate: the high-reward set is rollout 0 (reward >= median 0.5), p_bar = 2/2 = 1 -> no penalty
    torch.testing.assert_close(rl.sparsity_shaped_rewards(rewards, dec, mask, 2, lam=0.5), rewards)
    # the paper's rate: rollout 0 generated 4 delimiters (2 past the cap), p_bar = 2/4 = 0.5;
    # penalty_0 = (1-0.5) + (1-0.5) = 1, penalty_1 = (1-0.5) + 0 = 0.5
    shaped = rl.sparsity_shaped_rewards(rewards, dec, mask, 2, lam=0.5, totals=torch.tensor([4, 3]))
    torch.testing.assert_close(shaped, torch.tensor([1.0 - 0.5 * 1.0, 0.0 - 0.5 * 0.5]))


@pytest.mark.slow
def test_generation_counts_delimiters_and_the_trigger_may_skip_the_prompt_insertion(tiny):
    from harness.memgen.generation import memgen_generate

    mm = MemGenModel(tiny(0), MemGenOptions(k_prompt=2, k_infer=2, max_insertions=1, lora_r=4))
    tok = mm.tokenizer
    ids = torch.tensor([tok("Hello there", add_special_tokens=False).input_ids])
    mask = torch.ones_like(ids)
    everything = _delims(mm)
    plain = memgen_generate(mm, ids, mask, 6, insert=False, delimiters=everything, eos_token_ids=[-1])
    assert plain.delimiters == [5]  # every fed token is a delimiter; the cap does not limit the count
    never = memgen_generate(mm, ids, mask, 6, insert=True, delimiters=everything, eos_token_ids=[-1],
                            trigger=lambda ctx: torch.zeros_like(ctx.candidates), trigger_prompt=True)
    assert never.insertions == [[]]
    assert torch.equal(never.sequences, plain.sequences)  # no latent anywhere = the frozen reasoner
    always = memgen_generate(mm, ids, mask, 6, insert=True, delimiters=everything, eos_token_ids=[-1],
                             trigger_prompt=True)
    default = memgen_generate(mm, ids, mask, 6, insert=True, delimiters=everything, eos_token_ids=[-1])
    assert always.insertions == default.insertions == [[0, 1]]
    assert torch.equal(always.sequences, default.sequences)


def test_task_definition_sets_memgen_defaults_and_explicit_options_win(data_dir):
    from tasks.registry import get_task

    task = get_task("gsm8k_paper", data_dir)
    base = MemGenOptions()
    assert base.for_task(task.definition.method_defaults["memgen"], set()).max_insertions == 3
    assert base.for_task(task.definition.method_defaults["memgen"], {"max_insertions"}).max_insertions == 5
    with pytest.raises(ValueError, match="k_prompt cannot be set per task"):
        base.for_task({"k_prompt": 4}, set())


def test_gsm8k_paper_keeps_annotations_and_scores_the_first_box(data_dir):
    from tasks.registry import get_task

    task = get_task("gsm8k_paper", data_dir)
    ex = task.load("train", limit=1)[0]
    assert "<<" in ex.target and ex.target.endswith(f"\\boxed{{{ex.answer}}}.")
    assert task.score(f"So \\boxed{{{ex.answer}}}, not \\boxed{{0}}", ex) == 1.0
    assert task.score(f"\\boxed{{0}} then \\boxed{{{ex.answer}}}", ex) == 0.0
    assert task.score(f"The answer is {ex.answer}", ex) == 0.0  # no box: the public code scores 0
    assert get_task("gsm8k", data_dir).score(f"The answer is {ex.answer}", ex) == 1.0  # the lenient variant


def test_chatml_choice_replaces_the_native_template():
    from harness.models import chat_template_record
    from tasks.base import render_prompt

    native = load_model("tiny-random", seed=0)
    chatml = load_model("tiny-random", seed=0, chat_template="chatml")
    a, b = render_prompt("Hi", native.tokenizer), render_prompt("Hi", chatml.tokenizer)
    assert "system" in a and "system" not in b  # SmolLM2's own template injects a system turn
    assert b == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    rec_a = chat_template_record(native.tokenizer, "native")
    rec_b = chat_template_record(chatml.tokenizer, "chatml")
    assert rec_b["version"] == "chatml-v1" and rec_a["sha256"] != rec_b["sha256"]


def test_options_reject_bad_aggregation_and_fraction():
    for bad in ({"grpo_aggregation": "bnpo2"}, {"trigger_rate": "x"}, {"trigger_train_fraction": 0.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            dataclasses.replace(MemGenOptions(), **bad).check()


@pytest.mark.slow
def test_stage_records_its_budget_over_every_phase(tiny):
    from harness.config import RunConfig, from_dict
    from harness.memgen.method import MemGen
    from tasks.registry import get_task

    cfg = from_dict(RunConfig, {"model": "tiny-random", "train": {"max_steps": 2, "batch_size": 2},
                                "eval": {"max_new_tokens": 6}})
    m = MemGen(tiny(0), cfg, {"k_prompt": 2, "k_infer": 2, "lora_r": 4, "weaver_train": "sft+grpo",
                              "grpo_steps": 1, "grpo_group": 2, "trigger": "trained", "trigger_steps": 1,
                              "trigger_group": 2})
    task = get_task("arith")
    stats = m.train_on_task(task, task.load("train", limit=4), 1)
    assert stats["optimizer_steps"] == 2 + 1 + 1  # weaver SFT, weaver GRPO, trigger
    assert 2 <= stats["examples_seen"] <= 4
    assert stats["generated_tokens"] >= 2 * 2  # two phases decoded 2 rollouts of >= 1 token each
    assert stats["train_tokens"] > stats["generated_tokens"]  # SFT rows and GRPO prompts are counted too
    weaver = sum(p.numel() for p in m.mm.weaver_parameters())
    assert stats["trainable_params"] == weaver + sum(p.numel() for p in m.trigger.parameters_to_train())
