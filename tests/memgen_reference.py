"""Deliberately naive MemGen reference used by the exactness tests and timed by benchmarks/bench_memgen_generation.py.

No caches anywhere: every step re-runs the whole embedding sequence (latents included) through the reasoner, and
every latent block re-runs the weaver over [retrieved text ; the whole prefix]. The cached implementation in
``harness/memgen/generation.py`` must produce the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from harness.generation import stop_token_ids
from harness.memgen.weaver import MemGenModel


def randomise_lora(mm: MemGenModel, seed: int = 1) -> None:
    """peft starts LoRA B at zero (adapter = no-op); make it matter so adapter on/off is really tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in mm.peft.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def strip_at_eos(row: torch.Tensor, eos: Sequence[int]) -> list[int]:
    """The generated ids up to and including the first stop token."""
    out = []
    for t in row.tolist():
        out.append(t)
        if t in eos:
            break
    return out


def naive_generate(mm: MemGenModel, prompt: list[int], max_new: int, insert_at: Callable[[int], bool], is_delim,
                   cap: int, eos: Sequence[int] | None = None, turns: Sequence[int] = (),
                   prefix: list[int] | None = None) -> tuple[list[int], list[int]]:
    """Greedy MemGen decoding of one prompt: a prompt-latent block at every token offset in ``turns`` (earlier
    assistant turn starts) and at the end of the prompt, then an inference block after a delimiter when
    ``insert_at(step)`` says so, up to ``cap``. Returns (tokens, insertion points)."""
    stops = set(stop_token_ids(mm.tokenizer) if eos is None else eos)
    hidden_input = mm.opts.weaver_input == "hidden"

    def states(seq):  # (1, L, d_r)
        return mm.reasoner(inputs_embeds=seq, use_cache=False).last_hidden_state

    def weave(seq, block):
        src = states(seq) if hidden_input else seq
        x = torch.cat([mm.heads.proj_in(src), block(1)], dim=1)
        if prefix:
            x = torch.cat([mm.weaver_embed(torch.tensor([prefix])), x], dim=1)
        with mm.weaver_mode():
            out = mm.weaver(inputs_embeds=x, use_cache=False).last_hidden_state
        return mm.heads.proj_out(out[:, -block.queries.shape[0]:])

    tokens, points, n = [], [0], 0
    with torch.no_grad(), mm.reasoner_mode():
        bounds = [0, *turns, len(prompt)]
        seq = mm.embed(torch.tensor([prompt[: bounds[1]]]))  # (1, T, d_r)
        for s, e in zip(bounds[1:], bounds[2:], strict=False):
            seq = torch.cat([seq, weave(seq, mm.heads.prompt), mm.embed(torch.tensor([prompt[s:e]]))], dim=1)
        seq = torch.cat([seq, weave(seq, mm.heads.prompt)], dim=1)
        for step in range(max_new):
            nxt = int(mm.lm_head(states(seq)[:, -1]).argmax(-1))
            tokens.append(nxt)
            if nxt in stops or step == max_new - 1:
                break
            seq = torch.cat([seq, mm.embed(torch.tensor([[nxt]]))], dim=1)
            if bool(is_delim[nxt]) and n < cap and insert_at(step + 1):
                seq = torch.cat([seq, weave(seq, mm.heads.infer)], dim=1)
                points.append(step + 1)
                n += 1
    return tokens, points
