"""The ``memgen`` method: a frozen reasoner with a memory weaver trained on each task in turn.

Per task (``harness/memgen/rl_stages.py``): the weaver learns by SFT, GRPO (the task's scorer as reward,
``harness/memgen/grpo.py``) or SFT then GRPO (``weaver_train``); then, with ``trigger=trained``, the memory trigger
learns by policy gradient with the weaver frozen (``harness/memgen/trigger.py``) and decides at evaluation
(p(insert) >= ``trigger_threshold``). ``trigger=always`` (default) inserts at every delimiter under the cap.
Every evaluated sample records its insertion points and the trigger's queried/inserted counts.

Departures from the paper (MemGen, arXiv 2509.24704) and its public code:
- The trigger (``trigger_model=lora``) is a second LoRA adapter on the same shared base (no extra weights copy)
  reading the reasoner's last-layer states so far, latents included (the paper; the public code's trigger re-reads
  token ids); its LoRA has no dropout so the recomputed log-probs are the sampling policy's. ``trigger_model=head``
  is a cheap LayerNorm + Linear head on the reasoner's state at the delimiter. It is trained once per task, after
  the weaver, by GRPO-style advantages over its decisions with the sparsity penalty of paper Eq. 8-9
  (``trigger_lam``, default 0.1 -- our choice; the public code has none, = 0), lr ``train.lr`` unless
  ``trigger_lr``; the weaver is not re-trained after the trigger. While it trains, the reasoner decodes greedily.
- Weaver GRPO re-weaves the log-probs at the rollout's recorded insertion points (the public code re-weaves at the
  first-N-delimiter rule); weaver GRPO and trigger rollouts do not use ``turn_latents`` or retrieval prefixes.
- Multi-turn tasks store no per-sample insertion records (generate runs once per turn).
- The weaver is by default the reasoner's own base with a LoRA adapter (no second copy of the weights); the
  reasoner runs with the adapter off. The weaver reads the reasoner's last-layer states (``weaver_input=hidden``,
  as the paper) unless ``weaver_input=embeddings`` (as the public code).
- The query scales start at the weaver's token-embedding RMS (public code: 1.0) and both projections start at the
  scale of the space they write into, so the untrained weaver's latents are the size of token embeddings.
- Optimiser and schedule from ``train.*`` (batch 8, 32 steps, cosine, like the ``sft`` baseline) rather than
  the paper's 2 epochs at lr 1e-5: on this CPU the step budget must match SFT's. ``lr`` may be set separately.
- Weaver SFT is batched (the public code loops over samples one by one).
- Under ``accelerate launch`` weaver SFT, weaver GRPO and trigger training are data-parallel: each step's rows
  are split across processes and the weaver/trigger gradients summed by hand (``harness.distributed``); the
  woven forward is not one module call DDP could wrap. Verified with 2 gloo processes (identical weights).
- Multi-turn tasks (``turn_latents``, default on; ``harness/memgen/turns.py``): each turn is one ``generate`` call
  on the whole conversation, so the prompt latents at the start of every earlier assistant turn are re-woven
  during that call's prefill from the history as it is now (the paper's agent keeps them from the earlier turns;
  the reasoner's context holds the same text, and the turn's own decoding-time latents are not replayed).
  A turn start inside a token puts the latents after that token. Weaver SFT on expert turns weaves the same way.
- Retrieval for the weaver (``retrieval_k > 0``; ``harness/memgen/retrieval.py``; our design, the paper
  only notes the weaver can take textual cues): the weaver first reads the token embeddings of the top-k gold
  solutions (question + gold target) of the train splits trained so far, retrieved by the question (dense or
  BM25); the reasoner's prompt is unchanged. The store is saved with every stage's checkpoint; SFT retrieval
  excludes the example itself.
- Row 0 of the matrix (``init``, before any training): the weaver is untrained, so memgen generates without
  insertion, i.e. exactly the frozen reasoner (= vanilla). ``insert_before_training=true`` inserts anyway.
- In a sequence the same weaver keeps training on each new task (fresh optimiser and schedule per task).

Kept as the paper and its public code do (tested in ``tests/test_memgen_fidelity.py``):
- Weaver and trigger parameters (LoRA, queries, LayerNorms, scales, projections, trigger head) are fp32 whatever
  the model dtype and are cast at use (the public code trains under ZeRO-2 with fp32 master weights).
- Only the weaver's LoRA dropout modules ever enter train mode; the reasoner stays in eval mode (deterministic even
  with attention dropout) and adapter switches never touch ``requires_grad`` (checked before every backward).
- Weaver GRPO recomputes log-probs at the rollout temperature with LoRA dropout off, as the rollout sampled.
- Settable as in the public code: loss aggregation (``grpo_aggregation``/``trigger_aggregation``, ``token`` =
  bnpo), advantage scaling, the trigger deciding the prompt insertion (``trigger_prompt``), the trigger's random
  share of the train split (``trigger_train_fraction``), ChatML (``chat_template=chatml``), per-task caps and
  learning rates from the task definition (``method_defaults.memgen``), and the paper's sparsity rate over every
  delimiter of a rollout (``trigger_rate=delimiters``, default). Profiles: ``configs/paper/``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from harness.config import RunConfig, from_dict, to_dict
from harness.generation import length_sorted_batches
from harness.memgen.generation import completion_length, delimiter_mask, memgen_generate
from harness.memgen.options import PER_TASK, MemGenOptions
from harness.memgen.retrieval import WeaverRetrieval
from harness.memgen.rl_stages import build_trigger, phase_hook, train_grpo_stage, train_trigger_stage
from harness.memgen.sft import SFTSchedule, pad_id_of, prefix_batch, train_weaver
from harness.memgen.trigger import TriggerRecorder, load_trigger, save_trigger
from harness.memgen.turns import turn_points
from harness.memgen.weaver import MemGenModel
from harness.models import LoadedModel, load_model
from harness.progress import advance as cell_advance
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
        self.base_opts = self.opts  # ``opts`` is swapped per task while training on / evaluating it (for_task)
        self.explicit = set(options)  # options the run set itself: a task definition's defaults never override them
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
        self.last_turn_points: list[list[int]] = []
        self.last_records: list[dict[str, Any]] = []  # per prompt: insertion points and trigger counts (samples/)
        self.trigger = build_trigger(self.mm, derive_seed(cfg.seed, "memgen-trigger-init"))  # None: always insert
        self.trigger_trained = False
        o = self.opts
        self.retrieval = (WeaverRetrieval(o.retrieval_k, o.retrieval_backend, o.retrieval_store, o.retrieval_max_tokens,
                                          self.mm.weaver_tokenizer) if o.retrieval_k > 0 else None)

    @contextlib.contextmanager
    def for_task(self, task: Task) -> Iterator[MemGenOptions]:
        """Inside: the options as the task's definition sets them (``method_defaults.memgen``: insertion cap,
        learning rates, trigger subset), for this method and its model alike."""
        d = getattr(getattr(task, "definition", None), "method_defaults", None) or {}
        opts = self.base_opts.for_task(d.get(self.name, {}), self.explicit)
        self.opts = self.mm.opts = opts
        try:
            yield opts
        finally:
            self.opts = self.mm.opts = self.base_opts

    @property
    def inserting(self) -> bool:
        return self.trained or self.opts.insert_before_training

    def plain_decoding(self) -> bool:
        """True while ``generate`` is the frozen reasoner's greedy decoding of the task prompts (no latents, no
        sampling): row 0 then shares the frozen model's cached cell (``harness/eval_cache.py``)."""
        return not self.inserting and self.opts.temperature == 0

    def weaver_context(self, task: Task, examples: Sequence[Example], train: bool = False
                       ) -> tuple[list[list[int]] | None, list[list[int]] | None]:
        """What the weaver sees besides the reasoner's prompt, per example: the prompt token offsets of earlier
        assistant-turn starts (``turn_latents``) and the weaver-token ids of retrieved solved examples
        (``retrieval_k``); None where off or empty everywhere. ``train``: retrieval excludes the example itself."""
        turns = None
        if self.opts.turn_latents and any(e.meta.get("messages") for e in examples):
            tok = self.tokenizer
            turns = [turn_points(tok, task.prompt(e, tok), e.meta.get("messages")) for e in examples]
            turns = turns if any(turns) else None
        prefixes = None
        if self.retrieval is not None:
            prefixes = self.retrieval.prefixes(task, examples, exclude_self=train)
            prefixes = prefixes if any(prefixes) else None
        return turns, prefixes

    def train_on_task(self, task: Task, examples: Sequence[Example], stage: int) -> dict[str, Any]:
        with self.for_task(task) as opts:
            stats = self._train_on_task(task, examples, stage)
        changed = {k: getattr(opts, k) for k in PER_TASK if getattr(opts, k) != getattr(self.base_opts, k)}
        if changed:
            stats["task_options"] = changed  # what the task definition set for this stage
        return stats

    def _train_on_task(self, task: Task, examples: Sequence[Example], stage: int) -> dict[str, Any]:
        seed = derive_seed(self.cfg.seed, "train", stage)
        set_seed(seed)
        t = self.cfg.train
        rows = []
        for e in examples:
            # at least prompt + the task's generation budget: no target the model could produce is cut (as sft)
            r = tokenize_prompt_target(self.tokenizer, task.prompt(e, self.tokenizer), e.target, t.max_length,
                                       target_budget=self.cfg.eval.max_new_tokens or task.max_new_tokens)
            rows.append((r["input_ids"][: r["prompt_len"]], r["input_ids"][r["prompt_len"] :]))
        n_points = self.opts.max_insertions if self.opts.sft_insertions < 0 else self.opts.sft_insertions
        sch = SFTSchedule(steps=steps_for(t, len(rows)), batch_size=t.batch_size * t.grad_accum,
                          lr=self.opts.lr or t.lr, warmup_ratio=t.warmup_ratio, scheduler=t.scheduler,
                          max_grad_norm=t.max_grad_norm, weight_decay=t.weight_decay, seed=seed)
        if self.retrieval is not None:
            self.retrieval.add_task(task, examples, stage)  # retrieval in SFT then excludes each example itself
        turns, prefixes = self.weaver_context(task, examples, train=True)
        stats: dict[str, Any] = {}
        if self.opts.weaver_train in ("sft", "sft+grpo"):
            stats = train_weaver(self.mm, rows, self.is_delim, n_points, sch,
                                 label=f"memgen weaver sft on {task.name}", turn_points=turns, weaver_prefixes=prefixes,
                                 on_step=phase_hook(self, "weaver-sft"))
        if self.opts.weaver_train in ("grpo", "sft+grpo"):  # weaver GRPO, from the SFT weaver with sft+grpo
            stats["grpo"] = train_grpo_stage(self, task, examples, stage)
        if self.retrieval is not None:
            stats["retrieval"] = self.retrieval.stats()
        self.trained = True
        if self.trigger is not None:  # then the trigger, weaver frozen
            stats["trigger"] = train_trigger_stage(self, task, examples, stage)
            self.trigger_trained = True
        stats["seconds"] = sum(float(v.get("seconds", 0.0)) for v in (stats, stats.get("grpo", {}),
                                                                    stats.get("trigger", {})))
        stats.update(self._budget(stats))
        return stats

    def _budget(self, stats: dict[str, Any]) -> dict[str, Any]:
        """The stage's budget keys (``harness/budget.py``) summed over its phases (weaver SFT, GRPO, trigger)."""
        phases = [p for p in (stats, stats.get("grpo"), stats.get("trigger")) if isinstance(p, dict) and "steps" in p]
        seen: set[int] = set()
        for p in phases:
            seen.update(p.pop("examples", []))
        weaver = sum(p.numel() for p in self.mm.weaver_parameters())
        trigger = stats.get("trigger", {}).get("trainable_params", 0) if isinstance(stats.get("trigger"), dict) else 0
        return {"examples_seen": len(seen),
                "optimizer_steps": sum(int(p.get("optimizer_steps", 0)) for p in phases),
                "train_tokens": sum(int(p.get("train_tokens", 0)) for p in phases),
                "generated_tokens": sum(int(p.get("generated_tokens", 0)) for p in phases),
                "trainable_params": weaver + trigger}

    def generate(self, task: Task, examples: Sequence[Example], max_new_tokens: int) -> list[str]:
        with self.for_task(task):
            return self._generate(task, examples, max_new_tokens)

    def _generate(self, task: Task, examples: Sequence[Example], max_new_tokens: int) -> list[str]:
        tok = self.tokenizer
        prompts = [task.prompt(e, tok) for e in examples]
        self.last_prompts = prompts
        ids = [tok(p, add_special_tokens=False).input_ids for p in prompts]
        out: list[str] = [""] * len(prompts)
        self.last_insertions = [[] for _ in prompts]
        self.last_turn_points = [[] for _ in prompts]
        self.last_records = [{} for _ in prompts]
        turns, prefixes = self.weaver_context(task, examples) if self.inserting else (None, None)
        device = self.mm.embed.weight.device
        gen = torch.Generator(device=device).manual_seed(derive_seed(self.cfg.seed, "memgen-sample"))
        for idx in length_sorted_batches([len(i) for i in ids], self.cfg.eval.batch_size):
            width = max(len(ids[i]) for i in idx)
            input_ids = torch.full((len(idx), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                input_ids[row, width - len(ids[i]):] = torch.tensor(ids[i])
                mask[row, width - len(ids[i]):] = 1
            # The trained trigger decides (thresholded) once trained; before that every candidate inserts.
            rec = TriggerRecorder(self.trigger if self.trigger_trained else None, keep_states=False,
                                  policy="threshold" if self.trigger_trained else "always",
                                  threshold=self.opts.trigger_threshold)
            res = memgen_generate(self.mm, input_ids.to(device), mask.to(device), max_new_tokens,
                                  insert=self.inserting, delimiters=self.is_delim, trigger=rec,
                                  temperature=self.opts.temperature, eos_token_ids=self.mm.stop_ids(), generator=gen,
                                  trigger_prompt=self.trigger_trained and self.opts.trigger_prompt,
                                  turn_points=None if turns is None else [turns[i] for i in idx],
                                  weaver_prefix=None if prefixes is None else prefix_batch(
                                      [prefixes[i] for i in idx], pad_id_of(self.mm.weaver_tokenizer), device))
            for row, i in enumerate(idx):
                out[i] = tok.decode(res.sequences[row], skip_special_tokens=True)
                self.last_insertions[i] = res.insertions[row]
                self.last_turn_points[i] = res.turn_points[row]
            asked, inserted = rec.counts(len(idx))
            for row, i in enumerate(idx):  # no latents: no MemGen fields, so the samples equal the frozen model's
                self.last_records[i] = {"insertions": res.insertions[row], "trigger_queried": asked[row],
                                        "trigger_inserted": inserted[row]} if self.inserting else {}
            cell_advance(len(idx), sum(completion_length(res.sequences[row].tolist(), self.mm.stop_ids())
                                       for row in range(len(idx))))  # the cell's progress (harness/progress.py)
        return out

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        self.mm.peft.save_pretrained(path / ADAPTER_DIR, selected_adapters=["default"])
        save_file({k: v.detach().contiguous() for k, v in self.mm.heads.state_dict().items()}, str(path / HEADS_FILE))
        (path / STATE_FILE).write_text(json.dumps({"trained": self.trained, "trigger_trained": self.trigger_trained,
                                                   "options": to_dict(self.opts)}, indent=1))
        if self.trigger is not None and self.trigger_trained:
            save_trigger(self.trigger, path)
        if self.retrieval is not None:
            self.retrieval.save(path)  # the store as it is after this stage (a snapshot per checkpoint)

    def load(self, path: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        for need in (path / ADAPTER_DIR / "adapter_model.safetensors", path / HEADS_FILE, path / STATE_FILE):
            if not need.exists():
                raise FileNotFoundError(f"memgen checkpoint {path} lacks {need.name}; was it written by memgen?")
        state = json.loads((path / STATE_FILE).read_text())
        saved = from_dict(MemGenOptions, state["options"])
        keys = ["k_prompt", "k_infer", "weaver_input", "weaver_model", "lora_r", "lora_alpha", "lora_targets"]
        if self.trigger is not None and state.get("trigger_trained"):
            keys.append("trigger_model")  # a trained trigger loads only into a trigger of the same kind
        for key in keys:
            if getattr(saved, key) != getattr(self.opts, key):
                raise ValueError(f"memgen checkpoint {path} was saved with {key}={getattr(saved, key)!r}, "
                                 f"but this run has {getattr(self.opts, key)!r}; set method_options.memgen.{key}")
        device = self.mm.embed.weight.device
        set_peft_model_state_dict(self.mm.peft, load_file(str(path / ADAPTER_DIR / "adapter_model.safetensors"),
                                                          device=str(device)))
        self.mm.heads.load_state_dict(load_file(str(path / HEADS_FILE), device=str(device)))
        self.trained = bool(state["trained"])
        # A run with trigger=trained takes the checkpoint's trigger (trigger=always ignores it: an ablation).
        self.trigger_trained = self.trigger is not None and bool(state.get("trigger_trained", False))
        if self.trigger_trained:
            load_trigger(self.trigger, path)  # type: ignore[arg-type]
        if self.retrieval is not None:
            self.retrieval.load(path)
        self.mm.peft.eval()
