"""GRPO: group-relative policy optimisation of the reasoner with the task's scorer as the reward, via TRL.

Implements GRPO (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300) through ``trl.GRPOTrainer``: for each prompt,
``num_generations`` completions are sampled, scored by ``task.score`` and given the advantage
``(r - group mean) / (group std + 1e-4)`` (``harness.rl.group_advantages`` computes the same thing; a test checks
that TRL agrees with it); the loss is the PPO-clipped policy gradient.

Departures from the paper's GRPO (and from the MemGen paper's GRPO baseline):
- LoRA (peft; ``train.lora_*``) by default instead of full fine-tuning; full with ``train.lora=false``.
- KL: beta = ``rl.kl_coef``, shared with REINFORCE++ (default 0: no KL term, no reference model, as in the MemGen
  public code and Dr. GRPO/DAPO; the paper used 0.04), TRL's k3 KL loss against ``rl.reference``: ``init`` (the
  model before the whole sequence: with LoRA the base model, adapter off; with full fine-tuning a frozen copy of
  the initial weights) or ``task_start`` (TRL's own choice: a copy of the policy when this task began).
- One optimisation step per generated batch (``num_iterations`` = 1), so the importance ratio is 1 and clipping
  is inactive; the paper's mu > 1 iterations are not exposed. Dropout off (``disable_dropout``), as REINFORCE++.
- Prompts reach TRL as the exact token ids evaluation feeds the model (``EvalAlignedGRPOTrainer`` tokenises the
  chat-formatted prompt with ``add_special_tokens=False``; TRL's own string path would add a second BOS for
  Llama-style tokenizers), and rollouts stop on evaluation's stop tokens (``harness.training.rollout_stop_ids``).
- Steps follow the budget rule (README): ``prompts_per_step`` defaults to ``train.batch_size / num_generations``
  (1 x 8), the same 8 rollouts per step as REINFORCE++.
- Outcome reward only (the task score in [0, 1]); no process supervision, no format reward.
- Continual setting: one adapter trained on through the whole sequence, a fresh optimizer per task.
- Evaluation decodes greedily (the runner's protocol), while training samples at ``temperature``.
- Under ``accelerate launch`` TRL runs DDP itself (generation and rewards per process, seeds per device); a step
  still trains on ``prompts_per_step * num_generations`` completions in all, split over the processes, so that
  number must divide by the number of processes (checked up front, with TRL's own constraint that the global
  batch divides by ``num_generations``). Verified with 2 gloo processes on CPU (identical LoRA weights on both),
  also under FSDP2 and DeepSpeed ZeRO-2 and ZeRO-3 (weights gathered after each task: ``harness/sharded.py``).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from harness.budget import trainable_parameters, union_over_processes
from harness.config import ConfigError, RunConfig, from_dict
from harness.distributed import check_in_sync, world
from harness.generation import generate_greedy
from harness.models import LoadedModel
from harness.seeding import derive_seed, set_seed
from harness.sharded import gather_weights, release_engine, shard_weights, trainer_device_kwargs
from harness.training import LossGuard, load_weights, rollout_stop_ids, save_weights, trainable_model
from harness.vllm_backend import grpo_vllm_kwargs
from tasks.base import Example, Task


@dataclass(frozen=True)
class GRPOOptions:
    """``method_options.grpo``; learning rate, steps, schedule and LoRA come from ``train.*``."""

    num_generations: int = 8
    """Completions sampled per prompt (the group size G)."""
    prompts_per_step: int | None = None
    """Prompts per optimizer step (a step trains on prompts_per_step * num_generations completions); None =
    ``train.batch_size / num_generations``."""
    loss_type: str = "grpo"
    """TRL loss aggregation: grpo (per-sequence mean, the paper), bnpo/dapo (token mean), dr_grpo (constant)."""
    epsilon: float = 0.2
    """Lower PPO clipping range."""
    epsilon_high: float | None = None
    """Upper clipping range (None = epsilon; DAPO uses 0.28)."""
    scale_rewards: str = "group"
    """Advantage scaling: group (std of the group), batch (std of the batch) or none (Dr. GRPO)."""
    max_completion_length: int = 0
    """Tokens sampled per completion while training; 0 = the task's own generation budget."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts."""


def parse_options(options: dict[str, Any], batch_size: int = 8) -> GRPOOptions:
    """Check the options and resolve ``prompts_per_step`` (``batch_size`` = ``train.batch_size``)."""
    if "beta" in options:
        raise ConfigError("method_options.grpo.beta moved to rl.kl_coef (shared by grpo and reinforce_pp); set "
                          "--set rl.kl_coef=...")
    opts: GRPOOptions = from_dict(GRPOOptions, options, prefix="method_options.grpo.")
    if opts.num_generations < 2:
        raise ConfigError(f"method_options.grpo.num_generations must be >= 2 (got {opts.num_generations})")
    if opts.prompts_per_step is None:
        if batch_size % opts.num_generations:
            raise ConfigError(f"method_options.grpo.num_generations={opts.num_generations} does not divide "
                              f"train.batch_size={batch_size}; set method_options.grpo.prompts_per_step")
        opts = replace(opts, prompts_per_step=max(1, batch_size // opts.num_generations))
    if opts.prompts_per_step < 1:
        raise ConfigError(f"method_options.grpo.prompts_per_step must be >= 1 (got {opts.prompts_per_step})")
    if opts.loss_type not in ("grpo", "bnpo", "dapo", "dr_grpo"):
        raise ConfigError(f"method_options.grpo.loss_type {opts.loss_type!r} is not valid; use grpo, bnpo, dapo "
                          f"or dr_grpo")
    if opts.scale_rewards not in ("group", "batch", "none"):
        raise ConfigError(f"method_options.grpo.scale_rewards {opts.scale_rewards!r} is not valid; use group, "
                          f"batch or none")
    if opts.temperature <= 0:
        raise ConfigError("method_options.grpo.temperature must be > 0")
    return opts


def per_device_batch(opts: GRPOOptions, n_proc: int, grad_accum: int = 1) -> int:
    """Completions per process and micro-step: a step's ``prompts_per_step * num_generations`` split evenly over
    ``n_proc`` processes. Raises ``ConfigError`` (one line, naming the settings) unless it divides, and checks TRL's
    group constraint (per-device batch * processes * grad_accum divisible by ``num_generations``) up front."""
    total = opts.prompts_per_step * opts.num_generations
    if total % n_proc:
        raise ConfigError(f"grpo: method_options.grpo.prompts_per_step * num_generations = {opts.prompts_per_step} * "
                          f"{opts.num_generations} = {total} completions per step do not divide over {n_proc} "
                          f"processes; change prompts_per_step or num_generations (or --num-processes)")
    per_device = total // n_proc
    if (per_device * n_proc * grad_accum) % opts.num_generations:  # TRL's check, stated in our terms
        raise ConfigError(f"grpo: the global batch {per_device} x {n_proc} processes x {grad_accum} accumulation "
                          f"steps is not divisible by method_options.grpo.num_generations={opts.num_generations}; "
                          f"change num_generations or prompts_per_step")
    return per_device


def grpo_config(cfg: RunConfig, opts: GRPOOptions, seed: int, max_steps: int, max_completion_length: int):
    """The ``trl.GRPOConfig`` for one task: one optimizer step per generated batch, CPU-safe settings."""
    from trl import GRPOConfig

    t = cfg.train
    return GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="memgen-grpo-"),
        per_device_train_batch_size=per_device_batch(opts, world()[1]),
        gradient_accumulation_steps=1,
        num_generations=opts.num_generations,
        num_iterations=1,
        max_completion_length=max_completion_length,
        temperature=opts.temperature,
        beta=cfg.rl.kl_coef,
        disable_dropout=True,  # as REINFORCE++: the log-probs of the loss are those the sampler's policy gives
        loss_type=opts.loss_type,
        epsilon=opts.epsilon,
        epsilon_high=opts.epsilon_high,
        scale_rewards=opts.scale_rewards,
        learning_rate=t.lr,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio of max_steps in transformers 5
        lr_scheduler_type=t.scheduler,
        max_grad_norm=t.max_grad_norm,
        max_steps=max_steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        **trainer_device_kwargs(cfg.device),
        bf16=cfg.dtype == "bf16" and cfg.device != "cpu",
        gradient_checkpointing=False,  # small models; checkpointing only slows CPU runs down
        disable_tqdm=True,
        dataloader_num_workers=0,
        log_completions=False,
        **grpo_vllm_kwargs(cfg),  # eval.backend=vllm: TRL's vLLM rollouts, colocate mode (harness/vllm_backend.py)
    )


class RewardLog(TrainerCallback):
    """Collects TRL's per-step mean reward (the training curve) and generated tokens (mean length x rollouts)."""

    def __init__(self, rollouts_per_step: int = 0) -> None:
        self.rewards: list[float] = []
        self.generated_tokens = 0.0
        self.rollouts_per_step = rollouts_per_step

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: D401 - transformers hook
        if logs and "reward" in logs:
            self.rewards.append(float(logs["reward"]))
            # TRL's mean over the global batch (gathered), EOS included: times the step's rollouts = their sum
            self.generated_tokens += float(logs.get("completions/mean_length", 0.0)) * self.rollouts_per_step


def task_reward(task: Task, examples: Sequence[Example], seen: set[int] | None = None) -> Callable[..., list[float]]:
    """A TRL reward function: the task's scorer on each completion, the example found by its ``idx`` column;
    ``seen`` collects the indices scored (the distinct training examples of the budget)."""

    def task_score(completions: list[str], idx: list[int], **_: Any) -> list[float]:
        if seen is not None:
            seen.update(idx)
        return [float(task.score(c, examples[i])) for c, i in zip(completions, idx, strict=True)]

    return task_score


def _trainer_class():
    """``EvalAlignedGRPOTrainer``: TRL's GRPOTrainer that (1) tokenises string prompts exactly as evaluation does
    (``add_special_tokens=False``: the chat template already holds any BOS; TRL's plain ``processing_class(text=...)``
    would add a second one for Llama-style tokenizers) and (2) stops and masks rollouts at ``stop_ids``, the stop
    tokens of evaluation, instead of TRL's (tokenizer EOS + model EOS). Overrides ``_tokenize_prompts`` and sets
    ``eos_token_ids``/the generation config of TRL 1.x (pinned ``trl>=1.16,<2``; tests check both). (3) Its loss
    forwards (and so their backward) run under ``training_attention``, as every trainer's here: eager attention for
    bf16 on CPU, where sdpa's backward is slow; sampling keeps sdpa."""
    from trl import GRPOTrainer

    from harness.training import training_attention

    class EvalAlignedGRPOTrainer(GRPOTrainer):
        def __init__(self, *args: Any, stop_ids: Sequence[int] | None = None, **kwargs: Any):
            super().__init__(*args, **kwargs)
            if stop_ids:
                stops = list(stop_ids)
                self.eos_token_ids = stops  # TRL masks each completion after its first one of these
                if getattr(self, "generation_kwargs", None) is not None:
                    self.generation_kwargs["eos_token_id"] = stops
                if getattr(self, "generation_config", None) is not None:
                    self.generation_config.eos_token_id = stops

        def _tokenize_prompts(self, prompts: list):
            if prompts and isinstance(prompts[0], str):
                ids = self.processing_class(text=prompts, add_special_tokens=False)["input_ids"]
                return ids, None, {}
            return super()._tokenize_prompts(prompts)

        def compute_loss(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            with training_attention(self.model):
                return super().compute_loss(model, inputs, *args, **kwargs)

    return EvalAlignedGRPOTrainer


def build_trainer(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    reward_fn: Callable[..., list[float]],
    args: Any,
    callbacks: Sequence[TrainerCallback] = (),
    stop_ids: Sequence[int] | None = None,
):
    """A GRPO trainer (``_trainer_class``) on already chat-formatted ``prompts`` (rows carry their index as ``idx``);
    ``stop_ids`` defaults to evaluation's stop tokens."""
    from datasets import Dataset

    data = Dataset.from_list([{"prompt": p, "idx": i} for i, p in enumerate(prompts)])
    stops = list(stop_ids) if stop_ids is not None else rollout_stop_ids(tokenizer, model)
    return _trainer_class()(model=model, reward_funcs=reward_fn, args=args, train_dataset=data,
                            processing_class=tokenizer, callbacks=list(callbacks), stop_ids=stops)


class GRPO:
    name = "grpo"

    def __init__(self, model: LoadedModel, cfg: RunConfig, options: dict[str, Any]):
        self.cfg = cfg
        self.opts = parse_options(options, cfg.train.batch_size)
        per_device_batch(self.opts, world()[1])  # the group constraint, before any evaluation runs
        self.tokenizer = model.tokenizer
        self.kl_coef, self.reference = cfg.rl.kl_coef, cfg.rl.reference
        # LoRA dropout 0, as REINFORCE++ (TRL's disable_dropout turns it off anyway)
        self.model = trainable_model(model.model, cfg, "grpo", lora_dropout=0.0)
        # Full fine-tuning with a KL to init: the initial weights, loaded into TRL's reference model each task
        self.init_state: dict[str, torch.Tensor] | None = None
        if not cfg.train.lora and self.kl_coef > 0 and self.reference == "init":
            self.init_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        # Extra ``transformers`` callbacks for the next trainings (benchmarks hook in here to interleave timings).
        self.callbacks: list[TrainerCallback] = []

    def _set_reference(self, trainer: Any) -> None:
        """Point TRL's KL reference at ``rl.reference`` (TRL's own: a copy of the policy at the task's start)."""
        if self.kl_coef <= 0:
            return
        if self.cfg.train.lora:
            if self.reference == "init" and "ref" in self.model.peft_config:
                # without a "ref" adapter TRL disables the adapters for the reference forward: the base model = init
                self.model.delete_adapter("ref")
        elif trainer.ref_model is not None:
            state = self.init_state if self.reference == "init" else self.model.state_dict()
            trainer.ref_model.load_state_dict(state)

    def train_on_task(self, task: Task, examples: Sequence[Example], stage: int) -> dict[str, Any]:
        seed = derive_seed(self.cfg.seed, "train", stage)
        set_seed(seed)
        t, o = self.cfg.train, self.opts
        P = int(o.prompts_per_step)
        steps = t.max_steps or max(1, round(t.epochs * len(examples) / P))
        budget = o.max_completion_length or task.max_new_tokens
        prompts = [task.prompt(e, self.tokenizer) for e in examples]
        seen: set[int] = set()
        guard, rewards = LossGuard(f"grpo on {task.name}", getattr(self, "on_step", None)), RewardLog(
            P * o.num_generations)
        trainer = build_trainer(self.model, self.tokenizer, prompts, task_reward(task, examples, seen),
                                grpo_config(self.cfg, o, seed, steps, budget),
                                [guard, rewards, *self.callbacks])
        self._set_reference(trainer)
        # FSDP2/ZeRO-3 from an earlier task: back to the shards for the optimizer, which ``train`` builds. Not
        # before the Trainer: with beta > 0 it copies the adapter into a "ref" one, which needs the whole weights.
        shard_weights(self.model)
        self.model.train()
        t0 = time.perf_counter()
        trainer.train()
        release_engine(trainer.accelerator)  # DeepSpeed: its hooks off the model (ZeRO-3 gathers in them)
        gather_weights(self.model)  # FSDP2/ZeRO-3: whole weights for evaluation, the checkpoint and the sync check
        if "ref" in getattr(self.model, "peft_config", {}):
            # TRL adds a frozen copy of the adapter as the KL reference when beta > 0; it belongs to this task only.
            self.model.delete_adapter("ref")
        self.model.eval()
        self.tokenizer.padding_side = "left"  # generation everywhere else relies on left padding
        check_in_sync([p for p in self.model.parameters() if p.requires_grad], f"grpo on {task.name}")
        n_seen = len(union_over_processes(seen))
        return {"steps": steps, "seconds": time.perf_counter() - t0, "losses": guard.losses,
                "rewards": rewards.rewards, "prompts_per_step": P, "num_generations": o.num_generations,
                "kl_coef": self.kl_coef, "reference": self.reference,
                # budget keys (harness/budget.py); TRL counts prompt + completion tokens of every rollout batch
                "examples_seen": n_seen, "optimizer_steps": int(trainer.state.global_step),
                "train_tokens": int(trainer.state.num_input_tokens_seen),
                "generated_tokens": int(round(rewards.generated_tokens)),
                "trainable_params": trainable_parameters(self.model.parameters())}

    def generate(self, task: Task, examples: Sequence[Example], max_new_tokens: int) -> list[str]:
        prompts = [task.prompt(e, self.tokenizer) for e in examples]
        return generate_greedy(self.model, self.tokenizer, prompts, max_new_tokens, self.cfg.eval.batch_size)

    def save(self, path: Path) -> None:
        save_weights(self.model, path, self.cfg.train.lora)

    def load(self, path: Path) -> None:
        load_weights(self.model, path, self.cfg.train.lora)
