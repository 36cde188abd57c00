"""Options of the ``memgen`` method (``--set method_options.memgen.<name>=<value>``)."""

from __future__ import annotations

from dataclasses import dataclass

WEAVER_INPUTS = ("hidden", "embeddings")
WEAVER_TRAIN = ("sft", "grpo", "sft+grpo")
TRIGGERS = ("always", "trained")
TRIGGER_MODELS = ("lora", "head")
AGGREGATIONS = ("sequence", "token")
SCALES = ("group", "batch", "none")
TRIGGER_RATES = ("delimiters", "queried")
# Options a task definition may set for itself (``method_defaults.memgen`` in its YAML; the public code uses a cap
# of 3 on GSM8K and 0 on TriviaQA, trigger lr 1e-6 on GSM8K). The rest shape the weaver and must stay fixed over a
# sequence (one weaver learns every task).
PER_TASK = ("max_insertions", "sft_insertions", "lr", "grpo_lr", "grpo_aggregation", "trigger_lr",
            "trigger_train_fraction")


@dataclass(frozen=True)
class MemGenOptions:
    """How the memory weaver is built, where it inserts latents and how it is trained."""

    weaver_model: str | None = None
    """Weaver LM: None = the reasoner's own base with a LoRA adapter (no second copy); else a model name."""
    k_prompt: int = 8
    """Latent tokens inserted after the prompt."""
    k_infer: int = 8
    """Latent tokens inserted at each delimiter during decoding."""
    weaver_input: str = "hidden"
    """What the weaver reads: ``hidden`` (reasoner last-layer states, the paper) or ``embeddings`` (public code)."""
    delimiters: tuple[str, ...] = (",", ".", "\n")
    """A generated token whose text ends with one of these may trigger an insertion."""
    max_insertions: int = 5
    """Cap on insertions during decoding per row (the prompt insertion does not count)."""
    sft_insertions: int = -1
    """Delimiter insertions inside the target during weaver SFT: the first N; -1 = every one up to max_insertions."""
    insert_before_training: bool = False
    """Row 0 (``init``): False = no insertion before the first training stage (the frozen reasoner, as vanilla)."""
    lora_r: int = 16
    """Weaver LoRA rank."""
    lora_alpha: int = 32
    """Weaver LoRA scaling numerator."""
    lora_dropout: float = 0.1
    """Dropout on the weaver's LoRA branch."""
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    """Weaver modules that get LoRA."""
    lr: float | None = None
    """Weaver learning rate; None = ``train.lr``."""
    temperature: float = 0.0
    """Sampling temperature at evaluation; 0 = greedy."""
    # -- weaver RL and the memory trigger ------------------------------------------------------------
    weaver_train: str = "sft"
    """How the weaver learns each task: ``sft``, ``grpo`` (task scorer as reward) or ``sft+grpo`` (GRPO after SFT)."""
    grpo_steps: int = 0
    """Weaver GRPO steps per task (one rollout batch each); 0 = ``train.max_steps`` (or epochs over the prompts)."""
    grpo_group: int = 8
    """Weaver GRPO rollouts per prompt (the paper: 8)."""
    grpo_prompts_per_step: int = 1
    """Weaver GRPO prompts per step; a step decodes grpo_prompts_per_step * grpo_group rollouts."""
    grpo_lr: float | None = None
    """Weaver GRPO learning rate; None = ``lr``, else ``train.lr``."""
    grpo_temperature: float = 1.0
    """Sampling temperature of the weaver GRPO rollouts (the public code: 1.0)."""
    grpo_aggregation: str = "sequence"
    """Weaver GRPO loss aggregation: ``sequence`` (per-rollout token mean, then the batch: GRPO; the public code on
    GPQA, KodCode, TriviaQA) or ``token`` (mean over every token of the batch: TRL's ``bnpo``, the public code on GSM8K)."""
    grpo_scale: str = "group"
    """Weaver GRPO advantage scaling: ``group`` ((r - mean) / (std + 1e-4), the paper), ``batch`` or ``none``."""
    trigger: str = "always"
    """``always``: insert at every delimiter under the cap; ``trained``: after the weaver on each task, train the
    trigger (weaver frozen) and let it decide at evaluation (p(insert) >= trigger_threshold)."""
    trigger_model: str = "lora"
    """``lora``: the shared base with its own LoRA adapter reading the reasoner's states so far (latents included),
    2-way head on its last state; ``head``: LayerNorm + Linear on the reasoner's state at the delimiter (cheap)."""
    trigger_steps: int = 0
    """Trigger policy-gradient steps per task; 0 = ``train.max_steps`` (or epochs over the prompts)."""
    trigger_group: int = 8
    """Trigger rollouts per prompt (GRPO-style advantages per group; the paper: 8)."""
    trigger_prompts_per_step: int = 1
    """Trigger prompts per step; a step decodes trigger_prompts_per_step * trigger_group rollouts."""
    trigger_lam: float = 0.1
    """Sparsity penalty weight lambda of paper Eq. 8-9 (``../shared/MEMGEN.md``); 0 = the public code (no penalty)."""
    trigger_lr: float | None = None
    """Trigger learning rate; None = ``train.lr``."""
    trigger_threshold: float = 0.5
    """Evaluation inserts where p(insert) >= this (0.5 = argmax of the 2-way head)."""
    trigger_aggregation: str = "sequence"
    """Trigger loss aggregation over decisions: ``sequence`` (per rollout, then the batch) or ``token`` (TRL's
    ``bnpo`` over every decision of the batch; the public code's trigger GRPO on all its tasks)."""
    trigger_scale: str = "group"
    """Trigger advantage scaling: ``group``, ``batch`` or ``none`` (see ``grpo_scale``)."""
    trigger_rate: str = "delimiters"
    """Sparsity penalty's invocation rate: ``delimiters`` = insertions / every delimiter of the rollout (the paper's
    (1/|tau_i|) sum_j d_ij), ``queried`` = / the delimiters the trigger was asked at (under the cap)."""
    trigger_prompt: bool = False
    """The trigger also decides the prompt insertion (the public code); False = the prompt latents always go in."""
    trigger_train_fraction: float = 1.0
    """Share of the task's train split the trigger trains on (a seeded subset; the public code: a random third)."""
    # -- turn latents and retrieval for the weaver ---------------------------------------------
    turn_latents: bool = True
    """Multi-turn prompts (``meta["messages"]``): also weave a prompt-latent block at the start of every earlier
    assistant turn inside the prompt (the paper); False = only at the end of the prompt."""
    retrieval_k: int = 0
    """Solved examples retrieved for the weaver's input at the prompt insertion; 0 = no retrieval."""
    retrieval_backend: str = "dense"
    """Retriever (``harness/retrieval_index.py``): ``dense`` (all-MiniLM-L6-v2 embeddings) or ``bm25`` (bm25s)."""
    retrieval_store: str = "gold"
    """What the store holds: ``gold`` = the train split's gold solutions of the tasks trained so far."""
    retrieval_max_tokens: int = 256
    """Weaver tokens of retrieved text per row (each retrieved example gets an equal share)."""

    def for_task(self, defaults: dict, explicit: set[str]) -> MemGenOptions:
        """These options with a task definition's ``method_defaults.memgen`` applied (keys the user set win)."""
        import dataclasses

        bad = sorted(set(defaults) - set(PER_TASK))
        if bad:
            raise ValueError(f"task option method_defaults.memgen.{bad[0]} cannot be set per task (one weaver learns "
                             f"every task); per-task keys: {', '.join(PER_TASK)}")
        keep = {k: v for k, v in defaults.items() if k not in explicit}
        return dataclasses.replace(self, **keep).check() if keep else self

    def check(self) -> MemGenOptions:
        if self.weaver_input not in WEAVER_INPUTS:
            raise ValueError(f"memgen option weaver_input={self.weaver_input!r}: use one of {', '.join(WEAVER_INPUTS)}")
        for key in ("k_prompt", "k_infer", "lora_r"):
            if getattr(self, key) < 1:
                raise ValueError(f"memgen option {key} must be >= 1, got {getattr(self, key)}")
        if self.max_insertions < 0:
            raise ValueError(f"memgen option max_insertions must be >= 0, got {self.max_insertions}")
        if self.sft_insertions < -1:
            raise ValueError(f"memgen option sft_insertions must be >= 0 or -1 (up to the cap), got {self.sft_insertions}")
        if not self.delimiters or any(not d for d in self.delimiters):
            raise ValueError(f"memgen option delimiters must be non-empty strings, got {self.delimiters!r}")
        if self.temperature < 0:
            raise ValueError(f"memgen option temperature must be >= 0, got {self.temperature}")
        self._check_rl()
        self._check_context()
        return self

    def _check_rl(self) -> None:
        """Validate the weaver-RL and trigger options (one-line errors naming the option)."""
        choices = {"weaver_train": WEAVER_TRAIN, "trigger": TRIGGERS, "trigger_model": TRIGGER_MODELS}
        for key, valid in choices.items():
            if getattr(self, key) not in valid:
                raise ValueError(f"memgen option {key}={getattr(self, key)!r}: use one of {', '.join(valid)}")
        for key in ("grpo_steps", "trigger_steps"):
            if getattr(self, key) < 0:
                raise ValueError(f"memgen option {key} must be >= 0 (0 = train.max_steps), got {getattr(self, key)}")
        for key in ("grpo_group", "grpo_prompts_per_step", "trigger_group", "trigger_prompts_per_step"):
            if getattr(self, key) < 1:
                raise ValueError(f"memgen option {key} must be >= 1, got {getattr(self, key)}")
        for key in ("grpo_lr", "trigger_lr"):
            if getattr(self, key) is not None and not getattr(self, key) > 0:
                raise ValueError(f"memgen option {key} must be > 0 (or null = train.lr), got {getattr(self, key)}")
        if not self.grpo_temperature > 0:
            raise ValueError(f"memgen option grpo_temperature must be > 0 (rollouts are sampled), "
                             f"got {self.grpo_temperature}")
        if not self.trigger_lam >= 0:
            raise ValueError(f"memgen option trigger_lam must be >= 0, got {self.trigger_lam}")
        for key, valid in (("grpo_aggregation", AGGREGATIONS), ("trigger_aggregation", AGGREGATIONS),
                           ("grpo_scale", SCALES), ("trigger_scale", SCALES), ("trigger_rate", TRIGGER_RATES)):
            if getattr(self, key) not in valid:
                raise ValueError(f"memgen option {key}={getattr(self, key)!r}: use one of {', '.join(valid)}")
        if not 0.0 < self.trigger_train_fraction <= 1.0:
            raise ValueError(f"memgen option trigger_train_fraction must be in (0, 1], got {self.trigger_train_fraction}")
        if not 0.0 <= self.trigger_threshold <= 1.0:
            raise ValueError(f"memgen option trigger_threshold must be in [0, 1], got {self.trigger_threshold}")
        if self.trigger == "trained" and self.trigger_model == "lora" and self.weaver_model is not None:
            raise ValueError("memgen option trigger_model=lora shares the reasoner's base, which needs weaver_model "
                             "unset; set trigger_model=head with a separate weaver_model")

    def _check_context(self) -> None:
        """Validate the turn-latent and retrieval options."""
        from harness.memgen.retrieval import RETRIEVAL_BACKENDS, RETRIEVAL_STORES

        for key, valid in (("retrieval_backend", RETRIEVAL_BACKENDS), ("retrieval_store", RETRIEVAL_STORES)):
            if getattr(self, key) not in valid:
                raise ValueError(f"memgen option {key}={getattr(self, key)!r}: use one of {', '.join(valid)}")
        if self.retrieval_k < 0:
            raise ValueError(f"memgen option retrieval_k must be >= 0 (0 = off), got {self.retrieval_k}")
        if self.retrieval_max_tokens < 1:
            raise ValueError(f"memgen option retrieval_max_tokens must be >= 1, got {self.retrieval_max_tokens}")


def resolved_options(options: dict) -> dict:
    """Every ``memgen`` option as a run with ``options`` would use it (defaults filled in, validated)."""
    from harness.config import from_dict, to_dict

    return to_dict(from_dict(MemGenOptions, dict(options), prefix="method_options.memgen.").check())
