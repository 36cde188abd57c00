"""MemGen weaver GRPO (harness/memgen/grpo.py) on the tiny model: re-woven log-probs land where they belong,
only the weaver learns, losses are finite."""

from __future__ import annotations

import pytest
import torch
from stand_in_tasks import LetterTask

from harness.memgen.grpo import (
    WeaverGRPOSchedule,
    sample_rollouts,
    token_grid,
    train_weaver_grpo,
    weaver_policy_loss,
)
from harness.memgen.options import MemGenOptions
from harness.memgen.sft import build_woven_batch, woven_forward, woven_logprobs
from harness.memgen.weaver import MemGenModel
from tasks.base import render_prompt


def _mm(tiny) -> MemGenModel:
    lm = tiny(0)
    torch.manual_seed(0)
    return MemGenModel(lm, MemGenOptions(k_prompt=2, k_infer=2, max_insertions=3, lora_r=4))


def _delims(mm: MemGenModel) -> torch.Tensor:
    # every token is a delimiter, so the random tiny model inserts as often as the cap allows
    return torch.ones(mm.lm_head.weight.shape[0], dtype=torch.bool)


@pytest.mark.slow
def test_token_grid_matches_row_by_row_logprobs(tiny):
    mm = _mm(tiny)
    tok = mm.tokenizer
    prompts = [tok(render_prompt(q, tok), add_special_tokens=False).input_ids for q in ("Hi", "A longer question?")]
    ro = sample_rollouts(mm, prompts, 2, 6, _delims(mm), generator=torch.Generator().manual_seed(0))
    assert any(len(p) > 1 for p in ro.points), "no inference insertion happened"
    k_p, k_i, pad = mm.opts.k_prompt, mm.opts.k_infer, tok.pad_token_id
    with torch.no_grad():
        batch = build_woven_batch(ro.prompts, ro.completions, ro.points, k_p, k_i, pad)
        width = max(len(c) for c in ro.completions)
        grid, mask = token_grid(batch, ro.points, woven_logprobs(mm, batch), width)
        for b in range(len(ro.prompts)):
            alone = build_woven_batch([ro.prompts[b]], [ro.completions[b]], [ro.points[b]], k_p, k_i, pad)
            single = woven_logprobs(mm, alone)  # row b on its own: its tokens in completion order
            n = len(ro.completions[b])
            assert mask[b].tolist() == [1] * n + [0] * (width - n)
            torch.testing.assert_close(grid[b, :n], single, atol=1e-5, rtol=1e-4)


def test_policy_loss_gradient_reaches_only_the_weaver(tiny):
    mm = _mm(tiny)
    tok = mm.tokenizer
    prompts = [tok(render_prompt("Hi", tok), add_special_tokens=False).input_ids]
    ro = sample_rollouts(mm, prompts, 4, 5, _delims(mm), generator=torch.Generator().manual_seed(1))
    loss, _ = weaver_policy_loss(mm, ro, torch.tensor([1.0, -1.0, 0.5, -0.5]))
    loss.backward()
    weaver = {id(p) for p in mm.weaver_parameters()}
    grads = [(n, p.grad) for n, p in mm.named_parameters() if p.grad is not None]
    assert grads and all(id(dict(mm.named_parameters())[n]) in weaver for n, _ in grads)
    assert any(g.abs().sum() > 0 for _, g in grads)


@pytest.mark.slow
def test_weaver_grpo_trains_weaver_only(tiny):
    mm = _mm(tiny)
    reasoner_before = {k: v.clone() for k, v in mm.reasoner_state().items()}
    weaver_before = [p.detach().clone() for p in mm.weaver_parameters()]
    sch = WeaverGRPOSchedule(steps=2, prompts_per_step=2, group=4, lr=1e-2, warmup_ratio=0.0, scheduler="constant",
                             max_grad_norm=1.0, weight_decay=0.0, seed=0, max_new_tokens=6)
    task = LetterTask()
    stats = train_weaver_grpo(mm, task, task.load("train", limit=4), _delims(mm), sch)
    assert len(stats["losses"]) == 2 and all(torch.isfinite(torch.tensor(stats["losses"])))
    assert stats["insertions"][0] > 0
    after = mm.reasoner_state()
    assert all(torch.equal(reasoner_before[k], after[k]) for k in reasoner_before)
    moved = sum(not torch.equal(a, b.detach()) for a, b in zip(weaver_before, mm.weaver_parameters(), strict=True))
    assert moved > 0


def test_rewoven_context_reproduces_the_rollout(tiny):
    """Greedy rollouts re-woven at their recorded points: every generated token is the argmax of the recomputed
    distribution, i.e. the log-probs are taken in the same context (latents included) the rollout decoded in."""
    mm = _mm(tiny)
    tok = mm.tokenizer
    prompts = [tok(render_prompt(q, tok), add_special_tokens=False).input_ids for q in ("Hi", "Say more, please.")]
    ro = sample_rollouts(mm, prompts, 1, 8, _delims(mm), temperature=0.0)
    assert all(len(p) > 1 for p in ro.points)
    with torch.no_grad():
        batch = build_woven_batch(ro.prompts, ro.completions, ro.points, mm.opts.k_prompt, mm.opts.k_infer,
                                  tok.pad_token_id)
        h, y = woven_forward(mm, batch)
        logp = torch.log_softmax(mm.lm_head(h).float(), -1)  # (N, V)
    torch.testing.assert_close(logp.gather(1, y[:, None]).squeeze(1), logp.max(-1).values, atol=1e-4, rtol=0)


def test_a_groups_shared_prompt_is_computed_once_with_the_same_result(tiny, monkeypatch):
    """Rows with the same prompt share its prefill and prompt latents, and distinct prompts their common head
    (``WovenState.feed_prompt``): the rollout, the recomputed log-probs and the weaver's gradients equal those of
    feeding every row on its own."""
    import harness.memgen.weaver as weaver

    mm = _mm(tiny)
    tok = mm.tokenizer
    prompts = [tok(render_prompt(q, tok), add_special_tokens=False).input_ids for q in ("Hi", "A longer question?")]
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.25, -0.25])

    def run():
        ro = sample_rollouts(mm, prompts, 3, 6, _delims(mm), generator=torch.Generator().manual_seed(3),
                             keep_logprobs=True)
        mm.zero_grad(set_to_none=True)
        loss, _ = weaver_policy_loss(mm, ro, adv)
        loss.backward()
        return ro, loss.detach(), {n: p.grad.clone() for n, p in mm.named_parameters() if p.grad is not None}

    calls, heads = [], []
    real, real_prefix = weaver._distinct_rows, weaver._common_prefix
    monkeypatch.setattr(weaver, "_distinct_rows", lambda rows: calls.append(len(rows)) or real(rows))
    monkeypatch.setattr(weaver, "_common_prefix", lambda ids, mask: heads.append(real_prefix(ids, mask)) or heads[-1])
    shared, loss_s, grads_s = run()
    assert calls and all(n == 6 for n in calls)  # rollout and recompute both found the 2 distinct prompts
    assert heads and all(n >= weaver.MIN_SHARED_PREFIX for n in heads)  # and fed the system turn once
    monkeypatch.setattr(weaver, "_distinct_rows", lambda rows: (None, torch.arange(len(rows))))  # every row fed
    monkeypatch.setattr(weaver, "_common_prefix", lambda ids, mask: 0)
    alone, loss_a, grads_a = run()
    assert shared.completions == alone.completions and shared.points == alone.points
    assert any(len(p) > 1 for p in shared.points), "no inference insertion happened"
    for a, b in zip(shared.logprobs, alone.logprobs, strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss_s, loss_a, atol=1e-6, rtol=1e-5)
    assert grads_s.keys() == grads_a.keys() and any("lora" in n for n in grads_s)
    for n in grads_s:
        torch.testing.assert_close(grads_s[n], grads_a[n], atol=1e-6, rtol=1e-4, msg=n)
