"""MemGen weaver GRPO: rollouts with latents woven in, log-probs re-woven at the recorded points, weaver-only updates.

One step: each prompt is repeated ``group`` times and decoded by ``memgen_generate`` at ``temperature`` (latents
after the prompt and at delimiters, the insertion points recorded per row); the task's scorer gives the rewards;
``harness.rl.group_advantages`` normalises them per group ((r - mean) / (std + 1e-4)); the completions are laid out
again with the latents re-woven at exactly the recorded points (``build_woven_batch``) and their log-probs
recomputed with gradients. The reasoner is frozen, so the gradient reaches only the weaver (LoRA, queries, heads).

As in the MemGen public code: beta = 0 (no KL, no reference), one gradient step per batch (the PPO ratio is 1, so
the loss is the plain policy gradient -A * log p), group 8. The recomputed log-probs are those of the policy that
sampled: the same temperature (``log_softmax(logits / T)``), the latents re-woven at the rollout's recorded points,
and LoRA dropout off in both the rollout and the recompute (tested to 1e-5). Departures from the public code: it
re-weaves at the first-N-delimiter rule, which can differ from where the rollout inserted, and it recomputes with
LoRA dropout on (the policy that sampled had it off). Loss aggregation (``aggregation``: ``sequence`` = GRPO's
per-sequence mean, ``token`` = TRL's ``bnpo``, the public code's choice for GSM8K) and advantage scaling
(``scale``) are options (``memgen`` options ``grpo_aggregation`` / ``grpo_scale``).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import get_scheduler

from harness import rl
from harness.config import RunConfig
from harness.distributed import (
    check_in_sync,
    gather_rows,
    rank_seed,
    rank_slice,
)
from harness.memgen.generation import completion_length, memgen_generate
from harness.memgen.sft import WovenBatch, build_woven_batch, weaver_update, woven_logprobs
from harness.memgen.weaver import MemGenModel
from harness.training import training_attention
from tasks.base import Example, Task


@dataclass(frozen=True)
class WeaverGRPOSchedule:
    """One task's weaver GRPO run."""

    steps: int
    """Optimizer steps (one rollout batch each)."""
    prompts_per_step: int
    """Prompts per step; the batch is prompts_per_step * group rollouts."""
    group: int
    """Rollouts per prompt (the paper and public code: 8)."""
    lr: float
    """Peak learning rate of AdamW."""
    warmup_ratio: float
    """Linear warm-up fraction of the steps."""
    scheduler: str
    """transformers schedule name (cosine, linear, constant)."""
    max_grad_norm: float
    """Gradient clipping."""
    weight_decay: float
    """AdamW weight decay."""
    seed: int
    """Seeds prompt order and rollout sampling."""
    max_new_tokens: int
    """Completion budget of each rollout."""
    temperature: float = 1.0
    """Rollout sampling temperature (the public code: 1.0)."""
    scale: str = "group"
    """Advantage scaling: group, batch or none (``harness.rl.group_advantages``)."""
    aggregation: str = "sequence"
    """Loss aggregation: sequence (GRPO), token or constant (``harness.rl.policy_loss``)."""


def schedule_from_config(cfg: RunConfig, seed: int, n_examples: int, max_new_tokens: int, group: int = 8,
                         prompts_per_step: int = 1, lr: float | None = None) -> WeaverGRPOSchedule:
    """The schedule the ``memgen`` method would use: steps, lr and schedule from ``train.*`` like its SFT stage."""
    t = cfg.train
    steps = t.max_steps or max(1, round(t.epochs * n_examples / prompts_per_step))
    return WeaverGRPOSchedule(steps=steps, prompts_per_step=prompts_per_step, group=group, lr=lr or t.lr,
                              warmup_ratio=t.warmup_ratio, scheduler=t.scheduler, max_grad_norm=t.max_grad_norm,
                              weight_decay=t.weight_decay, seed=seed, max_new_tokens=max_new_tokens)


@dataclass
class WeaverRollouts:
    prompts: list[list[int]]  # per rollout, the prompt ids (unpadded)
    completions: list[list[int]]  # generated ids up to and including the first stop token
    points: list[list[int]]  # insertion points: generated tokens before each latent block (0 = prompt insertion)
    texts: list[str]
    logprobs: list[list[float]] | None = None  # per completion token, log p under the sampling policy (if asked)


def sample_rollouts(
    mm: MemGenModel,
    prompt_ids: Sequence[Sequence[int]],
    group: int,
    max_new_tokens: int,
    is_delim: torch.Tensor,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    keep_logprobs: bool = False,
) -> WeaverRollouts:
    """``group`` sampled MemGen completions per prompt (rows of one prompt contiguous), insertion points kept.

    Decoded with the weaver's LoRA dropout off (``weaver_policy_loss`` recomputes with it off too)."""
    tok = mm.tokenizer
    rows = [list(p) for p in prompt_ids for _ in range(group)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)  # (B, P) left-padded
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, P)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = torch.tensor(r)
        mask[b, width - len(r):] = 1
    device = mm.embed.weight.device
    stops = mm.stop_ids()
    mm.eval()
    out = memgen_generate(mm, ids.to(device), mask.to(device), max_new_tokens, insert=True, delimiters=is_delim,
                          temperature=temperature, eos_token_ids=stops, generator=generator,
                          output_logprobs=keep_logprobs)
    completions, points, logprobs = [], [], []
    for b in range(len(rows)):
        seq = out.sequences[b].tolist()
        end = completion_length(seq, stops)
        completions.append(seq[:end])
        points.append([p for p in out.insertions[b] if p < end] or [0])
        if out.logprobs is not None:
            logprobs.append(out.logprobs[b, :end].tolist())
    texts = [tok.decode(c, skip_special_tokens=True) for c in completions]
    return WeaverRollouts(rows, completions, points, texts, logprobs if keep_logprobs else None)


def token_grid(batch: WovenBatch, points: Sequence[Sequence[int]], flat: torch.Tensor, width: int):
    """Place ``woven_logprobs``' flat (N,) values (order: round, then row, then position) into (B, width).

    Returns the grid and its 0/1 mask; position t of row b is completion token t of that row."""
    B = batch.prompt_ids.shape[0]
    starts = torch.zeros((B, len(batch.rounds)), dtype=torch.long, device=flat.device)  # (B, R)
    for b, p in enumerate(points):
        starts[b, : len(p)] = torch.tensor(list(p), dtype=torch.long)
    rows, cols = [], []
    for r, rnd in enumerate(batch.rounds):
        nz = rnd.mask.nonzero()  # (n_r, 2) row-major, the order boolean indexing uses in woven_forward
        rows.append(nz[:, 0])
        cols.append(starts[nz[:, 0], r] + nz[:, 1])
    row, col = torch.cat(rows), torch.cat(cols)
    grid = torch.zeros((B, width), dtype=flat.dtype, device=flat.device).index_put((row, col), flat)  # (B, T)
    mask = torch.zeros((B, width), dtype=torch.long, device=flat.device).index_put(
        (row, col), torch.ones_like(row))  # (B, T)
    return grid, mask


def rollout_logprobs(mm: MemGenModel, ro: WeaverRollouts, temperature: float = 1.0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """log p (B, T) of every rollout token with the latents re-woven at the recorded points, and its mask (B, T)."""
    device = mm.embed.weight.device
    batch = build_woven_batch(ro.prompts, ro.completions, ro.points, mm.opts.k_prompt, mm.opts.k_infer,
                              mm.tokenizer.pad_token_id, device)
    flat = woven_logprobs(mm, batch, temperature)  # (N,)
    return token_grid(batch, ro.points, flat, max(len(c) for c in ro.completions))


def weaver_policy_loss(
    mm: MemGenModel, ro: WeaverRollouts, advantages: torch.Tensor, aggregation: str = "sequence",
    temperature: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Policy-gradient loss of the rollouts with the latents re-woven at their recorded points. Scalar."""
    device = mm.embed.weight.device
    logp, mask = rollout_logprobs(mm, ro, temperature)  # (B, T)
    width = logp.shape[1]
    # One gradient step per batch: old log-probs are these log-probs detached, so the ratio is exactly 1.
    return rl.policy_loss(logp, logp.detach(), advantages.to(device), mask, aggregation=aggregation,  # type: ignore[arg-type]
                          max_len=width)


def weaver_optimizer(mm: MemGenModel, sch: WeaverGRPOSchedule) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over the weaver's parameters and the schedule of ``sch``."""
    opt = torch.optim.AdamW(mm.weaver_parameters(), lr=sch.lr, weight_decay=sch.weight_decay)
    return opt, get_scheduler(sch.scheduler, opt, num_warmup_steps=int(math.ceil(sch.warmup_ratio * sch.steps)),
                              num_training_steps=sch.steps)


def weaver_grpo_step(
    mm: MemGenModel,
    task: Task,
    batch: Sequence[Example],
    prompt_ids: Sequence[Sequence[int]],
    is_delim: torch.Tensor,
    sch: WeaverGRPOSchedule,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generator: torch.Generator | None = None,
    label: str = "memgen weaver grpo",
) -> dict[str, float]:
    """Roll out ``group`` completions per prompt, score, normalise per group and take one weaver step.

    Under a launch this process rolls out and scores its ``rank_slice`` of the batch's rollouts (no collective
    while decoding); rewards and lengths are gathered so every process computes the same advantages and loss
    normaliser, and the weaver's gradients are summed over the processes (``harness.distributed``)."""
    n_rows = len(prompt_ids) * sch.group
    rows = rank_slice(n_rows)  # rollout b samples prompt b // group
    ro = sample_rollouts(mm, [prompt_ids[b // sch.group] for b in rows], 1, sch.max_new_tokens, is_delim,
                         sch.temperature, generator) if len(rows) else None
    local = [] if ro is None else [(float(task.score(t, batch[b // sch.group])), len(c), len(p) - 1)
                                   for b, t, c, p in zip(rows, ro.texts, ro.completions, ro.points, strict=True)]
    every = gather_rows(rows, local, n_rows)  # (reward, length, insertions) of every rollout of the batch
    rewards = torch.tensor([r for r, _, _ in every])  # (B,)
    lengths = [n for _, n, _ in every]
    adv = rl.group_advantages(rewards, sch.group, sch.scale)  # type: ignore[arg-type]
    # this process's share of the loss's normaliser (tokens, rows, or rows x longest completion)
    if sch.aggregation == "token":
        share = sum(lengths[b] for b in rows) / max(sum(lengths), 1)
    elif sch.aggregation == "constant":
        share = len(rows) * max((lengths[b] for b in rows), default=0) / (n_rows * max(lengths))
    else:
        share = len(rows) / n_rows
    params = mm.weaver_parameters()
    # LoRA dropout stays off (as in the rollout): the recomputed log-probs are the sampling policy's, ratio 1.
    mm.eval()
    optimizer.zero_grad(set_to_none=True)
    local_loss = 0.0
    if ro is not None:
        with training_attention(mm.reasoner_lm, mm.peft):  # bf16 on CPU: eager attention's backward is faster
            loss, _ = weaver_policy_loss(mm, ro, adv[rows.start:rows.stop], sch.aggregation, sch.temperature)
            mm.check_trainable(label)
            (loss * share).backward()
        local_loss = loss.item() * share
    total = weaver_update(params, local_loss, optimizer, scheduler, sch.max_grad_norm, label)
    return {"loss": total, "reward": float(rewards.mean()), "insertions": sum(i for _, _, i in every) / n_rows,
            "length": sum(lengths) / n_rows, "generated": sum(lengths),
            "tokens": sum(lengths) + sch.group * sum(len(p) for p in prompt_ids)}


def train_weaver_grpo(
    mm: MemGenModel,
    task: Task,
    examples: Sequence[Example],
    is_delim: torch.Tensor,
    sch: WeaverGRPOSchedule,
    label: str = "memgen weaver grpo",
    on_step: Callable[..., None] | None = None,
) -> dict[str, Any]:
    """Weaver GRPO on ``task``'s scorer; returns the loss and mean-reward curves, insertion counts and timing."""
    tok = mm.tokenizer
    opt, lr_sched = weaver_optimizer(mm, sch)
    prompts = [tok(task.prompt(e, tok), add_special_tokens=False).input_ids for e in examples]
    rng = random.Random(sch.seed)
    gen = torch.Generator(device=mm.embed.weight.device).manual_seed(rank_seed(sch.seed))  # per process
    order: list[int] = []
    stats: dict[str, list[float]] = {"losses": [], "rewards": [], "insertions": []}
    seen: set[int] = set()
    generated = tokens = 0
    t0 = time.perf_counter()
    for step in range(sch.steps):
        if len(order) < sch.prompts_per_step:
            more = list(range(len(examples)))
            rng.shuffle(more)
            order += more
        idx, order = order[: sch.prompts_per_step], order[sch.prompts_per_step :]
        t_step, lr = time.perf_counter(), opt.param_groups[0]["lr"]  # the rate this step uses
        st = weaver_grpo_step(mm, task, [examples[i] for i in idx], [prompts[i] for i in idx], is_delim, sch, opt,
                              lr_sched, gen, label)
        seen.update(idx)
        generated += int(st["generated"])
        tokens += int(st["tokens"])
        stats["losses"].append(st["loss"])
        stats["rewards"].append(st["reward"])
        stats["insertions"].append(st["insertions"])
        if on_step is not None:  # progress and the run's tracker: on_step(step, total steps, loss, scalars)
            on_step(step + 1, sch.steps, st["loss"], scalars={
                "reward": st["reward"], "insertions": st["insertions"], "completion_length": st["length"],
                "learning_rate": lr, "tokens_per_s": st["tokens"] / max(time.perf_counter() - t_step, 1e-9)})
    check_in_sync(mm.weaver_parameters(), label)
    return {"steps": sch.steps, "seconds": time.perf_counter() - t0, **stats, "examples": sorted(seen),
            "optimizer_steps": sch.steps, "train_tokens": tokens, "generated_tokens": generated}
