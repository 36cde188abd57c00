"""SFT: supervised fine-tuning of the reasoner on each task's gold targets, one task after another.

Departures from the paper's SFT baseline (MemGen, arXiv 2509.24704, Sec. 5):
- LoRA (peft, r=16, alpha=32 on the attention projections) by default instead of full fine-tuning. Attention-only
  LoRA learns and forgets less than the paper's full SFT: ``train.lora_targets=all-linear`` adds the MLP
  projections (every linear layer but the head), ``train.lora=false`` fine-tunes the whole model (then lower
  ``train.lr``, e.g. 1e-5).
- One LoRA adapter is trained on through the whole sequence (that is what continual SFT means); a fresh
  optimizer and schedule per task, seeded from (master seed, stage) so a resumed run repeats exactly.
- Loss on target tokens only (prompt masked), via ``transformers.Trainer``; the head's logits are computed only
  from the first target-predicting position on (``logits_to_keep``), the same loss without the prompt's logits. Rows keep at least prompt + the task's
  generation budget + EOS whatever ``train.max_length`` says (code targets were cut before); targets longer than
  that are cut and counted in ``truncated_targets``.
- Budget (``harness/budget.py``): distinct targets seen (exact: the Trainer's sampler draws passes without
  replacement), optimizer steps, non-padding tokens through the forward (``num_input_tokens_seen``), trainable
  parameters.
- Under ``accelerate launch`` the Trainer runs DDP: ``train.batch_size`` is the global batch, split over the
  processes; each process's loss is its own token mean, so the averaged gradient differs slightly from the
  single-process token mean when the processes' target lengths differ. Verified with 2 gloo processes on CPU
  (identical weights on every process, checked after each task), also under FSDP2 and DeepSpeed ZeRO-2 and ZeRO-3
  (``harness/sharded.py``: after each task every process gathers the sharded weights and keeps them whole, so that
  the sharded evaluation, the main process's checkpoint and the sync check see full weights).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import Trainer
from transformers.trainer_callback import PrinterCallback

from harness.budget import distinct_draws, trainable_parameters
from harness.config import RunConfig
from harness.distributed import check_in_sync
from harness.generation import generate_greedy
from harness.models import LoadedModel
from harness.seeding import derive_seed, set_seed
from harness.sharded import gather_weights, release_engine, shard_weights
from harness.training import (
    LossGuard,
    accepts_logits_to_keep,
    load_weights,
    pad_right,
    save_weights,
    steps_for,
    tokenize_prompt_target,
    trainable_model,
    training_arguments,
    training_attention,
)
from tasks.base import Example, Task


class SFT:
    name = "sft"

    def __init__(self, model: LoadedModel, cfg: RunConfig, options: dict[str, Any]):
        if options:
            raise ValueError(f"method sft takes no options (use train.*), got {sorted(options)}")
        self.cfg = cfg
        self.tokenizer = model.tokenizer
        self.model = trainable_model(model.model, cfg, "sft")

    def train_on_task(self, task: Task, examples: Sequence[Example], stage: int) -> dict[str, Any]:
        seed = derive_seed(self.cfg.seed, "train", stage)
        set_seed(seed)
        t = self.cfg.train
        rows = [
            tokenize_prompt_target(self.tokenizer, task.prompt(e, self.tokenizer), e.target, t.max_length,
                                   target_budget=task.max_new_tokens)
            for e in examples
        ]
        full = [len(self.tokenizer(e.target, add_special_tokens=False).input_ids) + 1 for e in examples]
        truncated = sum(len(r["input_ids"]) - r["prompt_len"] < n for r, n in zip(rows, full, strict=True))
        steps = steps_for(t, len(rows))
        shard_weights(self.model)  # FSDP2/ZeRO-3 from an earlier task: the Trainer's optimizer must see the shards
        guard = LossGuard(f"sft on {task.name}", getattr(self, "on_step", None))
        trim = accepts_logits_to_keep(self.model)  # head and loss on the target positions only (same loss)
        trainer = Trainer(
            model=self.model,
            args=training_arguments(self.cfg, seed, steps, include_num_input_tokens_seen="non_padding"),
            train_dataset=rows,
            data_collator=lambda b: pad_right(b, self.tokenizer.pad_token_id, trim_logits=trim),
            callbacks=[guard],
        )
        # With tqdm disabled, Trainer prints every log dict to stdout; the runner's progress bar shows the loss.
        trainer.remove_callback(PrinterCallback)
        self.model.train()
        t0 = time.perf_counter()
        with training_attention(self.model):  # bf16 on CPU: eager attention's backward is faster there
            trainer.train()
        release_engine(trainer.accelerator)  # DeepSpeed: its hooks off the model (ZeRO-3 gathers in them)
        gather_weights(self.model)  # FSDP2/ZeRO-3: whole weights for evaluation, the checkpoint and the sync check
        self.model.eval()
        check_in_sync([p for p in self.model.parameters() if p.requires_grad], f"sft on {task.name}")
        draws = trainer.state.global_step * t.batch_size * t.grad_accum  # batch_size is the global batch
        return {"steps": steps, "seconds": time.perf_counter() - t0, "losses": guard.losses,
                "truncated_targets": truncated, "examples_seen": distinct_draws(len(rows), draws),
                "optimizer_steps": trainer.state.global_step, "train_tokens": int(trainer.state.num_input_tokens_seen),
                "generated_tokens": 0, "trainable_params": trainable_parameters(self.model.parameters())}

    def generate(self, task: Task, examples: Sequence[Example], max_new_tokens: int) -> list[str]:
        prompts = [task.prompt(e, self.tokenizer) for e in examples]
        return generate_greedy(self.model, self.tokenizer, prompts, max_new_tokens, self.cfg.eval.batch_size)

    def save(self, path: Path) -> None:
        save_weights(self.model, path, self.cfg.train.lora)

    def load(self, path: Path) -> None:
        load_weights(self.model, path, self.cfg.train.lora)
