"""MemGen decoding: latents after the prompt and at delimiters, one reasoner KV cache kept throughout.

Per decoding step every row advances one token. When some rows end a step on a delimiter token and the trigger
says yes, the weaver turns the states added since its last call into K latents, and one extra reasoner chunk of
K slots is fed: the inserting rows get their latents, the other rows get masked slots that neither shift their
positions nor enter their attention, so their output is what it would have been. Logits are computed for the
last position only (no full-vocabulary logits thrown away). Rows stop at EOS; the loop stops when all have.
With insertion, finished rows leave the batch once a quarter of it has finished (evaluation batches are
length-sorted by prompt, not by answer, so most rows would otherwise ride along to the longest one), and the
prompts' common head (the chat template's system turn) is prefilled once (``WovenState.feed_prompt``).

When only some rows insert (the usual case: each row meets its own delimiters), the weaver runs on those rows alone
and only they get a reasoner forward over the K latent slots (``WovenState.weave_rows`` / ``feed_rows``); the other
rows receive dead, masked cache slots, which ``WovenState.compact`` drops once enough have piled up, so the cost of
an insertion does not grow with the batch (``benchmarks/bench_memgen_generation.py --staggered``).

We write the loop instead of using ``model.generate`` because generate cannot feed extra embeddings to some
rows mid-decoding; ``tests/test_memgen_generation.py`` checks that with insertion off it is token-for-token
``model.generate``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from transformers import PreTrainedTokenizerBase

from harness.memgen import kv
from harness.memgen.turns import prefill, turn_chunks
from harness.memgen.weaver import MemGenModel, WovenState


@dataclass(frozen=True)
class TriggerContext:
    """What a trigger sees when asked whether rows insert latents now."""

    step: int
    """Tokens generated so far (the candidate token included)."""
    tokens: torch.Tensor
    """(B, step) generated token ids."""
    candidates: torch.Tensor
    """(B,) bool: rows whose last token ends with a delimiter, unfinished and under the insertion cap."""
    hidden: torch.Tensor
    """(B, d_r) the reasoner's last-layer state at the candidate token."""
    insertions: torch.Tensor
    """(B,) inference insertions each row has had so far."""


Trigger = Callable[[TriggerContext], torch.Tensor]
"""Returns a (B,) bool tensor: which rows insert now (only ``candidates`` are honoured)."""


def always_insert(ctx: TriggerContext) -> torch.Tensor:
    """The default trigger: every candidate row inserts (the cap is applied before the trigger is asked)."""
    return ctx.candidates


@dataclass
class MemGenOutput:
    sequences: torch.Tensor
    """(B, T_new) generated ids; after a row's EOS the rest is padding (as ``model.generate``)."""
    insertions: list[list[int]]
    """Per row, the number of generated tokens before each latent block (0 = the prompt insertion)."""
    turn_points: list[list[int]] = field(default_factory=list)
    """Per row, the prompt token offsets where a turn-latent block was woven in during prefill (empty: none)."""
    delimiters: list[int] = field(default_factory=list)
    """Per row, the delimiter tokens it generated before finishing (under the cap or not, asked or not): the
    denominator of the paper's invocation rate (the sparsity penalty)."""
    logprobs: torch.Tensor | None = None
    """(B, T_new) log p of each generated token under the sampling distribution (``softmax(logits / T)``; greedy:
    T = 1), 0 after a row's EOS; only with ``output_logprobs``."""


def completion_length(row: Sequence[int], stops: set[int] | Sequence[int]) -> int:
    """Generated tokens of ``row`` up to and including the first stop token (all of them when none)."""
    return next((i + 1 for i, t in enumerate(row) if t in stops), len(row))


def delimiter_mask(tokenizer: PreTrainedTokenizerBase, delimiters: Iterable[str], vocab: int) -> torch.Tensor:
    """(V,) bool: token ids whose text ends with one of ``delimiters``.

    Decoding the whole vocabulary takes seconds, so the result is cached per (tokenizer name, size, delimiters):
    every step then tests the new tokens with one lookup instead of decoding text.
    """
    key = (getattr(tokenizer, "name_or_path", ""), len(tokenizer), type(tokenizer).__name__)
    if not key[0]:  # unnamed tokenizer: do not share the cache entry
        key = (str(id(tokenizer)), *key[1:])
    _TOKENIZERS.setdefault(key, tokenizer)
    return _delimiter_mask(key, tuple(delimiters), vocab).clone()


_TOKENIZERS: dict[tuple, PreTrainedTokenizerBase] = {}


@lru_cache(maxsize=16)
def _delimiter_mask(key: tuple, delimiters: tuple[str, ...], vocab: int) -> torch.Tensor:
    tokenizer = _TOKENIZERS[key]
    n = min(vocab, len(tokenizer))
    texts = tokenizer.batch_decode([[i] for i in range(n)])
    out = torch.zeros(vocab, dtype=torch.bool)
    out[:n] = torch.tensor([t.endswith(delimiters) for t in texts])
    return out


@torch.no_grad()
def memgen_generate(
    mm: MemGenModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    *,
    insert: bool = True,
    trigger: Trigger = always_insert,
    delimiters: torch.Tensor | None = None,
    max_insertions: int | None = None,
    temperature: float = 0.0,
    min_new_tokens: int = 0,
    eos_token_ids: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    turn_points: Sequence[Sequence[int]] | None = None,
    weaver_prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
    trigger_prompt: bool = False,
    output_logprobs: bool = False,
    compact_min_dead: int = 32,
    drop_finished: bool = True,
) -> MemGenOutput:
    """Generate for a left-padded batch ``input_ids``/``attention_mask`` (B, T) with latents woven in.

    ``insert=False`` is plain decoding by the frozen reasoner. ``delimiters`` is a (V,) bool mask of candidate
    tokens (default: from ``mm.opts.delimiters``); ``temperature`` 0 is greedy, else softmax sampling.
    ``turn_points[b]``: offsets in row b's unpadded prompt where earlier assistant turns start; a prompt-latent
    block is woven in at each during prefill (``harness/memgen/turns.py``). ``weaver_prefix``: (B, R) weaver-token
    ids and mask (retrieved text) the weaver reads before the reasoner's states. Both only act when inserting.
    ``drop_finished``: with insertion, rows that reached EOS leave the batch (same tokens; only the float summation
    order of the remaining rows' forwards may change, as with any batch size). A trigger whose ``wants_states`` is
    False is not handed the reasoner's states (``observe``).
    """
    tok = mm.tokenizer
    B = input_ids.shape[0]
    device = input_ids.device
    eos = torch.tensor(list(eos_token_ids if eos_token_ids is not None else mm.stop_ids()), device=device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else int(eos[0])
    vocab = mm.lm_head.weight.shape[0]
    is_delim = (delimiters if delimiters is not None else delimiter_mask(tok, mm.opts.delimiters, vocab)).to(device)
    cap = mm.opts.max_insertions if max_insertions is None else max_insertions
    k_infer = mm.opts.k_infer

    # A trigger with an ``observe`` method (the LoRA trigger) reads every reasoner state fed, latents included.
    state = WovenState(mm, w_prefix=weaver_prefix if insert else None,
                       observer=getattr(trigger, "observe", None)
                       if insert and getattr(trigger, "wants_states", True) else None)
    turns = insert and turn_points is not None and any(turn_points)
    points: list[list[int]] = [[] for _ in range(B)]
    n_ins = torch.zeros(B, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    tokens: list[torch.Tensor] = []
    with mm.reasoner_mode():
        if turns:
            rows = [input_ids[b][attention_mask[b].bool()].tolist() for b in range(B)]
            last = prefill(state, turn_chunks(rows, turn_points, pad, device))[:, -1]  # (B, d_r)
            lat = None
        else:  # rows with the same prompt (a GRPO group's rollouts) share its prefill and prompt latents,
            # and every prompt's common head (the system turn) is fed once; not without insertion, which stays
            # token for token ``model.generate``
            hidden, lat = state.feed_prompt(input_ids, attention_mask, weave=insert and not trigger_prompt,
                                            share_prefix=insert)
            last = hidden[:, -1]  # (B, d_r)
        if insert:
            do = attention_mask.new_ones(B, dtype=torch.bool)
            if trigger_prompt:
                ctx = TriggerContext(step=0, tokens=input_ids.new_zeros((B, 0)), candidates=do, hidden=last,
                                     insertions=n_ins.clone())
                do = trigger(ctx).to(device=device, dtype=torch.bool)  # (B,)
            if bool(do.any()):
                lat = state.weave("prompt") if lat is None else lat  # (B, K_p, d_r)
                h = state.feed(lat, do[:, None].expand(B, lat.shape[1]))  # (B, K_p, d_r)
                last = torch.where(do[:, None], h[:, -1], last)
                for b in do.nonzero().flatten().tolist():
                    points[b].append(0)
        n_delim = torch.zeros(B, dtype=torch.long, device=device)
        logps: list[torch.Tensor] = []
        # Finished rows leave the batch (``live``: the rows the state still holds) once enough have finished, so
        # later steps and insertions cost only the rows still decoding. Not with an observer (it holds state per
        # row) or caches the row surgery does not handle; never without insertion (then the loop stays token for
        # token ``model.generate``, which keeps finished rows).
        can_drop = insert and drop_finished and state.observer is None and kv.supports(state.cache) \
            and kv.supports(state.w_cache)
        live = torch.arange(B, device=device)  # (n,) original row of each state row
        for step in range(max_new_tokens):
            logits = mm.lm_head(last).float()  # (n, V)
            if step < min_new_tokens:
                logits[:, eos] = float("-inf")
            if temperature > 0:
                logits = logits / temperature
                pick = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)  # (n,)
            else:
                pick = logits.argmax(-1)  # (n,)
            nxt = torch.full((B,), pad, dtype=pick.dtype, device=device).index_copy(0, live, pick)  # (B,)
            if output_logprobs:
                lp = torch.log_softmax(logits, dim=-1).gather(1, pick[:, None]).squeeze(1)  # (n,)
                lp = torch.zeros(B, dtype=lp.dtype, device=device).index_copy(0, live, lp)  # (B,)
                logps.append(torch.where(finished, torch.zeros_like(lp), lp))
            nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
            tokens.append(nxt)
            finished = finished | torch.isin(nxt, eos)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            done = finished[live]  # (n,)
            if can_drop and int(done.sum()) * 4 >= len(live):  # a quarter: copies of the caches stay rare
                keep = (~done).nonzero().flatten()  # (n',)
                state.repeat_rows(keep)
                live, last = live[keep], last[keep]
            # Finished rows still in the batch keep feeding padding with mask 1, exactly as ``model.generate`` does.
            n = len(live)
            last = state.feed(mm.embed(nxt[live][:, None]), attention_mask.new_ones((n, 1)))[:, -1]  # (n, d_r)
            n_delim = n_delim + (is_delim[nxt] & ~finished).long()  # every point the trigger could be asked at
            if not insert or cap <= 0:
                continue
            cand = is_delim[nxt] & ~finished & (n_ins < cap)  # (B,)
            if not bool(cand.any()):
                continue
            hid = last if n == B else last.new_zeros((B, last.shape[1])).index_copy(0, live, last)  # (B, d_r)
            ctx = TriggerContext(step=step + 1, tokens=torch.stack(tokens, 1), candidates=cand, hidden=hid,
                                 insertions=n_ins.clone())
            do = trigger(ctx).to(device=device, dtype=torch.bool) & cand  # (B,)
            if not bool(do.any()):
                continue
            do_live = do[live]  # (n,)
            rows = do_live.nonzero().flatten()  # (m,) state rows that insert
            if len(rows) == n:
                lat = state.weave("infer")  # (n, K_i, d_r)
                last = state.feed(lat, do_live[:, None].expand(n, k_infer))[:, -1]  # (n, d_r)
            else:  # only the inserting rows get weaver work and reasoner slots (the others: masked, no compute)
                lat = state.weave_rows("infer", rows)  # (m, K_i, d_r)
                last = last.index_copy(0, rows, state.feed_rows(lat, rows)[:, -1])
            n_ins = n_ins + do.long()
            for b in do.nonzero().flatten().tolist():
                points[b].append(step + 1)
            state.drop_pending((finished | (n_ins >= cap))[live])  # rows that cannot insert again
            state.compact(compact_min_dead)
    seqs = torch.stack(tokens, 1) if tokens else input_ids.new_zeros((B, 0))  # (B, T_new)
    done_turns = [list(p) for p in turn_points] if turns else [[] for _ in range(B)]
    lps = (torch.stack(logps, 1) if logps else torch.zeros((B, 0), device=device)) if output_logprobs else None
    return MemGenOutput(sequences=seqs, insertions=points, turn_points=done_turns, delimiters=n_delim.tolist(),
                        logprobs=lps)
