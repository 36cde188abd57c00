"""REINFORCE++: critic-free policy gradient with a token-level KL penalty and global advantage normalisation.

Implements REINFORCE++ (Hu et al., arXiv 2501.03262) with OpenRLHF's semantics (``experience_maker.py``,
``--advantage_estimator reinforce`` / ``reinforce_baseline``), using the pure functions of ``harness.rl``:
1. sample ``samples_per_prompt`` completions per prompt (temperature ``temperature``, no top-k/top-p);
2. reward = ``task.score`` (in [0, 1]); the ``baseline`` variant first subtracts each prompt's group mean;
3. per-token reward = ``-kl_coef * k1`` (k1 = log pi - log pi_ref of the sampled token), plus the scalar reward on
   the last generated token; returns with gamma = 1 (the reverse cumulative sum);
4. advantages = returns whitened over every valid token of the global batch (all-reduced under torch.distributed);
5. PPO-clipped policy loss, token-mean aggregation, AdamW.

Differences from OpenRLHF:
- A compact trainer (HF ``generate`` for rollouts, no Ray/vLLM/DeepSpeed). Under ``accelerate launch`` it is
  data-parallel: every process draws the same prompts, samples and scores its contiguous block of the
  ``prompts_per_step * samples_per_prompt`` rollouts (which must divide over the processes) with its own sampling
  seed, the rewards are gathered (the ``baseline`` group mean spans processes), the returns are whitened over the
  global batch of tokens (all-reduced), and the model is wrapped in DDP by ``accelerate`` with each process's loss
  rescaled so that the averaged gradient is that of the global loss (exactly the single-process aggregation).
  Verified with 2 gloo processes on CPU (identical LoRA weights on both). Under an FSDP2 config the model and its
  optimizer are sharded by ``accelerate.prepare`` instead (``harness.sharded.fsdp_prepare``), and each step gathers
  the weights for the rollouts (whose lengths differ per process) and re-shards them for the update (verified
  likewise). Under a DeepSpeed config (ZeRO-2/3) ``accelerate.prepare`` makes an engine that takes the backward and
  the step (clipping included); under ZeRO-3 the rollouts run on weights gathered with the engine's hooks removed
  (``harness.sharded.whole_weights``, as TRL does for its own rollouts).
- LoRA (peft) by default; the reference policy is then the base model with the adapter disabled, i.e. the model
  before any training of the whole continual sequence (OpenRLHF's reference is the initial model too). With
  ``train.lora=false`` a frozen copy of the initial model is kept.
- One gradient step per rollout batch by default (``ppo_epochs`` = 1, no mini-batch split), so the PPO ratio is 1
  up to dropout; OpenRLHF's rollout/train batch sizes collapse to ``prompts_per_step * samples_per_prompt``.
- No reward clipping, no reward normalisation, no dual clip, no entropy bonus, no separate KL loss
  (``use_kl_loss``); the stop token is part of the action mask like OpenRLHF's, prompt tokens never are.
- Learning rate, steps, schedule, warm-up and gradient clipping come from ``train.*`` (shared with the other
  methods) rather than OpenRLHF's defaults.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import get_scheduler

from harness import rl
from harness.config import ConfigError, RunConfig, from_dict
from harness.distributed import (
    all_reduce_sum,
    check_in_sync,
    ddp_model,
    gather_rows,
    rank_seed,
    rank_slice,
    world,
)
from harness.generation import generate_greedy, stop_token_ids
from harness.models import LoadedModel
from harness.seeding import derive_seed, set_seed
from harness.sharded import (
    deepspeed_prepare,
    fsdp_prepare,
    gather_weights,
    release_engine,
    shard_weights,
    whole_weights,
)
from harness.training import NonFiniteLossError, load_weights, save_weights, trainable_model
from tasks.base import Example, Task


@dataclass(frozen=True)
class ReinforcePPOptions:
    """``method_options.reinforce_pp``; learning rate, steps, schedule and LoRA come from ``train.*``."""

    samples_per_prompt: int = 8
    """Completions sampled per prompt (the group size; 8 matches the GRPO baseline)."""
    prompts_per_step: int = 1
    """Prompts per optimizer step; a step trains on prompts_per_step * samples_per_prompt completions."""
    variant: str = "reinforce"
    """reinforce (REINFORCE++) or baseline (REINFORCE++-baseline: subtract the group mean reward first)."""
    kl_coef: float = 0.01
    """Coefficient of the per-token KL penalty in the reward (OpenRLHF's init_kl_coef); 0 skips the reference."""
    kl_estimator: str = "k1"
    """KL estimate in the reward: k1 (the paper's), k2 or k3."""
    gamma: float = 1.0
    """Discount of the returns (REINFORCE++ uses 1)."""
    clip_eps: float = 0.2
    """Lower PPO clipping range."""
    clip_eps_high: float | None = None
    """Upper clipping range (None = clip_eps)."""
    loss_aggregation: str = "token"
    """token (mean over all valid tokens, OpenRLHF's default), sequence, or constant (sum / (B * max length))."""
    ppo_epochs: int = 1
    """Gradient steps on each rollout batch (>1 makes the clipping active)."""
    max_completion_length: int = 0
    """Tokens sampled per completion while training; 0 = the task's own generation budget."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (log-probs are taken at the same temperature)."""


def parse_options(options: dict[str, Any]) -> ReinforcePPOptions:
    o: ReinforcePPOptions = from_dict(ReinforcePPOptions, options, prefix="method_options.reinforce_pp.")
    key = "method_options.reinforce_pp."
    if o.variant not in ("reinforce", "baseline"):
        raise ConfigError(f"{key}variant {o.variant!r} is not valid; use reinforce or baseline")
    if o.kl_estimator not in ("k1", "k2", "k3"):
        raise ConfigError(f"{key}kl_estimator {o.kl_estimator!r} is not valid; use k1, k2 or k3")
    if o.loss_aggregation not in ("token", "sequence", "constant"):
        raise ConfigError(f"{key}loss_aggregation {o.loss_aggregation!r} is not valid; use token, sequence or constant")
    for name in ("samples_per_prompt", "prompts_per_step", "ppo_epochs"):
        if getattr(o, name) < 1:
            raise ConfigError(f"{key}{name} must be >= 1 (got {getattr(o, name)})")
    if o.variant == "baseline" and o.samples_per_prompt < 2:
        raise ConfigError(f"{key}variant baseline needs samples_per_prompt >= 2")
    if o.temperature <= 0 or o.kl_coef < 0 or not 0 < o.gamma <= 1:
        raise ConfigError(f"{key}: temperature must be > 0, kl_coef >= 0 and gamma in (0, 1]")
    return o


@dataclass
class Rollout:
    """One batch of sampled completions; rows of the same prompt are contiguous."""

    input_ids: torch.Tensor  # (B, P + C) left-padded prompt then completion
    attention_mask: torch.Tensor  # (B, P + C)
    completion_mask: torch.Tensor  # (B, C) 1 up to and including the first stop token
    texts: list[str]


def completion_mask(completion_ids: torch.Tensor, stop_ids: Sequence[int]) -> torch.Tensor:
    """1 on every token up to and including the first stop token of each row, 0 after it. (B, C)"""
    is_stop = torch.isin(completion_ids, torch.tensor(list(stop_ids), device=completion_ids.device)).long()
    before_or_at_first = (is_stop.cumsum(1) - is_stop) == 0  # no stop strictly before this position
    return before_or_at_first.long()


def token_logps(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_completion: int, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probabilities of the last ``n_completion`` tokens under ``model`` at ``temperature``. (B, C)"""
    # Left padding: positions count real tokens only, as ``generate`` does, so the log-probs match the sampler's.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=n_completion + 1).logits[:, :-1].float()  # (B, C, V)
    logits = logits / temperature
    targets = input_ids[:, -n_completion:]  # (B, C)
    # log_softmax(x)[y] = x[y] - logsumexp(x): avoids materialising a second (B, C, V) tensor
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def prompt_batches(n: int, k: int, rng: random.Random) -> Iterator[list[int]]:
    """Endless batches of ``k`` example indices: seeded passes over ``range(n)``, reshuffled at each pass."""
    queue: list[int] = []
    while True:
        while len(queue) < k:
            order = list(range(n))
            rng.shuffle(order)
            queue += order
        yield queue[:k]
        queue = queue[k:]


class ReinforcePP:
    name = "reinforce_pp"

    def __init__(self, model: LoadedModel, cfg: RunConfig, options: dict[str, Any]):
        self.cfg = cfg
        self.opts = parse_options(options)
        rollouts, n_proc = self.opts.prompts_per_step * self.opts.samples_per_prompt, world()[1]
        if rollouts % n_proc:
            raise ConfigError(f"method_options.reinforce_pp: prompts_per_step * samples_per_prompt = {rollouts} "
                              f"rollouts per step do not divide over {n_proc} processes; make it a multiple of "
                              f"{n_proc}")
        self.tokenizer = model.tokenizer
        self.ref_model: Any = None
        self.engine: Any = None  # the DeepSpeed engine while a task trains under a DeepSpeed launch
        self.model = trainable_model(model.model, cfg, "reinforce_pp")
        if not cfg.train.lora and self.opts.kl_coef > 0:  # with LoRA the reference is the base, adapter off
            self.ref_model = copy.deepcopy(model.model).eval().requires_grad_(False)

    # -- rollouts -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, prompts: Sequence[str], n: int, max_new_tokens: int) -> Rollout:
        tok = self.tokenizer
        tok.padding_side = "left"
        device = next(self.model.parameters()).device
        enc = tok(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        ids = enc["input_ids"].repeat_interleave(n, 0)  # (B, P)
        am = enc["attention_mask"].repeat_interleave(n, 0)  # (B, P)
        stops = stop_token_ids(tok)
        self.model.eval()
        out = self.model.generate(input_ids=ids, attention_mask=am, do_sample=True, temperature=self.opts.temperature,
                                  top_k=0, top_p=1.0, max_new_tokens=max_new_tokens, eos_token_id=stops,
                                  pad_token_id=tok.pad_token_id, synced_gpus=False)  # (B, P + C) see generate_greedy
        comp = out[:, ids.shape[1]:]  # (B, C)
        cmask = completion_mask(comp, stops)
        texts = [tok.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(comp, cmask, strict=True)]
        return Rollout(out, torch.cat([am, cmask], dim=1), cmask, texts)

    def _logps(self, model: Any, r: Rollout) -> torch.Tensor:
        return token_logps(model, r.input_ids, r.attention_mask, r.completion_mask.shape[1], self.opts.temperature)

    @torch.no_grad()
    def reference_logps(self, r: Rollout) -> torch.Tensor:
        if self.ref_model is not None:
            return self._logps(self.ref_model, r)
        with self.model.disable_adapter():  # the base model is the reference under LoRA
            return self._logps(self.model, r)

    # -- training -----------------------------------------------------------------------------------------------
    def train_step(self, task: Task, batch: Sequence[Example], optimizer, scheduler, budget: int) -> dict[str, float]:
        """Sample, score, compute REINFORCE++ advantages and take ``ppo_epochs`` gradient steps on one batch.

        Under a launch this process handles its ``rank_slice`` of the batch's rollouts (see the module docstring)."""
        o = self.opts
        n_rows = len(batch) * o.samples_per_prompt
        rows = rank_slice(n_rows)  # rollout b is sample b % S of prompt b // S
        examples = [batch[b // o.samples_per_prompt] for b in rows]
        # FSDP2/ZeRO-3: rollouts differ in length per process: whole weights, no collectives inside
        with whole_weights(self.model, self.engine):
            r = self.rollout([task.prompt(e, self.tokenizer) for e in examples], 1, budget)
            local = [float(task.score(t, e)) for t, e in zip(r.texts, examples, strict=True)]
            mask = r.completion_mask
            with torch.no_grad():
                old = self._logps(self.model, r)  # (B_local, C)
                kl = rl.approx_kl(old, self.reference_logps(r), mask, o.kl_estimator) if o.kl_coef > 0 else None
        rewards = torch.tensor(gather_rows(rows, local, n_rows))  # (B,) the global batch's rewards
        r_adv = rewards  # the baseline variant subtracts each prompt's group mean (groups may span processes)
        if o.variant == "baseline":
            r_adv = rewards - rewards.view(-1, o.samples_per_prompt).mean(1).repeat_interleave(o.samples_per_prompt)
        # returns whitened over the global batch's tokens (all-reduced inside)
        adv, _ = rl.reinforce_pp_advantages(r_adv[rows.start:rows.stop].to(mask.device), mask, kl, o.kl_coef,
                                            o.gamma)
        # DDP averages gradients over processes: weigh each process's loss by its share of the global normaliser
        # (tokens for ``token``, rollouts otherwise) times the number of processes, giving the global loss's gradient.
        n_proc = world()[1]
        n_tok, n_tok_all = float(mask.sum()), all_reduce_sum([float(mask.sum())])[0]
        share = n_tok / max(n_tok_all, 1.0) if o.loss_aggregation == "token" else len(rows) / n_rows
        model = self.engine or ddp_model(self.model)  # DeepSpeed's engine averages gradients as DDP does
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        for _ in range(o.ppo_epochs):
            loss, stats = rl.policy_loss(self._logps(model, r), old, adv, mask, o.clip_eps, o.clip_eps_high,
                                         o.loss_aggregation, max_len=budget)  # type: ignore[arg-type]
            if all_reduce_sum([0.0 if torch.isfinite(loss) else 1.0])[0]:  # every process stops alike
                raise NonFiniteLossError(f"reinforce_pp on {task.name}: loss became non-finite ({loss.item()} here); "
                                         f"lower train.lr")
            if self.engine is not None:
                self.engine.backward(loss * (share * n_proc))
                self.engine.step()  # clips to train.max_grad_norm, steps and zeroes the gradients
                continue
            optimizer.zero_grad(set_to_none=True)
            (loss * (share * n_proc)).backward()
            torch.nn.utils.clip_grad_norm_(params, self.cfg.train.max_grad_norm)
            optimizer.step()
        scheduler.step()
        self.model.eval()
        kl_sum = float((kl * mask).sum()) if kl is not None else 0.0
        loss_all, clip_all, kl_all = all_reduce_sum([loss.item() * share, stats["clip_frac"] * n_tok, kl_sum])
        return {"loss": loss_all, "reward": float(rewards.mean()), "clip_frac": clip_all / max(n_tok_all, 1.0),
                "kl": kl_all / max(n_tok_all, 1.0) if kl is not None else 0.0,
                "length": n_tok_all / n_rows}

    def optimizer(self, steps: int) -> tuple[torch.optim.Optimizer, Any]:
        """AdamW over the trainable parameters and the ``train.scheduler`` schedule for ``steps`` steps."""
        t = self.cfg.train
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        warmup = t.warmup_ratio if t.warmup_ratio >= 1 else math.ceil(steps * t.warmup_ratio)  # transformers' rule
        return optimizer, get_scheduler(t.scheduler, optimizer, num_warmup_steps=int(warmup), num_training_steps=steps)

    def train_on_task(self, task: Task, examples: Sequence[Example], stage: int) -> dict[str, Any]:
        seed = derive_seed(self.cfg.seed, "train", stage)
        set_seed(seed)
        torch.manual_seed(rank_seed(seed))  # a distinct sampling stream per process under a launch (same seed alone)
        t, o = self.cfg.train, self.opts
        steps = t.max_steps or max(1, round(t.epochs * len(examples) / o.prompts_per_step))
        budget = o.max_completion_length or task.max_new_tokens
        shard_weights(self.model)  # FSDP2/ZeRO-3 from an earlier task: back to the shards before building the optimizer
        optimizer, scheduler = self.optimizer(steps)
        optimizer = fsdp_prepare(self.model, optimizer)  # FSDP2: shard the model and its optimizer (else no-op)
        accelerator, self.engine = deepspeed_prepare(self.model, optimizer, o.prompts_per_step * o.samples_per_prompt
                                                     // world()[1], t.max_grad_norm)  # DeepSpeed (else None)
        batches = prompt_batches(len(examples), o.prompts_per_step, random.Random(seed))
        history: dict[str, list[float]] = {}
        t0 = time.perf_counter()
        on_step = getattr(self, "on_step", None)  # the runner's progress hook: on_step(step, total, loss)
        for step in range(steps):
            batch = [examples[i] for i in next(batches)]
            for k, v in self.train_step(task, batch, optimizer, scheduler, budget).items():
                history.setdefault(k, []).append(v)
            if on_step is not None:
                on_step(step + 1, steps, history["loss"][-1])
        release_engine(accelerator)  # DeepSpeed: its hooks off the model (ZeRO-3 gathers in them)
        self.engine = None
        gather_weights(self.model)  # FSDP2/ZeRO-3: whole weights for evaluation, the checkpoint and the sync check
        check_in_sync([p for p in self.model.parameters() if p.requires_grad], f"reinforce_pp on {task.name}")
        return {"steps": steps, "seconds": time.perf_counter() - t0, "losses": history.get("loss", []),
                "rewards": history.get("reward", []), "kl": history.get("kl", []),
                "clip_frac": history.get("clip_frac", []), "lengths": history.get("length", [])}

    # -- evaluation and checkpoints -----------------------------------------------------------------------------
    def generate(self, task: Task, examples: Sequence[Example], max_new_tokens: int) -> list[str]:
        prompts = [task.prompt(e, self.tokenizer) for e in examples]
        return generate_greedy(self.model, self.tokenizer, prompts, max_new_tokens, self.cfg.eval.batch_size)

    def save(self, path: Path) -> None:
        save_weights(self.model, path, self.cfg.train.lora)

    def load(self, path: Path) -> None:
        load_weights(self.model, path, self.cfg.train.lora)
