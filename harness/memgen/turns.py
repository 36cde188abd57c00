"""Prompt latents at the start of every assistant turn of a multi-turn prompt (the paper's agent setting).

In a multi-turn task the whole conversation so far is rendered as one prompt, ending in the assistant generation
prompt (``harness/agent.py``). MemGen inserts its prompt latents (the ``k_prompt`` query set) at the start of every
assistant turn: here, at each earlier assistant turn's start inside the prompt during prefill, then as usual at
the end of the prompt, then at delimiters during decoding.

``turn_points`` finds those starts as token offsets into the prompt (character offsets from
``harness.agent.assistant_starts`` mapped through the tokenizer's offset mapping). ``turn_chunks`` cuts a batch
of prompts at them into pieces aligned to the end: chunk M (the last) holds every row's final piece, left-padded,
so the state predicting the first new token is its last column; a row with m < M turns has masked (empty)
chunks first. ``prefill`` feeds the chunks in order through one ``WovenState``; between chunks the weaver weaves
a prompt-latent block from what it has not read yet, and only the rows with a turn start there receive it (the
others get masked slots, exactly as rows that do not insert during decoding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from harness.agent import assistant_starts, render_messages
from harness.memgen.weaver import WovenState


def turn_points(tokenizer: Any, prompt: str, messages: Sequence[dict[str, str]] | None) -> list[int]:
    """Token offsets in ``tokenizer(prompt)`` where an earlier assistant turn starts (increasing, inside the
    prompt, the end excluded). Empty when there are no messages, no earlier assistant turn, or the task renders
    the prompt other than ``render_messages(messages)`` (then where the turns start is unknown)."""
    if not messages or not any(m.get("role") == "assistant" for m in messages):
        return []
    if render_messages(messages, tokenizer) != prompt:
        return []
    chars = assistant_starts(messages, tokenizer)[:-1]  # the last one is the end of the prompt
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    starts = [s for s, _ in enc["offset_mapping"]]
    n = len(starts)
    out: list[int] = []
    for c in chars:
        # Latents go before the first token starting at or after the turn start (after a token straddling it).
        t = sum(1 for s in starts if s < c)
        if 0 < t < n and (not out or t > out[-1]):
            out.append(t)
    return out


@dataclass
class TurnChunks:
    """A batch of prompts cut at their turn starts, pieces aligned to the end (see the module docstring)."""

    ids: list[torch.Tensor]
    """M + 1 chunks of token ids (B, S_r); each row's piece is left-padded within its chunk."""
    masks: list[torch.Tensor]
    """M + 1 masks (B, S_r): 1 where a row really has that token."""
    inserts: list[torch.Tensor]
    """M masks (B,) bool: rows that receive a turn-latent block after chunk r."""
    points: list[list[int]]
    """Per row, the token offsets in its prompt where a turn-latent block goes (as given)."""


def turn_chunks(
    prompts: Sequence[Sequence[int]], points: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> TurnChunks:
    """Lay out ``prompts`` (unpadded ids) cut at ``points[b]`` (increasing offsets strictly inside the prompt)."""
    pieces: list[list[list[int]]] = []
    for b, (p, pts) in enumerate(zip(prompts, points, strict=True)):
        if any(not 0 < x < len(p) for x in pts) or any(x >= y for x, y in zip(pts, pts[1:], strict=False)):
            raise ValueError(f"turn points of row {b} must increase strictly inside the prompt; got {list(pts)} "
                             f"for {len(p)} tokens")
        bounds = [0, *pts, len(p)]
        pieces.append([list(p[s:e]) for s, e in zip(bounds, bounds[1:], strict=False)])
    M = max(len(x) for x in pieces) - 1
    B = len(prompts)
    ids, masks, inserts = [], [], []
    for r in range(M + 1):
        row_piece = [x[r - (M + 1 - len(x))] if r >= M + 1 - len(x) else [] for x in pieces]
        width = max(len(x) for x in row_piece)
        chunk = torch.full((B, width), pad_id, dtype=torch.long)
        mask = torch.zeros((B, width), dtype=torch.long)
        for b, x in enumerate(row_piece):
            if x:
                chunk[b, width - len(x):] = torch.tensor(x, dtype=torch.long)
                mask[b, width - len(x):] = 1
        ids.append(chunk.to(device))
        masks.append(mask.to(device))
        if r < M:
            inserts.append(torch.tensor([r >= M + 1 - len(x) for x in pieces], dtype=torch.bool, device=device))
    return TurnChunks(ids=ids, masks=masks, inserts=inserts, points=[list(x) for x in points])


def prefill(state: WovenState, chunks: TurnChunks) -> torch.Tensor:
    """Feed the chunks in order (call inside ``mm.reasoner_mode()``), a turn-latent block between chunks;
    returns the reasoner states of the last chunk (B, S_M, d_r). Each turn's latents and the next piece go in one
    reasoner call."""
    mm = state.mm
    h = state.feed(mm.embed(chunks.ids[0]), chunks.masks[0])  # (B, S_0, d_r)
    for r in range(1, len(chunks.ids)):
        lat = state.weave("prompt")  # (B, K_p, d_r); rows without a turn start here get masked slots
        slots = chunks.inserts[r - 1][:, None].expand(-1, lat.shape[1]).to(torch.long)  # (B, K_p)
        emb = torch.cat([lat, mm.embed(chunks.ids[r])], dim=1)  # (B, K_p + S_r, d_r)
        h = state.feed(emb, torch.cat([slots, chunks.masks[r]], dim=1))[:, lat.shape[1]:]  # (B, S_r, d_r)
    return h
