"""Weaver SFT: teacher-forced replay matches generation, only weaver parameters learn, the reasoner stays frozen,
and the ``memgen`` method trains, saves and loads through the runner."""

from __future__ import annotations

import json

import pytest
import torch
from memgen_reference import randomise_lora

from harness.config import RunConfig, TrainConfig, apply_overrides
from harness.generation import stop_token_ids
from harness.memgen.generation import memgen_generate
from harness.memgen.method import MemGen
from harness.memgen.options import MemGenOptions
from harness.memgen.sft import (
    SFTSchedule,
    build_woven_batch,
    delimiter_points,
    sft_loss,
    train_weaver,
    woven_forward,
)
from harness.memgen.weaver import MemGenModel
from harness.methods import build_method

QUESTIONS = ["Compute (3 + 4) * 5.", "Reverse the order of these words: apple bread chair delta eagle", "Hi"]


def test_delimiter_points_hand_computed():
    is_delim = torch.zeros(10, dtype=torch.bool)
    is_delim[[3, 5]] = True
    target = [1, 3, 2, 5, 3, 4, 9]  # delimiters at indices 1, 3, 4 (the last token never counts)
    assert delimiter_points(target, is_delim, 5) == [0, 2, 4, 5]
    assert delimiter_points(target, is_delim, 2) == [0, 2, 4]
    assert delimiter_points(target, is_delim, 0) == [0]
    assert delimiter_points([3], is_delim, 5) == [0]


def test_build_woven_batch_layout():
    b = build_woven_batch([[7, 8, 9], [6]], [[1, 2, 3, 4], [5, 6]], [[0, 1, 3], [0]], k_prompt=2, k_infer=1,
                          pad_id=0)
    assert b.prompt_ids.tolist() == [[7, 8, 9], [0, 0, 6]]
    assert b.prompt_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert [r.ids.tolist() for r in b.rounds] == [[[1, 0], [5, 6]], [[2, 3], [0, 0]], [[4], [0]]]
    assert [r.slot_mask.tolist() for r in b.rounds] == [[[1, 1], [1, 1]], [[1], [0]], [[1], [0]]]
    assert [r.mask.tolist() for r in b.rounds] == [[[1, 0], [1, 1]], [[1, 1], [0, 0]], [[1], [0]]]
    with pytest.raises(ValueError, match="insertion points of row 0"):
        build_woven_batch([[1]], [[2, 3]], [[1]], 2, 1, 0)


def test_replay_reproduces_generation_logits(tiny):
    """Teacher-forced replay at the insertion points generation returned predicts exactly the generated tokens
    (what weaver RL needs to recompute log-probs)."""
    lm = tiny()
    tok = lm.tokenizer
    mm = MemGenModel(lm, MemGenOptions(k_prompt=3, k_infer=2, max_insertions=3))
    randomise_lora(mm)
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in QUESTIONS]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    is_delim = torch.ones(mm.lm_head.weight.shape[0], dtype=torch.bool)
    out = memgen_generate(mm, enc.input_ids, enc.attention_mask, 14, delimiters=is_delim,
                          trigger=lambda ctx: torch.tensor([ctx.step % (3 + b) == 0 for b in range(3)]))
    eos = stop_token_ids(tok)
    prompts = [enc.input_ids[b][enc.attention_mask[b].bool()].tolist() for b in range(3)]
    comps = []
    for row in out.sequences.tolist():
        n = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        comps.append(row[:n])
    assert len({tuple(p) for p in out.insertions}) > 1  # rows inserted at different points
    batch = build_woven_batch(prompts, comps, out.insertions, 3, 2, tok.pad_token_id)
    with torch.no_grad():
        h, y = woven_forward(mm, batch)
        logits = mm.lm_head(h)  # (N, V)
    assert y.numel() == sum(len(c) for c in comps)
    assert torch.equal(logits.argmax(-1), y)


def test_batched_replay_equals_each_row_alone_values_and_gradients(tiny):
    """``woven_forward`` runs inner rounds on the rows that weave again and every row's tail in one last chunk:
    rows with one round (the prompt block only) up to four, K_prompt != K_infer. Each row's states, and the weaver's
    gradients of a loss over all rows, equal those of replaying every row alone (up to float summation order)."""
    lm = tiny()
    tok = lm.tokenizer
    mm = MemGenModel(lm, MemGenOptions(k_prompt=3, k_infer=2))
    randomise_lora(mm)
    prompts = [tok(q, add_special_tokens=False).input_ids for q in QUESTIONS] + [[5, 6, 7, 8]]
    comps = [[11, 12, 13, 14, 15, 16, 17, 18, 19], [21, 22, 23], [31, 32, 33, 34, 35, 36], [41, 42, 43, 44, 45]]
    points = [[0], [0, 1, 2], [0, 2, 3, 5], [0, 4]]  # 1, 3, 4 and 2 rounds; row 0's tail is its whole completion
    weight = torch.randn(mm.lm_head.weight.shape[1], generator=torch.Generator().manual_seed(0))

    def run(rows):
        batch = build_woven_batch([prompts[b] for b in rows], [comps[b] for b in rows], [points[b] for b in rows],
                                  3, 2, tok.pad_token_id)
        h, y = woven_forward(mm, batch)
        return h, y, batch

    params = mm.weaver_parameters()
    mm.zero_grad(set_to_none=True)
    h, y, batch = run(range(4))
    (h.float() @ weight).sum().backward()
    grads = [p.grad.clone() for p in params]
    order = [(r, b) for r, rnd in enumerate(batch.rounds) for b in range(4) for _ in range(int(rnd.mask[b].sum()))]
    mm.zero_grad(set_to_none=True)
    for b in range(4):
        hb, yb, _ = run([b])
        (hb.float() @ weight).sum().backward()
        mine = torch.tensor([row == b for _, row in order])  # round-row-position order: row b's tokens in order
        assert torch.equal(y[mine], yb)
        torch.testing.assert_close(h[mine], hb, atol=1e-5, rtol=1e-4)
    for p, g in zip(params, grads, strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-5 * float(g.abs().max()) + 1e-6, rtol=1e-4)  # fp32 sums


@pytest.mark.parametrize("weaver_input", ["hidden", "embeddings"])
def test_only_weaver_gets_gradients_and_reasoner_is_unchanged(tiny, weaver_input):
    lm = tiny()
    mm = MemGenModel(lm, MemGenOptions(k_prompt=2, k_infer=2, weaver_input=weaver_input))
    tok = lm.tokenizer
    before = {k: v.clone() for k, v in mm.reasoner_state().items()}
    prompts = [tok(q, add_special_tokens=False).input_ids for q in QUESTIONS]
    targets = [tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id]
               for t in ("7 * 5 = 35.\nAnswer: 35", "Answer: eagle, delta, chair, bread, apple", "Hello.")]
    rows = list(zip(prompts, targets, strict=True))
    is_delim = torch.zeros(mm.lm_head.weight.shape[0], dtype=torch.bool)
    for d in (",", ".", "\n"):
        is_delim[tok(d, add_special_tokens=False).input_ids[0]] = True
    # One backward: gradients exist exactly on the weaver's parameters, and reach every kind of them.
    batch = build_woven_batch(prompts, targets, [delimiter_points(t, is_delim, 5) for t in targets], 2, 2,
                              tok.pad_token_id)
    sft_loss(mm, batch).backward()
    weaver_ids = {id(p) for p in mm.weaver_parameters()}
    for n, p in mm.named_parameters():
        if id(p) not in weaver_ids:
            assert p.grad is None and not p.requires_grad, n
    named = dict(mm.peft.named_parameters()) | {f"heads.{k}": v for k, v in mm.heads.named_parameters()}
    for n, p in named.items():
        if p.requires_grad:
            assert p.grad is not None and (p.grad.abs().sum() > 0 or "lora_A" in n), n  # lora_A: B starts at 0
    for part in ("lora_A", "lora_B", "proj_in", "proj_out", "prompt.queries", "infer.queries", "prompt.norm",
                 "infer.norm", "prompt.scale", "infer.scale"):
        assert any(part in n and p.grad is not None for n, p in named.items()), part
    mm.zero_grad(set_to_none=True)
    sch = SFTSchedule(steps=6, batch_size=3, lr=1e-2, warmup_ratio=0.0, scheduler="constant", max_grad_norm=1.0,
                      weight_decay=0.0, seed=0)
    stats = train_weaver(mm, rows, is_delim, 5, sch)
    assert stats["losses"][-1] < stats["losses"][0]
    after = mm.reasoner_state()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _cfg(tmp_path, **train) -> RunConfig:
    cfg = RunConfig(model="tiny-random", sequence="arith,reverse", limit=8, out=str(tmp_path),
                    train=TrainConfig(max_steps=3, batch_size=4, lr=1e-3, **train))
    return apply_overrides(cfg, ["method_options.memgen.k_prompt=2", "method_options.memgen.k_infer=2",
                                 "eval.max_new_tokens=12"])


def test_method_init_row_is_the_frozen_reasoner_then_trains_saves_and_loads(tiny, tmp_path):
    from tasks.registry import get_task

    cfg = _cfg(tmp_path)
    lm = tiny()
    method = build_method("memgen", lm, cfg)
    assert isinstance(method, MemGen)
    task = get_task("arith")
    test = task.load("test", limit=4)
    vanilla = build_method("vanilla", tiny(), cfg)
    assert method.generate(task, test, 12) == vanilla.generate(task, test, 12)  # row 0: no insertion
    assert method.last_insertions == [[]] * 4
    stats = method.train_on_task(task, task.load("train", limit=8), stage=1)
    assert stats["steps"] == 3 and len(stats["losses"]) == 3
    trained = method.generate(task, test, 12)
    assert all(p[0] == 0 for p in method.last_insertions)  # insertion on after training
    method.save(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "memgen.json").read_text())["trained"] is True
    other = build_method("memgen", tiny(), cfg)
    other.load(tmp_path / "ckpt")
    assert other.generate(task, test, 12) == trained
    bad = build_method("memgen", tiny(), apply_overrides(cfg, ["method_options.memgen.k_prompt=3"]))
    with pytest.raises(ValueError, match="k_prompt"):
        bad.load(tmp_path / "ckpt")


def test_bad_option_is_one_clear_line(tiny, tmp_path):
    cfg = apply_overrides(_cfg(tmp_path), ["method_options.memgen.weaver_input=tokens"])
    with pytest.raises(ValueError, match="weaver_input='tokens': use one of hidden, embeddings"):
        build_method("memgen", tiny(), cfg)


def test_runner_fills_the_matrix_with_memgen(tiny, tmp_path):
    from harness.runner import run_method

    cfg = _cfg(tmp_path)
    summary = run_method("memgen", cfg, tmp_path / "memgen", model=tiny())
    assert summary["complete"] and len(summary["matrix"]) == 3
    assert (tmp_path / "memgen" / "checkpoints" / "stage2" / "weaver_heads.safetensors").exists()
