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

Departure from the issue/paper: the trigger here is a head (LayerNorm + Linear(d, 2), zero-initialised so it
starts at p = 0.5) on the reasoner's own state, not a separate LoRA-adapted LM re-reading the sequence; the states
are recorded during decoding, so training needs no second forward pass and gradients reach only the head.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness import rl
from harness.generation import stop_token_ids
from harness.memgen.generation import TriggerContext, memgen_generate
from harness.memgen.weaver import MemGenModel
from harness.training import NonFiniteLossError
from tasks.base import Example, Task

POLICIES = ("sample", "threshold", "always")


class TriggerHead(nn.Module):
    """p(insert) from the reasoner's state at a delimiter: LayerNorm then Linear(d, 2) (0 = skip, 1 = insert)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, 2)
        nn.init.zeros_(self.out.weight)  # p = 0.5 everywhere at the start: maximal exploration
        nn.init.zeros_(self.out.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(hidden.to(self.out.weight.dtype)))  # (..., 2) logits


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


@dataclass
class TriggerRecorder:
    """The ``trigger`` hook of ``memgen_generate``; records every decision and the state it was made on."""

    head: TriggerHead | None
    policy: str = "threshold"
    """sample (Bernoulli(p), training), threshold (p >= threshold, evaluation) or always (insert at every one)."""
    threshold: float = 0.5
    generator: torch.Generator | None = None
    rows: list[torch.Tensor] = field(default_factory=list)
    states: list[torch.Tensor] = field(default_factory=list)
    decisions: list[torch.Tensor] = field(default_factory=list)

    def __call__(self, ctx: TriggerContext) -> torch.Tensor:
        idx = ctx.candidates.nonzero().flatten()  # (n,)
        h = ctx.hidden[idx].detach()  # (n, d)
        if self.policy == "always" or self.head is None:
            d = torch.ones(len(idx), dtype=torch.bool, device=h.device)
        else:
            with torch.no_grad():
                p = torch.softmax(self.head(h).float(), -1)[:, 1]  # (n,)
            if self.policy == "sample":
                d = torch.bernoulli(p, generator=self.generator).bool()
            else:
                d = p >= self.threshold
        self.rows.append(idx)
        self.states.append(h.clone())
        self.decisions.append(d)
        out = torch.zeros_like(ctx.candidates)
        out[idx] = d
        return out

    def grid(self, batch: int, d_model: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decisions laid out per rollout: states (B, J, d), decisions (B, J) and mask (B, J), J = most per row."""
        rows = torch.cat(self.rows) if self.rows else torch.zeros(0, dtype=torch.long)
        counts = torch.bincount(rows, minlength=batch) if len(rows) else torch.zeros(batch, dtype=torch.long)
        J = max(int(counts.max()), 1)
        states = torch.zeros(batch, J, d_model)
        dec = torch.zeros(batch, J, dtype=torch.long)
        mask = torch.zeros(batch, J, dtype=torch.long)
        fill = [0] * batch
        for r, h, d in zip(self.rows, self.states, self.decisions, strict=True):  # in decoding order
            for k, b in enumerate(r.tolist()):
                states[b, fill[b]] = h[k].float()
                dec[b, fill[b]] = int(d[k])
                mask[b, fill[b]] = 1
                fill[b] += 1
        return states, dec, mask


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
    """AdamW learning rate of the head."""
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


def _left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, P)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, P)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = torch.tensor(list(r))
        mask[b, width - len(r):] = 1
    return ids, mask


def decode_with(mm: MemGenModel, rec: TriggerRecorder, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                is_delim: torch.Tensor) -> list[str]:
    """Greedy MemGen decoding of ``prompts`` with ``rec`` deciding at each delimiter; the completions' text."""
    tok = mm.tokenizer
    ids, mask = _left_pad(prompts, tok.pad_token_id)
    device = mm.embed.weight.device
    mm.peft.eval()
    out = memgen_generate(mm, ids.to(device), mask.to(device), max_new_tokens, insert=True, trigger=rec,
                          delimiters=is_delim, temperature=0.0, eos_token_ids=stop_token_ids(tok))
    return [tok.decode(s, skip_special_tokens=True) for s in out.sequences]


def train_trigger(
    mm: MemGenModel,
    head: TriggerHead,
    task: Task,
    examples: Sequence[Example],
    is_delim: torch.Tensor,
    sch: TriggerSchedule,
    label: str = "memgen trigger",
) -> dict[str, Any]:
    """Policy-gradient training of ``head`` (reasoner and weaver untouched); returns curves and timing."""
    import random

    tok = mm.tokenizer
    prompts = [tok(task.prompt(e, tok), add_special_tokens=False).input_ids for e in examples]
    opt = torch.optim.AdamW(head.parameters(), lr=sch.lr, weight_decay=sch.weight_decay)
    rng = random.Random(sch.seed)
    gen = torch.Generator(device=mm.embed.weight.device).manual_seed(sch.seed)
    d_model = mm.lm_head.weight.shape[1]
    order: list[int] = []
    stats: dict[str, list[float]] = {"losses": [], "rewards": [], "insert_rate": []}
    t0 = time.perf_counter()
    for step in range(sch.steps):
        if len(order) < sch.prompts_per_step:
            more = list(range(len(examples)))
            rng.shuffle(more)
            order += more
        idx, order = order[: sch.prompts_per_step], order[sch.prompts_per_step :]
        rec = TriggerRecorder(head, policy="sample", generator=gen)
        rows = [prompts[i] for i in idx for _ in range(sch.group)]
        texts = decode_with(mm, rec, rows, sch.max_new_tokens, is_delim)
        rewards = torch.tensor([float(task.score(t, examples[idx[b // sch.group]])) for b, t in enumerate(texts)])
        states, dec, mask = rec.grid(len(rows), d_model)  # (B, J, d), (B, J), (B, J)
        shaped = rl.sparsity_shaped_rewards(rewards, dec, mask, sch.group, sch.lam)  # (B,)
        adv = rl.group_advantages(shaped, sch.group, sch.scale)  # type: ignore[arg-type]
        device = head.out.weight.device
        logp = torch.log_softmax(head(states.to(device)).float(), -1).gather(-1, dec.to(device)[..., None])[..., 0]
        loss, _ = rl.policy_loss(logp, logp.detach(), adv.to(device), mask.to(device), aggregation="sequence")
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"{label}: loss became {loss.item()} at step {step}; lower the lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), sch.max_grad_norm)
        opt.step()
        stats["losses"].append(loss.item())
        stats["rewards"].append(float(rewards.mean()))
        stats["insert_rate"].append(float((dec * mask).sum() / mask.sum().clamp(min=1)))
    return {"steps": sch.steps, "seconds": time.perf_counter() - t0, **stats}


def evaluate_trigger(
    mm: MemGenModel,
    head: TriggerHead,
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
            inserted += int(sum(int(d.sum()) for d in rec.decisions))
            asked += sum(len(d) for d in rec.decisions)
        out[f"accuracy_{name}"] = 100.0 * sum(scores) / max(len(scores), 1)
        out[f"insert_rate_{name}"] = inserted / max(asked, 1)
    return out
