"""The MemGen memory trigger: p(insert) at each delimiter, trained by policy gradient with the sparsity penalty.

The trigger plugs into ``memgen_generate`` through its ``trigger`` hook. At a delimiter it reads the reasoner's
last-layer state at that token, which attends over every state so far, latents included (the paper's input; the
public code's trigger re-reads raw token ids and never sees latents), and gives p(insert) from a 2-way head. It is
sampled while training and thresholded at ``threshold`` (0.5, i.e. argmax) at evaluation.

Training (weaver frozen, reasoner frozen and decoding greedily while the trigger samples, as the public code): each
prompt is decoded ``group`` times; the rollout's reward is the task score minus the reward-adaptive sparsity penalty
of paper Eq. 8-9 (``harness.rl.sparsity_shaped_rewards``; ``lam`` = 0 is the public code); GRPO-style advantages
per group (``harness.rl.group_advantages``); the loss is -A * log pi(d) over the rollout's decisions (one gradient
step per batch, so the PPO ratio is 1), averaged per rollout then over the batch.

Two trigger models (``memgen`` option ``trigger_model``):
- ``lora`` (``TriggerLM``, ``harness/memgen/trigger_lm.py``; the paper's trigger): its own LoRA
  adapter on the shared base reads the reasoner's states so far, latents included, with its own KV cache during
  decoding; training recomputes the decisions' log-probs in one forward over the recorded states.
- ``head`` (``TriggerHead``, the cheap option): LayerNorm + Linear(d, 2), zero-initialised so it starts at p = 0.5,
  on the reasoner's own state at the delimiter (which attends over every state so far, latents included); the
  states are recorded during decoding, so training needs no second forward pass and gradients reach only the head.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from harness import rl
from harness.distributed import (
    all_reduce_grads,
    all_reduce_sum,
    check_in_sync,
    gather_rows,
    rank_seed,
    rank_slice,
)
from harness.memgen.generation import TriggerContext, completion_length, memgen_generate
from harness.memgen.trigger_lm import TriggerHead, TriggerLM, TriggerSession
from harness.memgen.weaver import MemGenModel
from harness.training import NonFiniteLossError
from tasks.base import Example, Task

POLICIES = ("sample", "threshold", "always")
__all__ = ["TriggerHead", "TriggerLM", "TriggerRecorder", "TriggerSchedule", "train_trigger"]


TRIGGER_FILE = "trigger_head.safetensors"


def save_head(head: TriggerHead, folder: Path) -> None:
    """Write the trigger head into ``folder`` (a checkpoint directory)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(folder / TRIGGER_FILE))


def load_head(folder: Path, device: torch.device | str = "cpu") -> TriggerHead:
    """The trigger head saved by ``save_head``; its width comes from the saved weights."""
    from safetensors.torch import load_file

    path = folder / TRIGGER_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the checkpoint has no trained trigger (train one or drop it)")
    state = load_file(str(path), device=str(device))
    head = TriggerHead(state["out.weight"].shape[1]).to(device)
    head.load_state_dict(state)
    return head


TRIGGER_LM_FILE = "trigger_lm.safetensors"


def save_trigger(trigger: TriggerHead | TriggerLM, folder: Path) -> None:
    """Write a trained trigger into ``folder``: the head, or the LoRA trigger's adapter, projection and head."""
    from safetensors.torch import save_file

    if isinstance(trigger, TriggerHead):
        save_head(trigger, folder)
        return
    folder.mkdir(parents=True, exist_ok=True)
    state = {**{f"own.{k}": v for k, v in trigger.state_dict().items()},
             **{f"adapter.{k}": v for k, v in trigger.adapter_state().items()}}
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(folder / TRIGGER_LM_FILE))


def load_trigger(trigger: TriggerHead | TriggerLM, folder: Path) -> None:
    """Load what ``save_trigger`` wrote into an existing trigger of the same kind and size."""
    from safetensors.torch import load_file

    name = TRIGGER_FILE if isinstance(trigger, TriggerHead) else TRIGGER_LM_FILE
    if not (folder / name).exists():
        raise FileNotFoundError(f"{folder / name} not found: the checkpoint has no trained trigger of this kind "
                                f"(memgen option trigger_model must match the run that saved it)")
    state = load_file(str(folder / name), device=str(next(trigger.parameters()).device))
    if isinstance(trigger, TriggerHead):
        trigger.load_state_dict(state)
        return
    trigger.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("own.")})
    trigger.load_adapter_state({k[8:]: v for k, v in state.items() if k.startswith("adapter.")})


@dataclass
class TriggerRecorder:
    """The ``trigger`` hook of ``memgen_generate``; records every decision and what it was made on.

    Use one recorder per ``memgen_generate`` call (the LoRA trigger's session is that batch's KV cache)."""

    head: TriggerHead | TriggerLM | None
    """The trigger model; None = always insert."""
    policy: str = "threshold"
    """sample (Bernoulli(p), training), threshold (p >= threshold, evaluation) or always (insert at every one)."""
    threshold: float = 0.5
    """Evaluation inserts where p(insert) >= threshold."""
    generator: torch.Generator | None = None
    """Seeds the Bernoulli samples."""
    keep_states: bool = True
    """Keep the head trigger's states per decision (training needs them; evaluation only counts decisions)."""
    rows: list[torch.Tensor] = field(default_factory=list)
    """Per query, the (n,) candidate rows asked."""
    states: list[torch.Tensor] = field(default_factory=list)
    """Per query, the (n, d) reasoner states at the delimiter (head trigger only)."""
    slots: list[torch.Tensor] = field(default_factory=list)
    """Per query, the (n,) slot of the delimiter in the observed state sequence (LoRA trigger only)."""
    decisions: list[torch.Tensor] = field(default_factory=list)
    """Per query, the (n,) bool decisions."""
    session: TriggerSession | None = None
    """The LoRA trigger's KV cache over the reasoner states of this batch (created on the first ``observe``)."""
    delimiters: list[int] = field(default_factory=list)
    """Per row, every delimiter generated (asked or not; set by ``decode_with``): the paper's rate denominator."""
    lengths: list[int] = field(default_factory=list)
    """Per row, the generated tokens up to and including the stop token (set by ``decode_with``)."""

    @property
    def _lora(self) -> bool:
        return isinstance(self.head, TriggerLM) and self.policy != "always"

    @property
    def wants_states(self) -> bool:
        """Only the LoRA trigger reads the reasoner's states; for the others decoding skips ``observe`` (and may
        then share a group's prompt and drop finished rows)."""
        return self._lora

    def observe(self, states: torch.Tensor, mask: torch.Tensor) -> None:
        """Called by ``WovenState.feed`` with every chunk (B, T, d_r) / (B, T) the reasoner is fed."""
        if not self._lora:
            return
        if self.session is None:
            self.session = TriggerSession(self.head, keep=self.policy == "sample")  # type: ignore[arg-type]
        self.session.observe(states, mask)

    def __call__(self, ctx: TriggerContext) -> torch.Tensor:
        idx = ctx.candidates.nonzero().flatten()  # (n,)
        h = ctx.hidden[idx].detach()  # (n, d)
        if self.policy == "always" or self.head is None:
            d = torch.ones(len(idx), dtype=torch.bool, device=h.device)
        else:
            if self._lora:
                p_all, slot = self.session.query()  # type: ignore[union-attr]  # (B,), (B,)
                p = p_all[idx]
                self.slots.append(slot[idx])
            else:
                with torch.no_grad():
                    p = torch.softmax(self.head(h).float(), -1)[:, 1]  # (n,)
            if self.policy == "sample":
                d = torch.bernoulli(p, generator=self.generator).bool()
            else:
                d = p >= self.threshold
        self.rows.append(idx)
        if not self._lora and self.keep_states:
            self.states.append(h.clone())
        self.decisions.append(d)
        out = torch.zeros_like(ctx.candidates)
        out[idx] = d
        return out

    def counts(self, batch: int) -> tuple[list[int], list[int]]:
        """Per row: delimiters where the trigger was asked, and where it inserted."""
        asked, inserted = [0] * batch, [0] * batch
        for r, d in zip(self.rows, self.decisions, strict=True):
            for b, x in zip(r.tolist(), d.tolist(), strict=True):
                asked[b] += 1
                inserted[b] += int(x)
        return asked, inserted

    def _layout(self, batch: int, values: list[torch.Tensor], fill: torch.Tensor) -> torch.Tensor:
        """Per-query values (n, ...) laid out per row in decoding order: (B, J, ...), J = most queries of a row."""
        rows = torch.cat(self.rows).cpu() if self.rows else torch.zeros(0, dtype=torch.long)
        counts = torch.bincount(rows, minlength=batch) if len(rows) else torch.zeros(batch, dtype=torch.long)
        out = fill.expand(batch, max(int(counts.max()), 1), *fill.shape).clone()
        k = [0] * batch
        for r, v in zip(self.rows, values, strict=True):
            for j, b in enumerate(r.tolist()):
                out[b, k[b]] = v[j]
                k[b] += 1
        return out

    def grid(self, batch: int, d_model: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decisions laid out per rollout: states (B, J, d), decisions (B, J) and mask (B, J) (head trigger)."""
        states = self._layout(batch, [h.float().cpu() for h in self.states], torch.zeros(d_model))
        dec, mask = self._decisions(batch)
        return states, dec, mask

    def _decisions(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        dec = self._layout(batch, [d.long().cpu() for d in self.decisions], torch.tensor(0))  # (B, J)
        mask = self._layout(batch, [torch.ones(len(r), dtype=torch.long) for r in self.rows], torch.tensor(0))
        return dec, mask

    def decision_logits(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits (B, J, 2) of every recorded decision recomputed with gradients, decisions (B, J), mask (B, J)."""
        dec, mask = self._decisions(batch)
        if isinstance(self.head, TriggerHead):
            states, _, _ = self.grid(batch, self.head.out.weight.shape[1])
            device = self.head.out.weight.device
            return self.head(states.to(device)).float(), dec.to(device), mask.to(device)
        assert isinstance(self.head, TriggerLM)
        device = self.head.proj_in.weight.device
        if self.session is None or not self.slots:  # nothing was asked: no decision to learn from
            return torch.zeros((*dec.shape, 2), device=device), dec.to(device), mask.to(device)
        slots = self._layout(batch, [s.cpu() for s in self.slots], torch.tensor(0))  # (B, J); padding reads slot 0
        states, smask = self.session.sequence()  # (B, L, d_r), (B, L)
        return self.head.decision_logits(states, smask, slots.to(device)), dec.to(device), mask.to(device)


@dataclass(frozen=True)
class TriggerSchedule:
    """One task's trigger training."""

    steps: int
    """Optimizer steps (one rollout batch each)."""
    prompts_per_step: int
    """Prompts per step; the batch is prompts_per_step * group rollouts."""
    group: int = 8
    """Rollouts per prompt."""
    lr: float = 1e-3
    """AdamW learning rate of the trigger."""
    max_grad_norm: float = 1.0
    """Gradient clipping."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    seed: int = 0
    """Seeds prompt order and the trigger's samples."""
    max_new_tokens: int = 64
    """Completion budget of each rollout."""
    lam: float = 0.0
    """Sparsity penalty weight lambda of paper Eq. 8 (0 = the public code: task reward only)."""
    scale: str = "group"
    """Advantage scaling: group, batch or none."""
    aggregation: str = "sequence"
    """Loss aggregation over a rollout's decisions: sequence (per-rollout mean, then the batch) or token (TRL's
    ``bnpo``: mean over every decision of the batch; the public code's trigger GRPO)."""
    rate: str = "delimiters"
    """Invocation-rate denominator of the sparsity penalty: ``delimiters`` (every delimiter of the rollout, the
    paper's |tau_i|) or ``queried`` (only those the trigger was asked at, under the insertion cap)."""
    trigger_prompt: bool = False
    """The trigger also decides the prompt insertion (one more decision per rollout, as the public code)."""


def _left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, P)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, P)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = torch.tensor(list(r))
        mask[b, width - len(r):] = 1
    return ids, mask


def decode_with(mm: MemGenModel, rec: TriggerRecorder, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                is_delim: torch.Tensor, trigger_prompt: bool | None = None) -> list[str]:
    """Greedy MemGen decoding of ``prompts`` with ``rec`` deciding at each delimiter (and at the prompt with
    ``trigger_prompt``, default: the ``memgen`` option); the completions' text. ``rec.delimiters`` gets each row's
    delimiter count."""
    tok = mm.tokenizer
    trigger_prompt = mm.opts.trigger_prompt if trigger_prompt is None else trigger_prompt
    ids, mask = _left_pad(prompts, tok.pad_token_id)
    device = mm.embed.weight.device
    mm.eval()
    out = memgen_generate(mm, ids.to(device), mask.to(device), max_new_tokens, insert=True, trigger=rec,
                          delimiters=is_delim, temperature=0.0, eos_token_ids=mm.stop_ids(),
                          trigger_prompt=trigger_prompt)
    rec.delimiters = [n + int(trigger_prompt) for n in out.delimiters]  # the prompt is one more decision point
    stops = set(mm.stop_ids())
    rec.lengths = [completion_length(row, stops) for row in out.sequences.tolist()]
    return [tok.decode(s, skip_special_tokens=True) for s in out.sequences]


def _params(trigger: TriggerHead | TriggerLM) -> list[torch.nn.Parameter]:
    return trigger.parameters_to_train() if isinstance(trigger, TriggerLM) else list(trigger.parameters())


def _check_trainable(trigger: TriggerHead | TriggerLM, label: str) -> None:
    """Before a backward: every trigger parameter requires grad (nothing silently frozen by an adapter switch)."""
    lost = [i for i, p in enumerate(_params(trigger)) if not p.requires_grad]
    if lost:
        raise RuntimeError(f"{label}: {len(lost)} trigger parameter tensors lost requires_grad before backward")


def train_trigger(
    mm: MemGenModel,
    head: TriggerHead | TriggerLM,
    task: Task,
    examples: Sequence[Example],
    is_delim: torch.Tensor,
    sch: TriggerSchedule,
    label: str = "memgen trigger",
    on_step: Callable[..., None] | None = None,
) -> dict[str, Any]:
    """Policy-gradient training of the trigger ``head`` (a ``TriggerHead`` or a ``TriggerLM``); reasoner and weaver
    untouched. Returns the loss, mean-reward and insertion-rate curves and timing."""
    import random

    tok = mm.tokenizer
    prompts = [tok(task.prompt(e, tok), add_special_tokens=False).input_ids for e in examples]
    params = _params(head)
    opt = torch.optim.AdamW(params, lr=sch.lr, weight_decay=sch.weight_decay)
    rng = random.Random(sch.seed)
    gen = torch.Generator(device=mm.embed.weight.device).manual_seed(rank_seed(sch.seed))  # per process
    order: list[int] = []
    stats: dict[str, list[float]] = {"losses": [], "rewards": [], "insert_rate": []}
    seen: set[int] = set()
    generated = tokens = 0
    t0 = time.perf_counter()
    lora = isinstance(head, TriggerLM)
    for step in range(sch.steps):
        if len(order) < sch.prompts_per_step:
            more = list(range(len(examples)))
            rng.shuffle(more)
            order += more
        idx, order = order[: sch.prompts_per_step], order[sch.prompts_per_step :]
        t_step, lr, tokens_before = time.perf_counter(), opt.param_groups[0]["lr"], generated + tokens
        rec = TriggerRecorder(head, policy="sample", generator=gen)
        rows = [prompts[i] for i in idx for _ in range(sch.group)]
        seen.update(idx)
        # Under a launch this process decodes its rank_slice of the rollouts (no collective while decoding); the
        # rewards and decisions are gathered so that the sparsity penalty and advantages span whole groups, and
        # the trigger's gradients are summed over the processes (harness.distributed).
        mine = rank_slice(len(rows))
        texts = (decode_with(mm, rec, [rows[b] for b in mine], sch.max_new_tokens, is_delim, sch.trigger_prompt)
                 if len(mine) else [])
        if lora:
            head.set_adapter_trainable(True)  # off outside trigger training, so the weaver never lists it
        try:
            opt.zero_grad(set_to_none=True)
            local: list[tuple[float, list[int], int, int]] = []
            if len(mine):
                logits, dec_l, mask_l = rec.decision_logits(len(mine))  # (B_l, J, 2), (B_l, J), (B_l, J)
                local = [(float(task.score(t, examples[idx[b // sch.group]])), d[m.bool()].tolist(), n, g)
                         for b, t, d, m, n, g in zip(mine, texts, dec_l.cpu(), mask_l.cpu(), rec.delimiters,
                                                     rec.lengths, strict=True)]
            every = gather_rows(mine, local, len(rows))  # (reward, decisions, delimiters, length) of every rollout
            rewards = torch.tensor([r for r, _, _, _ in every])  # (B,)
            width = max([len(d) for _, d, _, _ in every] + [1])
            dec = torch.tensor([d + [0] * (width - len(d)) for _, d, _, _ in every], dtype=torch.long)  # (B, J)
            mask = torch.tensor([[1] * len(d) + [0] * (width - len(d)) for _, d, _, _ in every], dtype=torch.long)
            totals = torch.tensor([n for _, _, n, _ in every]) if sch.rate == "delimiters" else None  # (B,)
            generated += sum(g for _, _, _, g in every)
            if lora:  # the LoRA trigger re-reads prompt + completion with gradients (the head trigger: no LM pass)
                tokens += sum(g for _, _, _, g in every) + sum(len(r) for r in rows)
            shaped = rl.sparsity_shaped_rewards(rewards, dec, mask, sch.group, sch.lam, totals)  # (B,)
            adv = rl.group_advantages(shaped, sch.group, sch.scale)  # type: ignore[arg-type]
            local_loss = 0.0
            if len(mine):
                logp = torch.log_softmax(logits, -1).gather(-1, dec_l[..., None])[..., 0]  # (B_l, J)
                loss, _ = rl.policy_loss(logp, logp.detach(), adv[mine.start:mine.stop].to(logp.device), mask_l,
                                         aggregation=sch.aggregation)  # type: ignore[arg-type]
                # this process's share of the loss's normaliser (rollouts, or decisions for token aggregation)
                share = (int(mask_l.sum()) / max(int(mask.sum()), 1) if sch.aggregation == "token"
                         else len(mine) / len(rows))
                if loss.requires_grad:  # False only when no delimiter was queried in this process's rollouts
                    _check_trainable(head, label)
                    (loss * share).backward()
                local_loss = loss.item() * share
            total = all_reduce_sum([local_loss])[0]
            if not math.isfinite(total):
                raise NonFiniteLossError(f"{label}: loss became {total} at step {step}; lower the lr")
            if all_reduce_grads(params):  # False only when no delimiter was queried in the whole batch
                torch.nn.utils.clip_grad_norm_(params, sch.max_grad_norm)
                opt.step()
        finally:
            if lora:
                head.set_adapter_trainable(False)
        stats["losses"].append(total)
        stats["rewards"].append(float(rewards.mean()))
        stats["insert_rate"].append(float((dec * mask).sum() / mask.sum().clamp(min=1)))
        if on_step is not None:  # progress and the run's tracker: on_step(step, total steps, loss, scalars)
            # tokens/s: generated tokens (+ those the LoRA trigger re-reads with gradients) per second of the step
            on_step(step + 1, sch.steps, total, scalars={
                "reward": stats["rewards"][-1], "insert_rate": stats["insert_rate"][-1], "learning_rate": lr,
                "tokens_per_s": (generated + tokens - tokens_before) / max(time.perf_counter() - t_step, 1e-9)})
    check_in_sync(params, label)
    return {"steps": sch.steps, "seconds": time.perf_counter() - t0, **stats, "examples": sorted(seen),
            "optimizer_steps": sch.steps, "train_tokens": tokens, "generated_tokens": generated,
            "trainable_params": sum(p.numel() for p in params)}


def evaluate_trigger(
    mm: MemGenModel,
    head: TriggerHead | TriggerLM,
    task: Task,
    examples: Sequence[Example],
    is_delim: torch.Tensor,
    max_new_tokens: int,
    batch_size: int = 16,
) -> dict[str, float]:
    """Accuracy (mean task score, percent) and insertions per queried delimiter, trained trigger vs always-insert."""
    tok = mm.tokenizer
    prompts = [tok(task.prompt(e, tok), add_special_tokens=False).input_ids for e in examples]
    out: dict[str, float] = {}
    for name, policy in (("trigger", "threshold"), ("always", "always")):
        scores, inserted, asked = [], 0, 0
        for s in range(0, len(prompts), batch_size):
            rec = TriggerRecorder(head, policy=policy)
            texts = decode_with(mm, rec, prompts[s : s + batch_size], max_new_tokens, is_delim)
            scores += [float(task.score(t, e)) for t, e in zip(texts, examples[s : s + batch_size], strict=True)]
            n_asked, n_inserted = rec.counts(len(texts))
            inserted += sum(n_inserted)
            asked += sum(n_asked)
        out[f"accuracy_{name}"] = 100.0 * sum(scores) / max(len(scores), 1)
        out[f"insert_rate_{name}"] = inserted / max(asked, 1)
    return out
