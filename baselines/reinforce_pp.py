"""REINFORCE++: critic-free policy gradient with a token-level KL penalty and global advantage normalisation.

Implements REINFORCE++ (Hu et al., arXiv 2501.03262) with OpenRLHF's semantics (``experience_maker.py``,
``--advantage_estimator reinforce`` / ``reinforce_baseline``), using the pure functions of ``harness.rl``:
1. each step draws ``prompts_per_step`` prompts and samples ``samples_per_prompt`` completions of each
   (temperature ``temperature``, no top-k/top-p). Default as OpenRLHF runs REINFORCE++: 1 sample per prompt and
   ``train.batch_size`` (8) prompts per step, i.e. the same 8 generations per step as GRPO's 1 prompt x 8; the
   ``baseline`` variant defaults to 2 prompts x 4 samples (still 8); both settable;
2. reward = ``task.score`` (in [0, 1]); the ``baseline`` variant first subtracts each prompt's group mean;
3. ``reinforce``: per-token reward = ``-rl.kl_coef * k1`` (k1 = log pi - log pi_ref of the sampled token, clamped
   to +-10 as OpenRLHF), plus the scalar reward on the last generated token; returns with gamma = 1;
   ``baseline``: no KL in the reward but OpenRLHF's k2 KL loss (``use_kl_loss``, coefficient ``rl.kl_coef``);
4. advantages = returns whitened over every valid token of the global batch (all-reduced under torch.distributed),
   but only when the batch's rewards take more than one value: when they all tie, the returns are only centred,
   so the KL terms stay at their own scale instead of becoming unit-size advantages (``harness.rl.has_spread``);
5. PPO-clipped policy loss, token-mean aggregation, AdamW.

The KL reference is ``rl.reference`` (shared with GRPO): ``init`` (OpenRLHF's: the model before any training of
the whole sequence; with LoRA the base model, adapter off) or ``task_start`` (the policy when this task began).
The default ``rl.kl_coef`` is 0 (no KL, no reference forward) for both RL baselines; see the README.

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
  (``harness.sharded.whole_weights``, as TRL does for its own rollouts). ``rl.reference=task_start`` swaps a
  snapshot of the trainable weights in for the reference forward: not verified under FSDP2/ZeRO-3.
- LoRA (peft) by default, with LoRA dropout 0 whatever ``train.lora_dropout`` says, and every forward runs with
  dropout off, so the old and new log-probs agree and the PPO ratio is exactly 1 at one epoch (OpenRLHF's
  lora_dropout defaults to 0). With ``train.lora=false`` a frozen copy of the initial model is the ``init``
  reference.
- One gradient step per rollout batch by default (``ppo_epochs`` = 1, no mini-batch split); OpenRLHF's
  rollout/train batch sizes collapse to ``prompts_per_step * samples_per_prompt``.
- No reward clipping, no reward normalisation, no dual clip, no entropy bonus, no dynamic filtering (a tied batch
  is centred, not dropped); the stop token is part of the action mask like OpenRLHF's, prompt tokens never are.
- Learning rate, steps, schedule, warm-up and gradient clipping come from ``train.*`` (shared with the other
  methods) rather than OpenRLHF's defaults.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import get_scheduler

from harness import rl
from harness.budget import trainable_parameters
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
from harness.generation import generate_greedy
from harness.logprobs import token_logprobs
from harness.models import LoadedModel
from harness.seeding import derive_seed, set_seed
from harness.sharded import (
    deepspeed_prepare,
    fsdp_prepare,
    fsdp_sharded,
    gather_weights,
    release_engine,
    shard_weights,
    whole_weights,
    zero3,
)
from harness.training import (
    NonFiniteLossError,
    load_weights,
    rollout_stop_ids,
    save_weights,
    trainable_model,
    training_attention,
)
from harness.vllm_backend import rollout_sampler
from tasks.base import Example, Task


@dataclass(frozen=True)
class ReinforcePPOptions:
    """``method_options.reinforce_pp``; learning rate, steps, schedule and LoRA come from ``train.*``, the KL
    coefficient and reference from ``rl.*``."""

    samples_per_prompt: int | None = None
    """Completions sampled per prompt; None = 1 for ``reinforce`` (OpenRLHF's REINFORCE++), 4 for ``baseline``."""
    prompts_per_step: int | None = None
    """Prompts per optimizer step; None = ``train.batch_size / samples_per_prompt`` (8 rollouts per step, as GRPO)."""
    variant: str = "reinforce"
    """reinforce (REINFORCE++) or baseline (REINFORCE++-baseline: subtract the group mean reward first)."""
    use_kl_loss: bool | None = None
    """KL as a loss term (OpenRLHF's --use_kl_loss) instead of in the reward; None = on for ``baseline`` only."""
    kl_estimator: str | None = None
    """KL estimate: k1, k2 or k3; None = k1 in the reward (the paper's), k2 for the KL loss (OpenRLHF's)."""
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


def parse_options(options: dict[str, Any], batch_size: int = 8) -> ReinforcePPOptions:
    """Check the options and resolve the None defaults (``batch_size`` = ``train.batch_size``)."""
    key = "method_options.reinforce_pp."
    if "kl_coef" in options:
        raise ConfigError(f"{key}kl_coef moved to rl.kl_coef (shared by grpo and reinforce_pp); set --set "
                          f"rl.kl_coef=...")
    o: ReinforcePPOptions = from_dict(ReinforcePPOptions, options, prefix=key)
    if o.variant not in ("reinforce", "baseline"):
        raise ConfigError(f"{key}variant {o.variant!r} is not valid; use reinforce or baseline")
    if o.kl_estimator not in (None, "k1", "k2", "k3"):
        raise ConfigError(f"{key}kl_estimator {o.kl_estimator!r} is not valid; use k1, k2 or k3")
    if o.loss_aggregation not in ("token", "sequence", "constant"):
        raise ConfigError(f"{key}loss_aggregation {o.loss_aggregation!r} is not valid; use token, sequence or constant")
    samples = o.samples_per_prompt or (4 if o.variant == "baseline" else 1)
    if o.prompts_per_step is None and batch_size % samples:
        raise ConfigError(f"{key}samples_per_prompt={samples} does not divide train.batch_size={batch_size}; set "
                          f"{key}prompts_per_step or another samples_per_prompt")
    use_kl_loss = o.variant == "baseline" if o.use_kl_loss is None else o.use_kl_loss
    o = replace(o, samples_per_prompt=samples, prompts_per_step=o.prompts_per_step or max(1, batch_size // samples),
                use_kl_loss=use_kl_loss, kl_estimator=o.kl_estimator or ("k2" if use_kl_loss else "k1"))
    for name in ("samples_per_prompt", "prompts_per_step", "ppo_epochs"):
        if getattr(o, name) < 1:
            raise ConfigError(f"{key}{name} must be >= 1 (got {getattr(o, name)})")
    if o.variant == "baseline" and samples < 2:
        raise ConfigError(f"{key}variant baseline needs samples_per_prompt >= 2")
    if o.temperature <= 0 or not 0 < o.gamma <= 1:
        raise ConfigError(f"{key}: temperature must be > 0 and gamma in (0, 1]")
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
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_completion: int, temperature: float = 1.0,
    chunked: bool = True,
) -> torch.Tensor:
    """Log-probabilities of the last ``n_completion`` tokens under ``model`` at ``temperature``. (B, C)

    ``chunked``: the model returns its final hidden states and ``harness.logprobs.token_logprobs`` takes the
    selected tokens' log-probs chunk by chunk, so no (B, C, V) fp32 tensor exists (nor is kept for backward).
    ``chunked=False`` (or a head that is more than one linear map: logit soft-capping or scaling) takes the full
    logits. The caller turns it off under FSDP2/ZeRO-3, where the head's weight is sharded outside the forward."""
    # Left padding: positions count real tokens only, as ``generate`` does, so the log-probs match the sampler's.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    targets = input_ids[:, -n_completion:]  # (B, C)
    base = getattr(model, "module", model)  # DDP / DeepSpeed engine -> the (peft) model
    config = getattr(base, "config", None)
    plain_head = not any(getattr(config, k, None) for k in ("final_logit_softcapping", "logit_scale"))
    if chunked and plain_head:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    logits_to_keep=1, output_hidden_states=True)
        h = out.hidden_states[-1][:, -n_completion - 1 : -1]  # (B, C, d): the normed state before each token
        B, C, d = h.shape
        flat = token_logprobs(h.reshape(B * C, d), base.get_output_embeddings(), targets.reshape(-1), temperature)
        return flat.view(B, C)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=n_completion + 1).logits[:, :-1].float()  # (B, C, V)
    logits = logits / temperature
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
        self.opts = parse_options(options, cfg.train.batch_size)
        self.kl_coef, self.reference = cfg.rl.kl_coef, cfg.rl.reference
        rollouts, n_proc = self.rollouts_per_step, world()[1]
        if rollouts % n_proc:
            raise ConfigError(f"method_options.reinforce_pp: prompts_per_step * samples_per_prompt = {rollouts} "
                              f"rollouts per step do not divide over {n_proc} processes; make it a multiple of "
                              f"{n_proc}")
        self.tokenizer = model.tokenizer
        self.ref_model: Any = None
        self.ref_snapshot: list[torch.Tensor] | None = None  # rl.reference=task_start: weights at the task's start
        self.engine: Any = None  # the DeepSpeed engine while a task trains under a DeepSpeed launch
        # LoRA dropout 0 (and dropout off in every forward): old and new log-probs agree, the PPO ratio is 1
        self.model = trainable_model(model.model, cfg, "reinforce_pp", lora_dropout=0.0)
        if not cfg.train.lora and self.kl_coef > 0 and self.reference == "init":
            self.ref_model = copy.deepcopy(model.model).eval().requires_grad_(False)  # with LoRA: adapter off

    @property
    def rollouts_per_step(self) -> int:
        return int(self.opts.prompts_per_step) * int(self.opts.samples_per_prompt)

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    # -- rollouts -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, prompts: Sequence[str], n: int, max_new_tokens: int) -> Rollout:
        tok = self.tokenizer
        tok.padding_side = "left"
        device = next(self.model.parameters()).device
        enc = tok(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        ids = enc["input_ids"].repeat_interleave(n, 0)  # (B, P)
        am = enc["attention_mask"].repeat_interleave(n, 0)  # (B, P)
        stops = rollout_stop_ids(tok, self.model)
        self.model.eval()
        sampler = rollout_sampler(self.model)  # eval.backend=vllm: the run's vLLM engine (harness/vllm_backend.py)
        if sampler is not None:
            comp = sampler(ids, am, max_new_tokens, self.opts.temperature, stops, tok.pad_token_id)  # (B, C)
            out = torch.cat([ids, comp], dim=1)  # (B, P + C), as generate returns it
        else:
            out = self.model.generate(input_ids=ids, attention_mask=am, do_sample=True,
                                      temperature=self.opts.temperature, top_k=0, top_p=1.0,
                                      max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=tok.pad_token_id,
                                      synced_gpus=False)  # (B, P + C) see generate_greedy
        comp = out[:, ids.shape[1]:]  # (B, C)
        cmask = completion_mask(comp, stops)
        texts = [tok.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(comp, cmask, strict=True)]
        return Rollout(out, torch.cat([am, cmask], dim=1), cmask, texts)

    def _logps(self, model: Any, r: Rollout) -> torch.Tensor:
        # chunked head unless the head's weight is sharded outside the forward (FSDP2, ZeRO-3)
        chunked = not (fsdp_sharded(self.model) or zero3(self.engine))
        return token_logps(model, r.input_ids, r.attention_mask, r.completion_mask.shape[1], self.opts.temperature,
                           chunked=chunked)

    @torch.no_grad()
    def reference_logps(self, r: Rollout) -> torch.Tensor:
        if self.ref_snapshot is not None:  # task_start: the weights this task began with, swapped in
            params = self._trainable()
            current = [p.data for p in params]
            try:
                for p, ref in zip(params, self.ref_snapshot, strict=True):
                    p.data = ref
                return self._logps(self.model, r)
            finally:
                for p, cur in zip(params, current, strict=True):
                    p.data = cur
        if self.ref_model is not None:
            return self._logps(self.ref_model, r)
        with self.model.disable_adapter():  # init under LoRA: the base model
            return self._logps(self.model, r)

    # -- training -----------------------------------------------------------------------------------------------
    def train_step(self, task: Task, batch: Sequence[Example], optimizer, scheduler, budget: int) -> dict[str, float]:
        """Sample, score, compute REINFORCE++ advantages and take ``ppo_epochs`` gradient steps on one batch.

        Under a launch this process handles its ``rank_slice`` of the batch's rollouts (see the module docstring)."""
        o, S = self.opts, int(self.opts.samples_per_prompt)
        n_rows = len(batch) * S
        rows = rank_slice(n_rows)  # rollout b is sample b % S of prompt b // S
        examples = [batch[b // S] for b in rows]
        use_kl = self.kl_coef > 0
        # FSDP2/ZeRO-3: rollouts differ in length per process: whole weights, no collectives inside
        with whole_weights(self.model, self.engine):
            r = self.rollout([task.prompt(e, self.tokenizer) for e in examples], 1, budget)
            local = [float(task.score(t, e)) for t, e in zip(r.texts, examples, strict=True)]
            mask = r.completion_mask
            # log-prob forwards: eager attention for bf16 on CPU (its backward is faster there), the old ones
            # too, so ratios start at 1 under one attention implementation; sampling above keeps sdpa
            with torch.no_grad(), training_attention(*[m for m in (self.model, self.ref_model) if m is not None]):
                old = self._logps(self.model, r)  # (B_local, C)
                ref = self.reference_logps(r) if use_kl else None  # (B_local, C)
        kl = rl.approx_kl(old, ref, mask, o.kl_estimator) if ref is not None else None  # (B_local, C)
        rewards = torch.tensor(gather_rows(rows, local, n_rows))  # (B,) the global batch's rewards
        r_adv = rewards  # the baseline variant subtracts each prompt's group mean (groups may span processes)
        if o.variant == "baseline":
            r_adv = rewards - rewards.view(-1, S).mean(1).repeat_interleave(S)
        spread = rl.has_spread(r_adv)  # from the global batch, so every process whitens alike
        # returns whitened over the global batch's tokens (all-reduced inside); KL in the reward unless it is a loss
        adv, _ = rl.reinforce_pp_advantages(r_adv[rows.start:rows.stop].to(mask.device), mask,
                                            None if o.use_kl_loss else kl, self.kl_coef, o.gamma, whiten=spread)
        # DDP averages gradients over processes: weigh each process's loss by its share of the global normaliser
        # (tokens for ``token``, rollouts otherwise) times the number of processes, giving the global loss's gradient.
        n_proc = world()[1]
        n_tok, n_tok_all = float(mask.sum()), all_reduce_sum([float(mask.sum())])[0]
        share = n_tok / max(n_tok_all, 1.0) if o.loss_aggregation == "token" else len(rows) / n_rows
        model = self.engine or ddp_model(self.model)  # DeepSpeed's engine averages gradients as DDP does
        self.model.eval()  # dropout off in the gradient forward too: the same state as the old log-probs
        params = self._trainable()
        ratio_dev = 0.0
        for epoch in range(o.ppo_epochs):
            with training_attention(self.model):
                logp = self._logps(model, r)  # (B_local, C)
            if epoch == 0:
                with torch.no_grad():
                    ratio_dev = float(((logp - old).exp() - 1).abs().mul(mask).max()) if n_tok else 0.0
            loss, stats = rl.policy_loss(logp, old, adv, mask, o.clip_eps, o.clip_eps_high,
                                         o.loss_aggregation, max_len=budget)  # type: ignore[arg-type]
            if o.use_kl_loss and ref is not None:  # OpenRLHF: loss + kl_coef * masked mean of the KL estimate
                loss = loss + self.kl_coef * rl.masked_mean(rl.approx_kl(logp, ref, mask, o.kl_estimator), mask)
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
        kl_sum = float((kl * mask).sum()) if kl is not None else 0.0
        tokens = float(r.attention_mask.sum())
        adv_max = float(adv.abs().max()) if adv.numel() else 0.0
        # ratio_dev and adv_max: summed over processes, an upper bound of the global maximum (exact in one process)
        loss_all, clip_all, kl_all, tok_all, dev_max, adv_all = all_reduce_sum(
            [loss.item() * share, stats["clip_frac"] * n_tok, kl_sum, tokens, ratio_dev, adv_max])
        return {"loss": loss_all, "reward": float(rewards.mean()), "clip_frac": clip_all / max(n_tok_all, 1.0),
                "kl": kl_all / max(n_tok_all, 1.0) if kl is not None else 0.0,
                "length": n_tok_all / n_rows, "whitened": float(spread), "ratio_dev": dev_max, "adv_max": adv_all,
                "generated_tokens": n_tok_all, "train_tokens": tok_all * o.ppo_epochs}

    def optimizer(self, steps: int) -> tuple[torch.optim.Optimizer, Any]:
        """AdamW over the trainable parameters and the ``train.scheduler`` schedule for ``steps`` steps."""
        t = self.cfg.train
        optimizer = torch.optim.AdamW(self._trainable(), lr=t.lr, weight_decay=t.weight_decay)
        warmup = t.warmup_ratio if t.warmup_ratio >= 1 else math.ceil(steps * t.warmup_ratio)  # transformers' rule
        return optimizer, get_scheduler(t.scheduler, optimizer, num_warmup_steps=int(warmup), num_training_steps=steps)

    def train_on_task(self, task: Task, examples: Sequence[Example], stage: int) -> dict[str, Any]:
        seed = derive_seed(self.cfg.seed, "train", stage)
        set_seed(seed)
        torch.manual_seed(rank_seed(seed))  # a distinct sampling stream per process under a launch (same seed alone)
        t, o = self.cfg.train, self.opts
        P = int(o.prompts_per_step)
        steps = t.max_steps or max(1, round(t.epochs * len(examples) / P))
        budget = o.max_completion_length or task.max_new_tokens
        shard_weights(self.model)  # FSDP2/ZeRO-3 from an earlier task: back to the shards before building the optimizer
        if self.kl_coef > 0 and self.reference == "task_start":
            self.ref_snapshot = [p.detach().clone() for p in self._trainable()]
        optimizer, scheduler = self.optimizer(steps)
        optimizer = fsdp_prepare(self.model, optimizer)  # FSDP2: shard the model and its optimizer (else no-op)
        accelerator, self.engine = deepspeed_prepare(self.model, optimizer, self.rollouts_per_step // world()[1],
                                                     t.max_grad_norm)  # DeepSpeed (else None)
        batches = prompt_batches(len(examples), P, random.Random(seed))
        history: dict[str, list[float]] = {}
        seen: set[int] = set()
        t0 = time.perf_counter()
        on_step = getattr(self, "on_step", None)  # the runner's hook: on_step(step, total, loss, scalars={...})
        for step in range(steps):
            idx = next(batches)
            seen.update(idx)
            t_step, lr = time.perf_counter(), optimizer.param_groups[0]["lr"]  # the rate this step uses
            st = self.train_step(task, [examples[i] for i in idx], optimizer, scheduler, budget)
            for k, v in st.items():
                history.setdefault(k, []).append(v)
            if on_step is not None:  # progress bar and the run's tracker
                seconds = max(time.perf_counter() - t_step, 1e-9)
                on_step(step + 1, steps, st["loss"], scalars={
                    **{k: st[k] for k in ("reward", "kl", "clip_frac", "length", "ratio_dev")}, "learning_rate": lr,
                    "tokens_per_s": (st["generated_tokens"] + st["train_tokens"]) / seconds})
        release_engine(accelerator)  # DeepSpeed: its hooks off the model (ZeRO-3 gathers in them)
        self.engine = None
        self.ref_snapshot = None
        gather_weights(self.model)  # FSDP2/ZeRO-3: whole weights for evaluation, the checkpoint and the sync check
        check_in_sync(self._trainable(), f"reinforce_pp on {task.name}")
        return {"steps": steps, "seconds": time.perf_counter() - t0, "losses": history.get("loss", []),
                "rewards": history.get("reward", []), "kl": history.get("kl", []),
                "clip_frac": history.get("clip_frac", []), "lengths": history.get("length", []),
                "whitened": history.get("whitened", []), "ratio_dev": history.get("ratio_dev", []),
                "adv_max": history.get("adv_max", []),
                "prompts_per_step": P, "samples_per_prompt": o.samples_per_prompt, "variant": o.variant,
                "kl_coef": self.kl_coef, "reference": self.reference, "use_kl_loss": o.use_kl_loss,
                # budget keys (harness/budget.py)
                "examples_seen": len(seen), "optimizer_steps": steps * o.ppo_epochs,
                "train_tokens": int(sum(history.get("train_tokens", []))),
                "generated_tokens": int(sum(history.get("generated_tokens", []))),
                "trainable_params": trainable_parameters(self._trainable())}

    # -- evaluation and checkpoints -----------------------------------------------------------------------------
    def generate(self, task: Task, examples: Sequence[Example], max_new_tokens: int) -> list[str]:
        prompts = [task.prompt(e, self.tokenizer) for e in examples]
        return generate_greedy(self.model, self.tokenizer, prompts, max_new_tokens, self.cfg.eval.batch_size)

    def save(self, path: Path) -> None:
        save_weights(self.model, path, self.cfg.train.lora)

    def load(self, path: Path) -> None:
        load_weights(self.model, path, self.cfg.train.lora)
