"""Shared pieces of supervised training: prompt/target tokenisation with masked prompt labels, right-padding
collation, LoRA configs and ``TrainingArguments`` built from a ``TrainConfig``."""

from __future__ import annotations

import contextlib
import math
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, TrainerCallback, TrainingArguments

from harness.config import ConfigError, RunConfig, TrainConfig
from harness.errors import NonFiniteLossError
from harness.generation import end_of_turn_id

IGNORE_INDEX = -100


def tokenize_prompt_target(
    tokenizer: PreTrainedTokenizerBase, prompt: str, target: str, max_length: int, target_budget: int = 0
) -> dict[str, list[int]]:
    """Token ids of ``prompt + target + end-of-turn`` and labels that are IGNORE_INDEX on the prompt.

    The target ends with the chat template's end-of-turn token (``harness.generation.end_of_turn_id``; the EOS when
    there is none), one of the tokens generation stops on, so a trained model ends its turn as evaluation expects.

    The prompt is tokenised on its own so the boundary is exact (chat templates end in a newline, so no token
    straddles it). Over-long rows are truncated from the right; ``prompt_len`` is where the target starts. With
    ``target_budget`` (the task's generation budget) the limit is at least prompt + budget + EOS, so a target the
    model could produce at evaluation is never cut by ``max_length``.
    """
    p = tokenizer(prompt, add_special_tokens=False).input_ids
    t = tokenizer(target, add_special_tokens=False).input_ids + [end_of_turn_id(tokenizer)]
    max_length = max(max_length, len(p) + target_budget + 1) if target_budget else max_length
    if len(p) >= max_length:
        raise ValueError(f"a prompt of {len(p)} tokens leaves no room for its target within train.max_length="
                         f"{max_length}; raise train.max_length or shorten the task's prompt")
    ids = (p + t)[:max_length]
    labels = ([IGNORE_INDEX] * len(p) + t)[:max_length]
    return {"input_ids": ids, "labels": labels, "prompt_len": min(len(p), max_length)}


def pad_right(rows: Sequence[dict[str, Any]], pad_id: int, trim_logits: bool = False) -> dict[str, Any]:
    """Right-pad ``input_ids``/``labels`` (training uses positions 0..T-1, so no left padding here).

    ``trim_logits``: also return ``logits_to_keep`` = the positions from the earliest one that predicts a target
    token to the end, and the labels of those positions only. The model then computes the head and the fp32
    cross-entropy on the targets' positions, not the prompts' (about 3/4 of a row in the ``quick`` tasks). The loss
    is the same: the causal-LM loss shifts labels by one, and every cut position is a prompt label (ignored)."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    if trim_logits:
        start = max(min(int(r.get("prompt_len", 1)) for r in rows) - 1, 0)  # predicts the first target token
        return {"input_ids": ids, "labels": labels[:, start:], "attention_mask": mask, "logits_to_keep": width - start}
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def accepts_logits_to_keep(model: Any) -> bool:
    """Whether the (peft-wrapped) causal LM's forward takes ``logits_to_keep`` (transformers' decoder LMs do)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def lora_config(t: TrainConfig, targets: Sequence[str] | None = None, dropout: float | None = None):
    """peft's ``LoraConfig`` from ``train.lora_*``; ``all-linear`` (peft's own shorthand) adapts every linear layer
    but the output head. ``dropout`` overrides ``train.lora_dropout`` (the RL baselines pass 0)."""
    from peft import LoraConfig

    names = list(targets or t.lora_targets)
    return LoraConfig(
        r=t.lora_r,
        lora_alpha=t.lora_alpha,
        lora_dropout=t.lora_dropout if dropout is None else dropout,
        target_modules="all-linear" if names == ["all-linear"] else names,
        task_type="CAUSAL_LM",
    )


def steps_for(t: TrainConfig, n_examples: int, world_size: int = 1) -> int:
    if t.max_steps > 0:
        return t.max_steps
    per_step = t.batch_size * t.grad_accum * world_size
    return max(1, math.ceil(t.epochs * n_examples / per_step))


def per_device_batch(batch_size: int, n_proc: int) -> int:
    """``train.batch_size`` is the global batch: split it evenly over the processes of a launch."""
    if batch_size % n_proc:
        raise ConfigError(f"train.batch_size={batch_size} does not divide over {n_proc} processes; "
                          f"use a multiple of {n_proc}")
    return batch_size // n_proc


def training_arguments(cfg: RunConfig, seed: int, max_steps: int, **extra: Any) -> TrainingArguments:
    from harness.distributed import world
    from harness.sharded import trainer_device_kwargs

    t = cfg.train
    return TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="memgen-trainer-"),
        per_device_train_batch_size=per_device_batch(t.batch_size, world()[1]),
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_ratio,
        lr_scheduler_type=t.scheduler,
        max_steps=max_steps,
        max_grad_norm=t.max_grad_norm,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        **trainer_device_kwargs(cfg.device),
        bf16=cfg.dtype == "bf16" and cfg.device != "cpu",
        remove_unused_columns=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **extra,
    )


class LossGuard(TrainerCallback):
    """Records the loss curve, stops with a clear error on a NaN/inf loss, and hands every step's log dict to the
    runner's ``on_step`` hook (``scalars=``: learning_rate, grad_norm, TRL's reward/kl/... as the Trainer logs
    them), which logs them to the run's tracker. The Trainer's own ``report_to`` stays ``none``: it would open a
    second TensorBoard log (under the Trainer's temporary ``output_dir``) or a second W&B run per task, instead of
    one log per run directory with the runner's cells and stage curves beside the steps."""

    def __init__(self, label: str, on_step=None):
        self.label = label
        self.losses: list[float] = []
        self.on_step = on_step  # optional hook: on_step(step, total_steps, loss, scalars={...})

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: D401 - transformers hook
        if logs and "loss" in logs:
            loss = float(logs["loss"])
            if not math.isfinite(loss):
                raise NonFiniteLossError(
                    f"{self.label}: loss became {loss} at step {state.global_step}; lower train.lr or check the data"
                )
            self.losses.append(loss)
            if self.on_step is not None:
                scalars = {k: float(v) for k, v in logs.items()
                           if k != "loss" and isinstance(v, int | float) and not isinstance(v, bool)}
                self.on_step(state.global_step, state.max_steps, loss, scalars=scalars)


ADAPTER_DIR = "adapter"
FULL_DIR = "model"


def trainable_model(model: Any, cfg: RunConfig, method: str, lora_dropout: float | None = None) -> Any:
    """The model a weight-training baseline updates: a fresh LoRA adapter (``train.lora``, initialised from a seed
    derived from (master seed, ``method``) without touching the global RNG) or the full model itself.
    ``lora_dropout`` overrides ``train.lora_dropout``."""
    if not cfg.train.lora:
        return model
    from peft import get_peft_model

    from harness.seeding import derive_seed

    with torch.random.fork_rng():
        torch.manual_seed(derive_seed(cfg.seed, f"{method}-lora-init"))
        return get_peft_model(model, lora_config(cfg.train, dropout=lora_dropout))


def save_weights(model: Any, path: Path, lora: bool) -> None:
    """A method's trained weights: the peft adapter (LoRA) or the full model, under ``path``."""
    from harness.sharded import fsdp_sharded

    path.mkdir(parents=True, exist_ok=True)
    extra: dict[str, Any] = {}
    if fsdp_sharded(model):
        # FSDP2 (gathered after training, see harness.sharded.gather_weights): ``state_dict()`` would swap the
        # shards back in on this (main) process alone, so hand save_pretrained the whole tensors themselves.
        extra["state_dict"] = {**dict(model.named_buffers()), **{n: p.detach() for n, p in model.named_parameters()}}
    model.save_pretrained(path / (ADAPTER_DIR if lora else FULL_DIR), **extra)


def load_weights(model: Any, path: Path, lora: bool) -> None:
    """Restore what ``save_weights`` wrote into ``model`` (in place) and put it in eval mode."""
    from safetensors.torch import load_file

    if lora:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(path / ADAPTER_DIR / "adapter_model.safetensors")))
    else:
        state: dict[str, torch.Tensor] = {}
        for f in sorted((path / FULL_DIR).glob("*.safetensors")):
            state.update(load_file(str(f)))
        missing, _ = model.load_state_dict(state, strict=False)
        # Tied embeddings are saved once; anything else missing is a broken checkpoint.
        real_missing = [m for m in missing if "lm_head" not in m]
        if real_missing:
            raise RuntimeError(f"checkpoint {path} lacks weights {real_missing[:3]}")
    model.eval()


def rollout_stop_ids(tokenizer: Any, model: Any) -> list[int]:
    """The stop tokens of evaluation (``harness.generation.stop_token_ids``: the tokenizer's EOS, the model's own EOS
    list, the chat template's end-of-turn token) for RL rollouts, so training samples end where evaluation does."""
    from harness.generation import stop_token_ids

    return stop_token_ids(tokenizer, getattr(model, "generation_config", None))


@contextlib.contextmanager
def training_attention(*models: Any) -> Iterator[None]:
    """Inside: the models' attention is HF's ``eager`` instead of ``sdpa`` where they run in bf16 on CPU; a no-op
    elsewhere (GPU, fp32, or an attention implementation chosen with ``--model-args``). For forwards with gradients
    only (the SFT baseline's Trainer, weaver SFT): torch's CPU flash-attention backward in bf16 is slow on short rows
    (a SmolLM2 LoRA SFT step on 8 ``arith`` rows: 1.7 s eager against 2.3 s sdpa, the weaver SFT step 5.0 against
    5.9 s), while decoding keeps sdpa (1.4x faster than eager there). Same attention up to float rounding."""
    switched = []
    for m in models:
        base = m.get_base_model() if hasattr(m, "get_base_model") else m
        p = next(base.parameters(), None)
        if (p is not None and p.device.type == "cpu" and p.dtype == torch.bfloat16
                and getattr(base.config, "_attn_implementation", None) == "sdpa"
                and hasattr(base, "set_attn_implementation") and base not in switched):
            base.set_attn_implementation("eager")
            switched.append(base)
    try:
        yield
    finally:
        for base in switched:
            base.set_attn_implementation("sdpa")
