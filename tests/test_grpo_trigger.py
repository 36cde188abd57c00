"""The MemGen memory trigger (harness/memgen/trigger.py): decision records, head-only training, sparsity penalty."""

from __future__ import annotations

import pytest
import torch

from harness.memgen.generation import TriggerContext
from harness.memgen.options import MemGenOptions
from harness.memgen.trigger import (
    TriggerHead,
    TriggerRecorder,
    TriggerSchedule,
    evaluate_trigger,
    load_head,
    save_head,
    train_trigger,
)
from harness.memgen.weaver import MemGenModel
from tasks.base import Example, render_prompt


class ConstantTask:
    """A real task that scores every completion 1: only the sparsity penalty can tell rollouts apart."""

    name, version, domain, max_new_tokens = "constant", "1", "test", 8

    def load(self, split: str, limit: int | None = None, seed: int = 0) -> list[Example]:
        return [Example(id=f"c{i}", question=f"Say anything ({i}).", answer="", target="ok") for i in range(limit or 4)]

    def prompt(self, example: Example, tokenizer=None) -> str:
        return render_prompt(example.question, tokenizer)

    def extract(self, completion: str) -> str | None:
        return completion

    def score(self, completion: str, example: Example) -> float:
        return 1.0


def _ctx(cands: list[bool], hidden: torch.Tensor) -> TriggerContext:
    c = torch.tensor(cands)
    return TriggerContext(step=1, tokens=torch.zeros(len(cands), 1, dtype=torch.long), candidates=c, hidden=hidden,
                          insertions=torch.zeros(len(cands), dtype=torch.long))


def test_head_starts_at_one_half_and_recorder_lays_out_decisions():
    head = TriggerHead(4)
    h1, h2 = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.softmax(head(h1), -1)[:, 1].tolist() == pytest.approx([0.5] * 3)
    rec = TriggerRecorder(head, policy="always")
    assert rec(_ctx([True, False, True], h1)).tolist() == [True, False, True]
    assert rec(_ctx([True, True, False], h2)).tolist() == [True, True, False]
    states, dec, mask = rec.grid(3, 4)
    assert mask.tolist() == [[1, 1], [1, 0], [1, 0]] and dec.tolist() == mask.tolist()
    torch.testing.assert_close(states[0], torch.stack([h1[0], h2[0]]))
    torch.testing.assert_close(states[1, 0], h2[1])
    torch.testing.assert_close(states[2, 0], h1[2])


def _mm(tiny) -> MemGenModel:
    torch.manual_seed(0)
    return MemGenModel(tiny(0), MemGenOptions(k_prompt=2, k_infer=2, max_insertions=4, lora_r=4))


@pytest.mark.slow
def test_sparsity_penalty_teaches_the_trigger_to_insert_less(tiny, tmp_path):
    """With a constant task reward, only the penalty separates rollouts: inserting more than the group's rate is
    punished, so p(insert) falls. Reasoner and weaver stay untouched; only the head learns."""
    mm = _mm(tiny)
    head = TriggerHead(mm.lm_head.weight.shape[1])
    reasoner = {k: v.clone() for k, v in mm.reasoner_state().items()}
    weaver = [p.detach().clone() for p in mm.weaver_parameters()]
    is_delim = torch.ones(mm.lm_head.weight.shape[0], dtype=torch.bool)
    task = ConstantTask()
    sch = TriggerSchedule(steps=8, prompts_per_step=1, group=8, lr=0.05, max_new_tokens=8, lam=1.0)
    stats = train_trigger(mm, head, task, task.load("train"), is_delim, sch)
    assert all(torch.isfinite(torch.tensor(stats["losses"])))
    assert stats["insert_rate"][-1] < stats["insert_rate"][0] - 0.2, stats["insert_rate"]
    after = mm.reasoner_state()
    assert all(torch.equal(reasoner[k], after[k]) for k in reasoner)
    assert all(torch.equal(a, b.detach()) for a, b in zip(weaver, mm.weaver_parameters(), strict=True))
    ev = evaluate_trigger(mm, head, task, task.load("test", limit=4), is_delim, 8)
    assert ev["insert_rate_always"] == 1.0 and ev["insert_rate_trigger"] < 0.5
    assert ev["accuracy_always"] == 100.0
    save_head(head, tmp_path / "ckpt")
    again = load_head(tmp_path / "ckpt")
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), again.state_dict().values(), strict=True))
    assert evaluate_trigger(mm, again, task, task.load("test", limit=4), is_delim, 8) == ev


def test_without_penalty_a_constant_reward_gives_no_gradient(tiny):
    mm = _mm(tiny)
    head = TriggerHead(mm.lm_head.weight.shape[1])
    before = [p.detach().clone() for p in head.parameters()]
    task = ConstantTask()
    sch = TriggerSchedule(steps=1, prompts_per_step=1, group=4, lr=0.05, max_new_tokens=6, lam=0.0)
    train_trigger(mm, head, task, task.load("train"), torch.ones(mm.lm_head.weight.shape[0], dtype=torch.bool), sch)
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, head.parameters(), strict=True))
