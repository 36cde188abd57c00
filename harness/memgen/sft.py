"""Teacher-forced weaving and weaver SFT.

``woven_forward`` replays a batch of prompt + completion pairs with latent blocks at given insertion points
(the points ``memgen_generate`` returns, or delimiter positions of gold targets) and returns, for every
completion token, the reasoner state that predicts it. It runs the same cached chunk machinery as generation,
one chunk per insertion round: round r feeds latent block r-1 followed by the r-th completion segment
(right-padded, masked) of the rows that weave again after it, on caches restricted to them, then the weaver
produces their block r from what it has not read yet; every row's last segment goes into one final chunk.
The state predicting the first token after a latent block is the block's last latent; logits whose next slot is
a latent are never computed. Greedy generation and this replay give the same logits (tested), which is what
weaver RL needs to recompute log-probs.
A multi-turn prompt is prefilled in pieces with a prompt-latent block at every earlier assistant turn start
(``turn_points``, ``harness/memgen/turns.py``) and the weaver may first read retrieved text (``weaver_prefix``),
exactly as in generation.

``train_weaver`` is weaver SFT: cross-entropy on target tokens only, gradients reach the weaver (LoRA, heads)
through the frozen reasoner. A short explicit loop instead of ``transformers.Trainer``: Trainer assumes one
forward over a flat tensor batch, while a woven forward is several cached chunks built from ragged rows.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import get_scheduler

from harness.distributed import all_reduce_grads, all_reduce_sum, check_in_sync, rank_slice
from harness.logprobs import token_logprobs
from harness.memgen.turns import TurnChunks, prefill, turn_chunks
from harness.memgen.weaver import MemGenModel, WovenState
from harness.training import IGNORE_INDEX, NonFiniteLossError, training_attention


@dataclass
class WovenRound:
    slot_mask: torch.Tensor  # (B, K) 1 where the row receives latent block r-1
    ids: torch.Tensor  # (B, S) completion segment r, right-padded with pad ids
    mask: torch.Tensor  # (B, S)


@dataclass
class WovenBatch:
    prompt_ids: torch.Tensor  # (B, Lp) left-padded
    prompt_mask: torch.Tensor  # (B, Lp)
    rounds: list[WovenRound]
    turns: TurnChunks | None = None  # the prompts cut at earlier assistant turns (None: no turn latents)
    weaver_prefix: tuple[torch.Tensor, torch.Tensor] | None = None  # (B, R) retrieved-text weaver ids + mask


def left_pad(rows: Sequence[Sequence[int]], pad_id: int,
             device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids (B, L) and mask (B, L) of ragged rows."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        if r:
            ids[b, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
            mask[b, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def delimiter_points(target: Sequence[int], is_delim: torch.Tensor, n: int) -> list[int]:
    """Insertion points inside ``target``: after each of the first ``n`` delimiter tokens that is not the last
    token, as counts of target tokens before the latent block; 0 (the prompt insertion) first."""
    points = [0]
    for i, t in enumerate(target[:-1]):
        if len(points) > n:
            break
        if bool(is_delim[t]):
            points.append(i + 1)
    return points


def build_woven_batch(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    points: Sequence[Sequence[int]],
    k_prompt: int,
    k_infer: int,
    pad_id: int,
    device: torch.device | str = "cpu",
    turn_points: Sequence[Sequence[int]] | None = None,
    weaver_prefix: Sequence[Sequence[int]] | None = None,
    weaver_pad_id: int | None = None,
) -> WovenBatch:
    """Lay out rows for ``woven_forward``; ``points[b]`` starts with 0 and is increasing.

    ``turn_points[b]``: offsets in prompt b where earlier assistant turns start (a prompt-latent block each, as
    ``memgen_generate``); ``weaver_prefix[b]``: weaver-token ids of retrieved text the weaver reads first."""
    B = len(prompts)
    for b, p in enumerate(points):
        if not p or p[0] != 0 or any(x >= y for x, y in zip(p, p[1:], strict=False)) or p[-1] > len(completions[b]):
            raise ValueError(f"insertion points of row {b} must start at 0, increase and stay within the completion; "
                             f"got {list(p)} for {len(completions[b])} tokens")
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    segs = [[list(c[s:e]) for s, e in zip(p, [*p[1:], len(c)], strict=True)] for c, p in zip(completions, points,
                                                                                             strict=True)]
    rounds = []
    for r in range(max(len(s) for s in segs)):
        width = max((len(s[r]) for s in segs if r < len(s)), default=0)
        ids = torch.full((B, width), pad_id, dtype=torch.long)
        mask = torch.zeros((B, width), dtype=torch.long)
        slot = torch.zeros((B, k_prompt if r == 0 else k_infer), dtype=torch.long)
        for b, s in enumerate(segs):
            if r < len(s):
                slot[b] = 1
                ids[b, : len(s[r])] = torch.tensor(s[r], dtype=torch.long)
                mask[b, : len(s[r])] = 1
        rounds.append(WovenRound(slot_mask=slot.to(device), ids=ids.to(device), mask=mask.to(device)))
    turns = turn_chunks(prompts, turn_points, pad_id, device) if turn_points is not None and any(turn_points) else None
    prefix = prefix_batch(weaver_prefix, pad_id if weaver_pad_id is None else weaver_pad_id, device)
    return WovenBatch(prompt_ids.to(device), prompt_mask.to(device), rounds, turns, prefix)


def prefix_batch(rows: Sequence[Sequence[int]] | None, pad_id: int,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor] | None:
    """Left-padded weaver-prefix ids and mask (B, R), or None when no row has one."""
    return left_pad(rows, pad_id, device) if rows is not None and any(rows) else None


def woven_forward(mm: MemGenModel, batch: WovenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicting states (N, d_r) and their target ids (N,) for every completion token of the batch, in the order
    round, then row, then position (the order of ``batch.rounds``' masks).

    Only the work a row needs is done. Round r's segment of row b is *inner* when b weaves again after it (it
    has a round r + 1) and the row's *tail* otherwise. Inner round r runs the reasoner and then the weaver on the
    rows with an inner segment there, on caches restricted to them (``WovenState.feed_rows`` / ``weave_rows``);
    every row's tail (after its last latent block, never read by the weaver) goes into one final chunk of the
    whole batch. Feeding every round to every row instead computed 2.2x the live reasoner slots and 2.1x the live
    weaver slots on ``arith`` GRPO rollouts (rows insert 1 to 6 times; the rows that inserted once carried their
    whole completion as round 0's width)."""
    state = WovenState(mm, w_prefix=batch.weaver_prefix)
    n_rounds = torch.stack([rnd.slot_mask[:, 0] for rnd in batch.rounds], 1).sum(1).tolist()  # (B,) rounds per row
    B, R = len(n_rounds), len(batch.rounds)
    preds, labels, keys = [], [], []  # pieces in the order computed; keys put them back in round-row-position order
    width = max(rnd.ids.shape[1] for rnd in batch.rounds)

    def keep(h: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, rounds: torch.Tensor, rows: torch.Tensor):
        live = mask.bool()  # (n, S)
        preds.append(h[live])
        labels.append(ids[live])
        col = torch.arange(ids.shape[1], device=ids.device)[None, :].expand_as(ids)
        keys.append(((rounds[:, None] * B + rows[:, None]) * width + col)[live])

    with mm.reasoner_mode():
        if batch.turns is not None:
            prefill(state, batch.turns)
            lat = state.weave("prompt")  # (B, K_p, d_r)
        else:  # rows with the same prompt (a GRPO group) share its prefill and prompt latents
            _, lat = state.feed_prompt(batch.prompt_ids, batch.prompt_mask, weave=True)  # lat: (B, K_p, d_r)
        last = list(lat.unbind(0))  # per row, its latest latent block (K, d_r)
        device = lat.device
        for r in range(R - 1):
            rows = torch.tensor([b for b in range(B) if n_rounds[b] > r + 1], dtype=torch.long, device=device)
            rnd = batch.rounds[r]
            seg_mask = rnd.mask[rows]  # (n, S) trimmed to these rows' longest inner segment
            S = int(seg_mask.sum(1).max())
            seg_ids, seg_mask = rnd.ids[rows, :S], seg_mask[:, :S]
            lat_r = torch.stack([last[b] for b in rows.tolist()])  # (n, K, d_r)
            K = lat_r.shape[1]
            h = state.feed_rows(torch.cat([lat_r, mm.embed(seg_ids)], dim=1), rows,
                                torch.cat([seg_mask.new_ones((len(rows), K)), seg_mask], dim=1))  # (n, K + S, d_r)
            keep(h[:, K - 1 : K - 1 + S], seg_ids, seg_mask, torch.full_like(rows, r), rows)
            for b, block in zip(rows.tolist(), state.weave_rows("infer", rows).unbind(0), strict=True):
                last[b] = block  # (K_i, d_r)
        # Every row's tail: its last latent block (left-padded to the widest block, masked) and its last segment.
        tail = [batch.rounds[n - 1] for n in n_rounds]
        S = max(int(t.mask[b].sum()) for b, t in enumerate(tail))
        ids = torch.stack([F.pad(t.ids[b, :S], (0, S - min(S, t.ids.shape[1]))) for b, t in enumerate(tail)])  # (B, S)
        mask = torch.stack([F.pad(t.mask[b, :S], (0, S - min(S, t.mask.shape[1]))) for b, t in enumerate(tail)])
        K = max(x.shape[0] for x in last)
        blocks = torch.stack([torch.cat([x.new_zeros((K - len(x), x.shape[1])), x]) for x in last])  # (B, K, d_r)
        slots = torch.stack([torch.arange(K, device=device) >= K - len(x) for x in last]).to(mask.dtype)  # (B, K)
        h = state.feed(torch.cat([blocks, mm.embed(ids)], dim=1), torch.cat([slots, mask], dim=1))
        all_rows = torch.arange(B, device=device)
        keep(h[:, K - 1 : K - 1 + S], ids, mask, torch.tensor(n_rounds, device=device) - 1, all_rows)
    order = torch.cat(keys).argsort()
    return torch.cat(preds)[order], torch.cat(labels)[order]


def woven_logprobs(mm: MemGenModel, batch: WovenBatch, temperature: float = 1.0) -> torch.Tensor:
    """log p(token) (N,) of every completion token under the woven reasoner (order: round, then row), for the
    sampling distribution ``softmax(logits / temperature)`` (the one rollouts were drawn from)."""
    h, y = woven_forward(mm, batch)
    return token_logprobs(h, mm.lm_head, y, temperature)  # chunked: no (N, V) fp32 tensor kept for backward


def sft_loss(mm: MemGenModel, batch: WovenBatch) -> torch.Tensor:
    h, y = woven_forward(mm, batch)
    return F.cross_entropy(mm.lm_head(h).float(), y, ignore_index=IGNORE_INDEX)


def weaver_update(params: Sequence[torch.nn.Parameter], local_loss: float, optimizer: torch.optim.Optimizer,
                  scheduler: Any, max_grad_norm: float, label: str, where: str = "") -> float:
    """After this process's backward: the global batch's loss (the same on every process), a one-line error if it
    is not finite, gradients summed over the processes, clipped, one optimizer and schedule step (SFT and GRPO)."""
    total = all_reduce_sum([local_loss])[0]
    if not math.isfinite(total):
        raise NonFiniteLossError(f"{label}: loss became {total}{where}; lower the lr")
    all_reduce_grads(params)
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    scheduler.step()
    return total


def pad_id_of(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@dataclass(frozen=True)
class SFTSchedule:
    steps: int
    batch_size: int
    lr: float
    warmup_ratio: float
    scheduler: str
    max_grad_norm: float
    weight_decay: float
    seed: int


def train_weaver(
    mm: MemGenModel,
    rows: Sequence[tuple[list[int], list[int]]],
    is_delim: torch.Tensor,
    n_points: int,
    sch: SFTSchedule,
    label: str = "memgen weaver sft",
    turn_points: Sequence[Sequence[int]] | None = None,
    weaver_prefixes: Sequence[Sequence[int]] | None = None,
    on_step: Callable[..., None] | None = None,
) -> dict[str, Any]:
    """Weaver SFT on (prompt ids, target ids incl. EOS) rows; returns the loss curve and timing.

    ``turn_points`` / ``weaver_prefixes`` (one per row, optional): see ``build_woven_batch``."""
    params = mm.weaver_parameters()
    opt = torch.optim.AdamW(params, lr=sch.lr, weight_decay=sch.weight_decay)
    lr_sched = get_scheduler(sch.scheduler, opt, num_warmup_steps=int(math.ceil(sch.warmup_ratio * sch.steps)),
                             num_training_steps=sch.steps)
    rng = random.Random(sch.seed)
    order: list[int] = []
    device = mm.embed.weight.device
    points = [delimiter_points(t, is_delim, n_points) for _, t in rows]
    losses: list[float] = []
    seen: set[int] = set()
    tokens = 0  # prompt + target tokens through a forward with gradients, over every step and process
    t0 = time.perf_counter()
    # Only the weaver's LoRA dropout trains; the reasoner's modules stay in eval mode (deterministic, frozen).
    # bf16 on CPU: eager attention, whose backward is faster there (harness.training.training_attention).
    with mm.weaver_dropout(True), training_attention(mm.reasoner_lm, mm.peft):
        for step in range(sch.steps):
            if len(order) < sch.batch_size:
                more = list(range(len(rows)))
                rng.shuffle(more)
                order += more
            idx, order = order[: sch.batch_size], order[sch.batch_size :]
            seen.update(idx)
            t_step, lr = time.perf_counter(), opt.param_groups[0]["lr"]  # the rate this step uses
            step_tokens = sum(len(rows[i][0]) + len(rows[i][1]) for i in idx)
            tokens += step_tokens
            # Under a launch: this process's rows of the global batch, its loss weighted by its share of the
            # batch's target tokens, gradients summed (= the single-process token mean; harness.distributed).
            n_all = sum(len(rows[i][1]) for i in idx)
            idx = [idx[j] for j in rank_slice(len(idx))]
            share = sum(len(rows[i][1]) for i in idx) / max(n_all, 1)
            opt.zero_grad(set_to_none=True)
            local = 0.0
            if idx:
                batch = build_woven_batch([rows[i][0] for i in idx], [rows[i][1] for i in idx],
                                          [points[i] for i in idx], mm.opts.k_prompt, mm.opts.k_infer,
                                          mm.tokenizer.pad_token_id, device,
                                          turn_points=None if turn_points is None else [turn_points[i] for i in idx],
                                          weaver_prefix=None if weaver_prefixes is None else [weaver_prefixes[i] for i in idx],
                                          weaver_pad_id=pad_id_of(mm.weaver_tokenizer))
                loss = sft_loss(mm, batch)
                mm.check_trainable(label)
                (loss * share).backward()
                local = loss.item() * share
            total = weaver_update(params, local, opt, lr_sched, sch.max_grad_norm, label, f" at step {step}")
            losses.append(total)
            if on_step is not None:  # progress and the run's tracker: on_step(step, total steps, loss, scalars)
                on_step(step + 1, sch.steps, total, scalars={
                    "learning_rate": lr, "tokens_per_s": step_tokens / max(time.perf_counter() - t_step, 1e-9)})
    check_in_sync(params, label)
    return {"steps": sch.steps, "seconds": time.perf_counter() - t0, "losses": losses, "examples": sorted(seen),
            "optimizer_steps": sch.steps, "train_tokens": tokens, "generated_tokens": 0}
