"""MemGen turn latents (issue 9): prompt latents at every assistant turn start of a multi-turn prompt, and the
weaver's retrieved-text prefix (issue 5), checked against a naive implementation that builds the whole embedding
sequence with latents and recomputes everything."""

from __future__ import annotations

import torch
from memgen_reference import naive_generate, randomise_lora, strip_at_eos

from harness.agent import render_messages
from harness.config import RunConfig, apply_overrides
from harness.generation import stop_token_ids
from harness.memgen.generation import memgen_generate
from harness.memgen.options import MemGenOptions
from harness.memgen.sft import build_woven_batch, left_pad, woven_forward
from harness.memgen.turns import turn_chunks, turn_points
from harness.memgen.weaver import MemGenModel
from harness.methods import build_method
from tasks.base import Example

CONVS = [
    [{"role": "system", "content": "You are an agent."}, {"role": "user", "content": "You are in a kitchen."},
     {"role": "assistant", "content": "<action>look around</action>"}, {"role": "user", "content": "A fridge."},
     {"role": "assistant", "content": "<action>open fridge</action>"}, {"role": "user", "content": "It is open."}],
    [{"role": "user", "content": "Guess a number from 0 to 9."}, {"role": "assistant", "content": "<action>4</action>"},
     {"role": "user", "content": "Higher."}],
    [{"role": "user", "content": "Compute (3 + 4) * 5."}],
]


def _batch(tok):
    prompts = [render_messages(c, tok) for c in CONVS]
    ids = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    pts = [turn_points(tok, p, c) for p, c in zip(prompts, CONVS, strict=True)]
    return prompts, ids, pts


def test_turn_points_are_the_assistant_turn_starts(tiny):
    tok = tiny().tokenizer
    prompts, ids, pts = _batch(tok)
    assert [len(p) for p in pts] == [2, 1, 0]
    for conv, row, p in zip(CONVS[:2], ids, pts, strict=False):
        starts = [k for k, m in enumerate(conv) if m["role"] == "assistant"]
        for k, t in zip(starts, p, strict=True):  # the tokens before each point render the history before turn k
            assert tok.decode(row[:t]) == render_messages(conv[:k], tok)
            assert tok.decode(row[t:]).startswith(conv[k]["content"])
    assert turn_points(tok, prompts[0], None) == []
    assert turn_points(tok, "something else", CONVS[0]) == []  # a prompt not rendered from the messages


def test_turn_chunks_layout_aligned_to_the_end():
    c = turn_chunks([[1, 2, 3, 4, 5], [6, 7, 8], [9]], [[1, 3], [2], []], pad_id=0)
    assert [x.tolist() for x in c.ids] == [[[1], [0], [0]], [[2, 3], [6, 7], [0, 0]], [[4, 5], [0, 8], [0, 9]]]
    assert [x.tolist() for x in c.masks] == [[[1], [0], [0]], [[1, 1], [1, 1], [0, 0]], [[1, 1], [0, 1], [0, 1]]]
    assert [x.tolist() for x in c.inserts] == [[True, False, False], [True, True, False]]


def test_generation_with_turn_latents_equals_naive_and_replay(tiny):
    lm = tiny()
    tok = lm.tokenizer
    mm = MemGenModel(lm, MemGenOptions(k_prompt=3, k_infer=2, max_insertions=3))
    randomise_lora(mm)
    _, ids, pts = _batch(tok)
    enc_ids, enc_mask = left_pad(ids, tok.pad_token_id)
    is_delim = torch.ones(mm.lm_head.weight.shape[0], dtype=torch.bool)
    period = [3, 4, 5]

    def trigger(ctx):
        return torch.tensor([ctx.step % period[b] == 0 for b in range(3)])

    out = memgen_generate(mm, enc_ids, enc_mask, 14, trigger=trigger, delimiters=is_delim, turn_points=pts)
    assert out.turn_points == pts
    eos = stop_token_ids(tok)
    comps = []
    for b in range(3):
        tokens, points = naive_generate(mm, ids[b], 14, lambda s, b=b: s % period[b] == 0, is_delim, 3, turns=pts[b])
        assert strip_at_eos(out.sequences[b], eos) == tokens, f"row {b}"
        assert out.insertions[b] == points
        comps.append(tokens)
    # Weaver SFT / RL replay with the same turn points predicts exactly the generated tokens.
    batch = build_woven_batch(ids, comps, out.insertions, 3, 2, tok.pad_token_id, turn_points=pts)
    with torch.no_grad():
        h, y = woven_forward(mm, batch)
    assert torch.equal(mm.lm_head(h).argmax(-1), y)
    # The turn latents matter: without them the two multi-turn rows are predicted differently.
    plain = memgen_generate(mm, enc_ids, enc_mask, 14, trigger=trigger, delimiters=is_delim)
    assert plain.turn_points == [[], [], []]
    assert torch.equal(plain.sequences[2], out.sequences[2])  # the single-turn row is unchanged
    with torch.no_grad():
        h0, _ = woven_forward(mm, build_woven_batch(ids, comps, out.insertions, 3, 2, tok.pad_token_id))
    assert not torch.allclose(h0, h)


def _turn_examples() -> list[Example]:
    return [Example(id=f"e{i}", question=c[-1]["content"], answer="", target="<action>go</action>",
                    meta={"messages": c}) for i, c in enumerate(CONVS)]


class _ChatTask:
    name = "chat"
    max_new_tokens = 8

    def prompt(self, example: Example, tokenizer=None) -> str:
        return render_messages(example.meta["messages"], tokenizer)


def _method(tiny, tmp_path, *sets: str):
    cfg = apply_overrides(RunConfig(model="tiny-random", out=str(tmp_path)),
                          ["method_options.memgen.k_prompt=2", "method_options.memgen.k_infer=2",
                           "method_options.memgen.insert_before_training=true", *sets])
    return build_method("memgen", tiny(), cfg)


def test_method_weaves_turn_latents_and_option_off_is_unchanged(tiny, tmp_path):
    task, exs = _ChatTask(), _turn_examples()
    on = _method(tiny, tmp_path)
    randomise_lora(on.mm)
    got = on.generate(task, exs, 8)
    _, _, pts = _batch(on.tokenizer)
    assert on.last_turn_points == pts
    off = _method(tiny, tmp_path, "method_options.memgen.turn_latents=false")
    randomise_lora(off.mm)
    plain = off.generate(task, exs, 8)
    assert off.last_turn_points == [[], [], []]
    # turn_latents=false is exactly the old behaviour: the prompt as one chunk, one insertion at its end.
    no_msgs = [Example(e.id, e.question, e.answer, e.target, {}) for e in exs]

    class _Fixed(_ChatTask):
        def prompt(self, example, tokenizer=None):
            return render_messages(CONVS[int(example.id[1:])], tokenizer)

    assert on.generate(_Fixed(), no_msgs, 8) == plain
    assert got[2] == plain[2]  # the single-turn row does not change (that turn latents matter: test above)
    # weaver SFT on multi-turn examples trains with the turn latents (and runs)
    stats = on.train_on_task(task, exs, stage=1)
    assert len(stats["losses"]) >= 1


def test_cached_weaver_prefix_equals_naive(tiny):
    lm = tiny()
    tok = lm.tokenizer
    mm = MemGenModel(lm, MemGenOptions(k_prompt=3, k_infer=2, max_insertions=3))
    randomise_lora(mm)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in ("Compute (3 + 4) * 5.", "Hi")]
    ids = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    prefixes = [tok("Question: 2 + 2?\nSolution: 4\n\n", add_special_tokens=False).input_ids, tok("Q: x").input_ids]
    is_delim = torch.ones(mm.lm_head.weight.shape[0], dtype=torch.bool)
    enc = left_pad(ids, tok.pad_token_id)
    out = memgen_generate(mm, *enc, 10, delimiters=is_delim, weaver_prefix=left_pad(prefixes, tok.pad_token_id),
                          trigger=lambda ctx: torch.tensor([ctx.step % 3 == 0, ctx.step % 4 == 0]))
    for b in range(2):
        tokens, points = naive_generate(mm, ids[b], 10, lambda s, b=b: s % (3 + b) == 0, is_delim, 3,
                                        prefix=prefixes[b])
        assert strip_at_eos(out.sequences[b], stop_token_ids(tok)) == tokens
        assert out.insertions[b] == points
