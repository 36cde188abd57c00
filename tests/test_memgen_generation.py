"""MemGen generation: exactness against ``model.generate`` and against a deliberately naive re-compute version."""

from __future__ import annotations

import pytest
import torch
from memgen_reference import naive_generate, randomise_lora, strip_at_eos

from harness.generation import stop_token_ids
from harness.memgen.generation import TriggerContext, delimiter_mask, memgen_generate
from harness.memgen.options import MemGenOptions
from harness.memgen.weaver import MemGenModel
from harness.models import LoadedModel, tiny_random_model

QUESTIONS = ["Compute (3 + 4) * 5.", "Reverse the order of these words: apple bread chair delta eagle", "Hi"]


def _prompts(tok, questions=QUESTIONS):
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in questions]
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@pytest.mark.parametrize("name", ["tiny-random", pytest.param("smollm2-135m", marks=pytest.mark.slow)])
def test_insertion_off_equals_model_generate(name, tiny, smollm2):
    lm = tiny() if name == "tiny-random" else smollm2()
    tok = lm.tokenizer
    enc = _prompts(tok)
    ref = lm.model.generate(**enc, max_new_tokens=24, do_sample=False, eos_token_id=stop_token_ids(tok),
                            pad_token_id=tok.pad_token_id)[:, enc.input_ids.shape[1]:]
    mm = MemGenModel(lm, MemGenOptions())
    randomise_lora(mm)  # the reasoner must ignore the (now non-trivial) adapter
    out = memgen_generate(mm, enc.input_ids, enc.attention_mask, 24, insert=False)
    assert torch.equal(out.sequences, ref)
    assert out.insertions == [[], [], []]


PERIOD = [3, 4, 5]  # row b inserts at steps divisible by PERIOD[b]: different rows at different steps


def _every_kth_step(period: list[int]):
    def trigger(ctx: TriggerContext) -> torch.Tensor:
        return torch.tensor([ctx.step % period[b] == 0 for b in range(len(period))])

    return trigger


def _every_token(mm):
    return torch.ones(mm.lm_head.weight.shape[0], dtype=torch.bool)


@pytest.mark.parametrize("name,weaver_input", [("tiny-random", "hidden"), ("tiny-random", "embeddings"),
                                               pytest.param("smollm2-135m", "hidden", marks=pytest.mark.slow)])
def test_cached_equals_naive_batched_rows_insert_at_different_steps(tiny, smollm2, name, weaver_input):
    lm = tiny() if name == "tiny-random" else smollm2()
    torch.manual_seed(0)  # the heads' init (and so whether a row stops early) must not depend on earlier tests
    mm = MemGenModel(lm, MemGenOptions(k_prompt=3, k_infer=2, weaver_input=weaver_input, max_insertions=4))
    randomise_lora(mm)
    enc = _prompts(lm.tokenizer)
    is_delim = _every_token(mm)
    trigger, period = _every_kth_step(PERIOD), PERIOD

    out = memgen_generate(mm, enc.input_ids, enc.attention_mask, 20, trigger=trigger, delimiters=is_delim)
    eos = stop_token_ids(lm.tokenizer)
    for b in range(3):
        prompt = enc.input_ids[b][enc.attention_mask[b].bool()].tolist()
        tokens, points = naive_generate(mm, prompt, 20, lambda s, b=b: s % period[b] == 0, is_delim, 4)
        assert strip_at_eos(out.sequences[b], eos) == tokens, f"row {b}"
        assert out.insertions[b] == points
    assert out.insertions[0] == [0, 3, 6, 9, 12]  # capped at 4 inference insertions
    # rows really inserted at different steps (a row that hits EOS early stops inserting; any two differing suffice)
    assert len({tuple(x) for x in out.insertions}) > 1


def test_cached_equals_naive_single_row_real_delimiters(tiny):
    lm = tiny(seed=3)
    mm = MemGenModel(lm, MemGenOptions(k_prompt=4, k_infer=4))
    randomise_lora(mm, seed=2)
    enc = _prompts(lm.tokenizer, QUESTIONS[:1])
    # The random model rarely emits ',' '.' or newline, so widen the delimiters to tokens ending in a letter 'e'.
    is_delim = delimiter_mask(lm.tokenizer, ("e", ",", ".", "\n"), mm.lm_head.weight.shape[0])
    out = memgen_generate(mm, enc.input_ids, enc.attention_mask, 30, delimiters=is_delim)
    tokens, points = naive_generate(mm, enc.input_ids[0].tolist(), 30, lambda s: True, is_delim, 5)
    assert strip_at_eos(out.sequences[0], stop_token_ids(lm.tokenizer)) == tokens
    assert out.insertions[0] == points


def test_separate_weaver_with_other_width_equals_naive(tiny):
    lm = tiny()
    small = tiny_random_model(lm.tokenizer, seed=5, hidden=32).eval()
    mm = MemGenModel(lm, MemGenOptions(k_prompt=2, k_infer=2), LoadedModel(small, lm.tokenizer, "tiny-32"))
    randomise_lora(mm)
    assert mm.heads.proj_in.weight.shape == (32, 64) and mm.heads.proj_out.weight.shape == (64, 32)
    enc = _prompts(lm.tokenizer, QUESTIONS[:2])
    is_delim = _every_token(mm)

    def trigger(ctx):
        return torch.tensor([ctx.step % 4 == b for b in range(2)])

    out = memgen_generate(mm, enc.input_ids, enc.attention_mask, 12, trigger=trigger, delimiters=is_delim)
    for b in range(2):
        prompt = enc.input_ids[b][enc.attention_mask[b].bool()].tolist()
        tokens, points = naive_generate(mm, prompt, 12, lambda s, b=b: s % 4 == b, is_delim, 5)
        assert strip_at_eos(out.sequences[b], stop_token_ids(lm.tokenizer)) == tokens
        assert out.insertions[b] == points


def test_sampling_is_seeded_and_differs_from_greedy(tiny):
    lm = tiny()
    mm = MemGenModel(lm, MemGenOptions())
    enc = _prompts(lm.tokenizer)
    runs = [memgen_generate(mm, enc.input_ids, enc.attention_mask, 16, temperature=1.0,
                            generator=torch.Generator().manual_seed(7)).sequences for _ in range(2)]
    greedy = memgen_generate(mm, enc.input_ids, enc.attention_mask, 16).sequences
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], greedy)


def test_min_new_tokens_forces_length(tiny):
    lm = tiny()
    mm = MemGenModel(lm, MemGenOptions())
    enc = _prompts(lm.tokenizer)
    out = memgen_generate(mm, enc.input_ids, enc.attention_mask, 10, min_new_tokens=10,
                          eos_token_ids=stop_token_ids(lm.tokenizer))
    assert out.sequences.shape == (3, 10)
    assert not torch.isin(out.sequences, torch.tensor(stop_token_ids(lm.tokenizer))).any()


def test_delimiter_mask_marks_tokens_by_their_text(tiny):
    tok = tiny().tokenizer
    mask = delimiter_mask(tok, (",", ".", "\n"), len(tok))
    for text, want in ((",", True), (".", True), ("\n", True), (" apple", False), ("7", False)):
        ids = tok(text, add_special_tokens=False).input_ids
        assert len(ids) == 1 and bool(mask[ids[0]]) is want, text


@pytest.mark.parametrize("weaver_input", ["hidden", "embeddings"])
def test_subset_insertion_with_compaction_equals_naive(tiny, weaver_input):
    """Rows insert alone (weaver and reasoner run on those rows only) and the dead slots the other rows receive are
    compacted away after every insertion: still token for token the naive reference."""
    lm = tiny()
    mm = MemGenModel(lm, MemGenOptions(k_prompt=3, k_infer=2, weaver_input=weaver_input, max_insertions=4))
    randomise_lora(mm)
    enc = _prompts(lm.tokenizer)
    is_delim = _every_token(mm)
    trigger, period = _every_kth_step(PERIOD), PERIOD

    eos = stop_token_ids(lm.tokenizer)
    outs = [memgen_generate(mm, enc.input_ids, enc.attention_mask, 20, trigger=trigger, delimiters=is_delim,
                            compact_min_dead=m) for m in (1, 10**9)]  # compact at once / never
    for b in range(3):
        prompt = enc.input_ids[b][enc.attention_mask[b].bool()].tolist()
        tokens, points = naive_generate(mm, prompt, 20, lambda s, b=b: s % period[b] == 0, is_delim, 4)
        for out in outs:
            assert strip_at_eos(out.sequences[b], eos) == tokens, f"row {b}"
            assert out.insertions[b] == points


def test_kv_compact_keeps_outputs_and_drops_dead_slots(tiny):
    from transformers import DynamicCache

    from harness.memgen import kv

    lm = tiny()
    model = lm.model.model
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (2, 6))
    mask = torch.tensor([[1, 0, 1, 1, 0, 1], [0, 0, 1, 0, 1, 1]])  # dead slots in the middle of each row
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
        nxt = torch.randint(0, 1000, (2, 1))
        npos = mask.sum(1, keepdim=True)
        ref = model(input_ids=nxt, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1),
                    position_ids=npos, cache=DynamicCache(ddp_cache_data=[
                        (layer.keys.clone(), layer.values.clone()) for layer in cache.layers]),
                    use_cache=True).last_hidden_state
        assert kv.dead_slots(mask) == 2
        small = kv.compact(cache, mask)
        assert small.tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
        assert cache.layers[0].keys.shape[2] == 4
        got = model(input_ids=nxt, attention_mask=torch.cat([small, torch.ones(2, 1, dtype=small.dtype)], 1),
                    position_ids=npos, cache=cache, use_cache=True).last_hidden_state
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_finished_rows_leave_the_batch_with_the_same_tokens(tiny):
    """Rows that reach a stop token leave the decoding batch (later forwards run on fewer rows): the tokens and
    insertion points are those of keeping every row, and of the naive per-row reference."""
    lm = tiny()
    torch.manual_seed(0)
    mm = MemGenModel(lm, MemGenOptions(k_prompt=3, k_infer=2, max_insertions=4))
    randomise_lora(mm)
    enc = _prompts(lm.tokenizer)
    is_delim = _every_token(mm)
    trigger, period = _every_kth_step(PERIOD), PERIOD

    never = [mm.lm_head.weight.shape[0] - 1]  # a stop id to find each row's free-running tokens first
    free = memgen_generate(mm, enc.input_ids, enc.attention_mask, 20, trigger=trigger, delimiters=is_delim,
                           eos_token_ids=never).sequences
    assert not torch.isin(free, torch.tensor(never)).any()
    # Stop on a token row 0 emits early that some other row emits late or never: rows then finish apart.
    first = [{t: i for i, t in reversed(list(enumerate(r)))} for r in free.tolist()]
    eos = next([t] for t, i in first[0].items() if i < 8 and any(f.get(t, 99) > i + 4 for f in first[1:]))
    outs = {False: memgen_generate(mm, enc.input_ids, enc.attention_mask, 20, trigger=trigger, delimiters=is_delim,
                                   eos_token_ids=eos, drop_finished=False)}
    sizes: list[int] = []  # the batch of every reasoner forward of the run that drops rows
    hook = mm.reasoner.register_forward_hook(lambda mod, args, kw, out: sizes.append(kw["inputs_embeds"].shape[0]),
                                             with_kwargs=True)
    try:
        outs[True] = memgen_generate(mm, enc.input_ids, enc.attention_mask, 20, trigger=trigger,
                                     delimiters=is_delim, eos_token_ids=eos)
    finally:
        hook.remove()
    assert max(sizes) == 3 and sizes[-1] < 3  # finished rows left the batch
    assert torch.equal(outs[True].sequences, outs[False].sequences)
    assert outs[True].insertions == outs[False].insertions
    assert outs[True].delimiters == outs[False].delimiters
    lengths = [len(strip_at_eos(r, eos)) for r in outs[True].sequences]
    assert len(set(lengths)) > 1  # the rows really finished at different steps
    for b in range(3):
        prompt = enc.input_ids[b][enc.attention_mask[b].bool()].tolist()
        tokens, points = naive_generate(mm, prompt, 20, lambda s, b=b: s % period[b] == 0, is_delim, 4, eos=eos)
        assert strip_at_eos(outs[True].sequences[b], eos) == tokens, f"row {b}"
        assert outs[True].insertions[b] == points


def test_unread_states_are_packed_to_the_right_in_order():
    """The weaver gets each row's live unread states only (in order, right-aligned, padding zeroed): hand-computed."""
    from harness.memgen.weaver import _packed

    states = torch.arange(1.0, 9.0).reshape(2, 4, 1)  # row 0: 1 2 3 4, row 1: 5 6 7 8
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1]])  # dead slots (other rows' latents) between live ones
    with torch.no_grad():  # decoding packs; training only cuts leading dead columns
        got, packed = _packed(states, mask)
    assert packed.tolist() == [[1, 1], [0, 1]]
    assert got.squeeze(2).tolist() == [[1.0, 3.0], [0.0, 8.0]]
    same, m = _packed(states, torch.ones(2, 4, dtype=torch.long))  # nothing dead: untouched
    assert m.shape == (2, 4) and torch.equal(same, states)
