"""The ``memgen`` method: a frozen reasoner with a memory weaver trained by SFT on each task in turn.

Departures from the paper (MemGen, arXiv 2509.24704) and its public code:
- Weaver SFT only (weaver GRPO and the trained trigger come with issue 4); the trigger is "always insert" at
  delimiters, under the cap of ``max_insertions``.
- The weaver is by default the reasoner's own base with a LoRA adapter (no second copy of the weights); the
  reasoner runs with the adapter off. The weaver reads the reasoner's last-layer states (``weaver_input=hidden``,
  as the paper) unless ``weaver_input=embeddings`` (as the public code).
- The query scales start at the weaver's token-embedding RMS (public code: 1.0) and both projections start at the
  scale of the space they write into, so the untrained weaver's latents are the size of token embeddings.
- Optimiser and schedule from ``train.*`` (batch 8, 96 steps, cosine, like the ``sft`` baseline) rather than
  the paper's 2 epochs at lr 1e-5: on this CPU the step budget must match SFT's. ``lr`` may be set separately.
- Weaver SFT is batched (the public code loops over samples one by one).
- Row 0 of the matrix (``init``, before any training): the weaver is untrained, so memgen generates without
  insertion, i.e. exactly the frozen reasoner (= vanilla). ``insert_before_training=true`` inserts anyway.
- In a sequence the same weaver keeps training on each new task (fresh optimiser and schedule per task).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from harness.config import RunConfig, from_dict, to_dict
from harness.generation import length_sorted_batches, stop_token_ids
from harness.memgen.generation import delimiter_mask, memgen_generate
from harness.memgen.options import MemGenOptions
from harness.memgen.sft import SFTSchedule, train_weaver
from harness.memgen.weaver import MemGenModel
from harness.models import LoadedModel, load_model
from harness.seeding import derive_seed, set_seed
from harness.training import steps_for, tokenize_prompt_target
from tasks.base import Example, Task

ADAPTER_DIR = "weaver_adapter"
HEADS_FILE = "weaver_heads.safetensors"
STATE_FILE = "memgen.json"


class MemGen:
    name = "memgen"

    def __init__(self, model: LoadedModel, cfg: RunConfig, options: dict[str, Any]):
        self.cfg = cfg
        self.opts = from_dict(MemGenOptions, options).check()
        self.tokenizer = model.tokenizer
        weaver = None
        if self.opts.weaver_model is not None:
            weaver = load_model(self.opts.weaver_model, cfg.dtype, cfg.device, seed=cfg.seed)
        with torch.random.fork_rng():
            torch.manual_seed(derive_seed(cfg.seed, "memgen-weaver-init"))
            self.mm = MemGenModel(model, self.opts, weaver)
        self.is_delim = delimiter_mask(self.tokenizer, self.opts.delimiters, self.mm.lm_head.weight.shape[0])
        self.trained = False
        self.last_prompts: list[str] = []
        self.last_insertions: list[list[int]] = []

    @property
    def inserting(self) -> bool:
        return self.trained or self.opts.insert_before_training

    def train_on_task(self, task: Task, examples: Sequence[Example], stage: int) -> dict[str, Any]:
        seed = derive_seed(self.cfg.seed, "train", stage)
        set_seed(seed)
        t = self.cfg.train
        rows = []
        for e in examples:
            r = tokenize_prompt_target(self.tokenizer, task.prompt(e, self.tokenizer), e.target, t.max_length)
            rows.append((r["input_ids"][: r["prompt_len"]], r["input_ids"][r["prompt_len"] :]))
        n_points = self.opts.max_insertions if self.opts.sft_insertions < 0 else self.opts.sft_insertions
        sch = SFTSchedule(steps=steps_for(t, len(rows)), batch_size=t.batch_size * t.grad_accum,
                          lr=self.opts.lr or t.lr, warmup_ratio=t.warmup_ratio, scheduler=t.scheduler,
                          max_grad_norm=t.max_grad_norm, weight_decay=t.weight_decay, seed=seed)
        stats = train_weaver(self.mm, rows, self.is_delim, n_points, sch, label=f"memgen weaver sft on {task.name}")
        self.trained = True
        return stats

    def generate(self, task: Task, examples: Sequence[Example], max_new_tokens: int) -> list[str]:
        tok = self.tokenizer
        prompts = [task.prompt(e, tok) for e in examples]
        self.last_prompts = prompts
        ids = [tok(p, add_special_tokens=False).input_ids for p in prompts]
        out: list[str] = [""] * len(prompts)
        self.last_insertions = [[] for _ in prompts]
        device = self.mm.embed.weight.device
        gen = torch.Generator(device=device).manual_seed(derive_seed(self.cfg.seed, "memgen-sample"))
        for idx in length_sorted_batches([len(i) for i in ids], self.cfg.eval.batch_size):
            width = max(len(ids[i]) for i in idx)
            input_ids = torch.full((len(idx), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                input_ids[row, width - len(ids[i]):] = torch.tensor(ids[i])
                mask[row, width - len(ids[i]):] = 1
            res = memgen_generate(self.mm, input_ids.to(device), mask.to(device), max_new_tokens,
                                  insert=self.inserting, delimiters=self.is_delim,
                                  temperature=self.opts.temperature, eos_token_ids=stop_token_ids(tok), generator=gen)
            for row, i in enumerate(idx):
                out[i] = tok.decode(res.sequences[row], skip_special_tokens=True)
                self.last_insertions[i] = res.insertions[row]
        return out

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        self.mm.peft.save_pretrained(path / ADAPTER_DIR)
        save_file({k: v.detach().contiguous() for k, v in self.mm.heads.state_dict().items()}, str(path / HEADS_FILE))
        (path / STATE_FILE).write_text(json.dumps({"trained": self.trained, "options": to_dict(self.opts)}, indent=1))

    def load(self, path: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        for need in (path / ADAPTER_DIR / "adapter_model.safetensors", path / HEADS_FILE, path / STATE_FILE):
            if not need.exists():
                raise FileNotFoundError(f"memgen checkpoint {path} lacks {need.name}; was it written by memgen?")
        state = json.loads((path / STATE_FILE).read_text())
        saved = from_dict(MemGenOptions, state["options"])
        for key in ("k_prompt", "k_infer", "weaver_input", "weaver_model", "lora_r", "lora_targets"):
            if getattr(saved, key) != getattr(self.opts, key):
                raise ValueError(f"memgen checkpoint {path} was saved with {key}={getattr(saved, key)!r}, "
                                 f"but this run has {getattr(self.opts, key)!r}; set method_options.memgen.{key}")
        device = self.mm.embed.weight.device
        set_peft_model_state_dict(self.mm.peft, load_file(str(path / ADAPTER_DIR / "adapter_model.safetensors"),
                                                          device=str(device)))
        self.mm.heads.load_state_dict(load_file(str(path / HEADS_FILE), device=str(device)))
        self.trained = bool(state["trained"])
        self.mm.peft.eval()
