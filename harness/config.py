"""Run configuration: frozen dataclasses, loadable from YAML, with dotted overrides (``train.lr=1e-4``).

The CLI is a thin layer that builds a ``RunConfig`` from its options, a ``--config`` YAML file and ``--set``
overrides, in that order of precedence (last wins).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DTYPE_NAMES = ("fp32", "bf16", "fp16", "auto")
CHAT_TEMPLATE_NAMES = ("native", "chatml", "none")  # harness.models.chat_templates(); kept here so config needs
# no torch; any other value must be the path of a Jinja chat-template file
REPORT_TO = ("none", "tensorboard", "wandb")  # harness/tracking.py


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and the valid values."""


@dataclass(frozen=True)
class TrainConfig:
    """How each method trains on one task (methods read what applies to them)."""

    train_limit: int | None = 256
    """Training examples per task (seeded subsample); None = the whole train split."""
    max_steps: int = 32
    """Optimizer steps per task; 0 = derive from ``epochs``. 32 x batch 8 at lr 1e-3 is the laptop default: on
    ``quick`` it lets SFT and MemGen learn within the 2-core CPU budget (README "What a run does")."""
    epochs: float = 1.0
    """Passes over the training examples when ``max_steps`` is 0."""
    batch_size: int = 8
    """Examples per optimizer step (per process)."""
    grad_accum: int = 1
    """Gradient accumulation steps."""
    lr: float = 1e-3
    """Peak learning rate (LoRA and MemGen-weaver default at the short default schedule; use ~1e-5 for full
    fine-tuning, and the paper profiles' rates under ``configs/paper``)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_ratio: float = 0.1
    """Linear warm-up fraction of the steps."""
    scheduler: str = "cosine"
    """Learning-rate schedule: cosine, linear or constant (transformers names)."""
    max_length: int = 512
    """Prompt + target tokens kept; never less than the prompt + the task's generation budget (+ EOS), so a target
    the model could produce at evaluation is never cut (longer targets are truncated from the right)."""
    lora: bool = True
    """LoRA adapter (peft) instead of full fine-tuning."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA branch (SFT, MemGen); the RL baselines use 0 so the PPO ratio is exactly 1 (OpenRLHF's
    default lora_dropout is 0 too)."""
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    """Module names that get a LoRA adapter; ``all-linear`` adapts every linear layer (attention + MLP), closer to
    the paper's full-model SFT (or use ``lora: false`` for full fine-tuning)."""
    max_grad_norm: float = 1.0
    """Gradient clipping."""


REFERENCES = ("init", "task_start")


@dataclass(frozen=True)
class RLConfig:
    """Regularisation shared by the RL baselines (``grpo``, ``reinforce_pp``): one rule for both, so their
    forgetting compares algorithms, not regularisers. Each applies it in its own paper's form (GRPO: TRL's k3 KL
    loss, beta = ``kl_coef``; REINFORCE++: the k1 KL in the per-token reward, or OpenRLHF's k2 KL loss for the
    ``baseline`` variant)."""

    kl_coef: float = 0.0
    """KL coefficient against the reference policy; 0 (default) = no KL term and no reference forward."""
    reference: str = "init"
    """The KL reference: init (the model before the whole sequence) or task_start (the policy when the current
    task's training began)."""


@dataclass(frozen=True)
class EvalConfig:
    """How every cell of the accuracy matrix is measured."""

    limit: int | None = 32
    """Test examples per task (seeded subsample); None = the whole test split. 32 keeps the default run short (a
    cell's 95% CI is then about +-17 points); sweeps that compare methods use 128 or more."""
    batch_size: int = 32
    """Prompts per generation batch. 32 (a default cell in one batch) decodes a ``quick`` matrix row 1.33x faster
    than 16 on 2 CPU cores without latents and 1.14x with them (``benchmarks/bench_eval_batch.py``)."""
    max_new_tokens: int | None = None
    """Override of each task's own generation budget."""
    backend: str = "hf"
    """Generation backend: hf (transformers ``generate``) or vllm (one vLLM engine per run for vanilla, sft, grpo,
    reinforce_pp, expel, awm, also their RL rollouts; memgen keeps hf; ``harness/vllm_backend.py``)."""
    vllm_args: dict[str, Any] = field(default_factory=dict)
    """Extra ``vllm.LLM`` arguments with backend vllm, e.g. ``tensor_parallel_size``, ``gpu_memory_utilization``,
    ``max_model_len``."""
    cache: bool = True
    """Compute the init row once for every method that decodes the frozen model the same way (vanilla, sft, grpo,
    reinforce_pp before training; ``harness/eval_cache.py``); false = always recompute."""
    cache_dir: str | None = None
    """Where cached cells live; None = ``<out>/eval-cache`` (a sweep points all its cells at one folder)."""


@dataclass(frozen=True)
class RunConfig:
    """One continual-learning run: a task sequence, methods, a model and a seed."""

    sequence: str = "quick"
    """A named sequence (``memgen-bench tasks``) or an inline list ``a,b,c`` / ``a->b->c``."""
    probes: tuple[str, ...] | None = None
    """General-ability probes: tasks evaluated in every row of the matrix (init included) and never trained on.
    None = the named sequence's own ``probes:`` (none for an inline list); ``[]`` or ``none`` = no probes."""
    methods: tuple[str, ...] = ("vanilla", "sft", "memgen")
    """Methods to run, each in its own run directory under ``out``."""
    model: str = "smollm2-135m"
    """Reasoner: Hub id, local folder, .gguf file, ``smollm2-135m`` or ``tiny-random``."""
    dtype: str = "auto"
    """fp32, bf16, fp16 or auto (the checkpoint's dtype on GPU; on CPU bf16 only for a bf16 checkpoint on a CPU
    with native bf16, else fp32); auto is resolved before the run starts and recorded as the dtype it chose.
    The default, auto, runs ``smollm2-135m`` (a bf16 checkpoint) in bf16 on a CPU with AMX/AVX512-BF16: the
    default run (32 steps per task) then takes 10-14 min on 2 cores (README; AMX vs AVX512-BF16 alone). Pin fp32
    to compare with fp32 results."""
    model_args: dict[str, Any] = field(default_factory=dict)
    """Extra ``from_pretrained`` arguments, as lm-eval's ``--model_args``: ``revision``, ``trust_remote_code``
    (also given to the tokenizer), ``attn_implementation``, ``device_map``, ... (``--model-args k=v,k=v``)."""
    chat_template: str = "native"
    """Chat template of prompts and targets: ``native`` (the tokenizer's own), ``chatml`` (the bare ChatML template
    without a system turn that the MemGen public code forces on every tokenizer; ``harness.models.CHATML``),
    ``none`` (no template: the plain message text) or the path of a Jinja template file."""
    system_prompt: str | None = None
    """A system message put before every conversation that has none (replacing a template's default one)."""
    report_to: str = "none"
    """Experiment tracking: none, tensorboard or wandb (logs under each run directory; ``harness/tracking.py``)."""
    device: str = "cpu"
    """cpu, cuda or cuda:N."""
    seed: int = 0
    """Master seed: data subsampling, initialisation and training all derive from it."""
    limit: int | None = None
    """Shortcut capping both train and test examples per task (smoke runs); overrides the two limits."""
    data_dir: str | None = None
    """Folder with local benchmark JSONL files (else ``$MEMGEN_BENCH_DATA``, else the Hub)."""
    out: str = "runs/default"
    """Output root; one run directory per method below it."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training settings."""
    rl: RLConfig = field(default_factory=RLConfig)
    """KL regularisation of the RL baselines."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation settings."""
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-method options, e.g. ``{memgen: {k_prompt: 8}}`` (``--set method_options.memgen.k_prompt=8``)."""

    @property
    def train_limit(self) -> int | None:
        return self.limit if self.limit is not None else self.train.train_limit

    @property
    def eval_limit(self) -> int | None:
        return self.limit if self.limit is not None else self.eval.limit


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], key) for v in value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError as exc:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from exc
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from exc
    if tp is str:
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build a (nested) frozen dataclass from a plain mapping, rejecting unknown keys by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) {[prefix + u for u in unknown]}; valid: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value, prefix=f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    return validate(cls(**kwargs)) if cls is RunConfig else cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    out = dataclasses.asdict(cfg)

    def lists(x: Any) -> Any:
        if isinstance(x, tuple):
            return [lists(v) for v in x]
        if isinstance(x, dict):
            return {k: lists(v) for k, v in x.items()}
        return x

    return lists(out)


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply ``key.sub=value`` strings (values parsed as YAML scalars) to a config."""
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else None
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            if p not in node or not isinstance(node[p], dict):
                if node is data.get("method_options") or (parts[0] == "method_options"):
                    node = node.setdefault(p, {})
                    continue
                raise ConfigError(f"unknown config key {key!r}; top-level keys: {sorted(data)}")
            node = node[p]
        node[parts[-1]] = value
    return from_dict(RunConfig, data)


def parse_model_args(text: str) -> dict[str, Any]:
    """``revision=main,trust_remote_code=true`` (lm-eval's ``--model_args``) -> a mapping; values are YAML scalars
    (``true`` -> True, ``8`` -> 8), so no value may itself hold a comma."""
    out: dict[str, Any] = {}
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--model-args item {item!r} must look like key=value (e.g. revision=main)")
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: malformed YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the config must be a YAML mapping")
    return data


def validate(cfg: RunConfig) -> RunConfig:
    if cfg.probes is not None and [p.lower() for p in cfg.probes] == ["none"]:
        cfg = dataclasses.replace(cfg, probes=())  # `--probes none` / `probes: none`: explicitly no probes
    if cfg.dtype not in DTYPE_NAMES:
        raise ConfigError(f"dtype {cfg.dtype!r} is not valid; use one of {', '.join(DTYPE_NAMES)}")
    if cfg.chat_template not in CHAT_TEMPLATE_NAMES and not Path(cfg.chat_template).is_file():
        raise ConfigError(f"chat_template {cfg.chat_template!r} is not valid; use one of "
                          f"{', '.join(CHAT_TEMPLATE_NAMES)} or the path of a Jinja template file")
    if cfg.report_to not in REPORT_TO:
        raise ConfigError(f"report_to {cfg.report_to!r} is not valid; use one of {', '.join(REPORT_TO)}")
    if not (cfg.device == "cpu" or cfg.device.startswith("cuda")):
        raise ConfigError(f"device {cfg.device!r} is not valid; use cpu, cuda or cuda:N")
    for key, val in (("train.batch_size", cfg.train.batch_size), ("eval.batch_size", cfg.eval.batch_size),
                     ("train.grad_accum", cfg.train.grad_accum), ("train.lora_r", cfg.train.lora_r)):
        if val < 1:
            raise ConfigError(f"{key} must be >= 1, got {val}")
    for key, val in (("limit", cfg.limit), ("train.train_limit", cfg.train.train_limit),
                     ("eval.limit", cfg.eval.limit)):
        if val is not None and val < 1:
            raise ConfigError(f"{key} must be >= 1 or null, got {val}")
    if cfg.train.max_steps < 0 or cfg.train.lr <= 0:
        raise ConfigError("train.max_steps must be >= 0 and train.lr > 0")
    if cfg.train.scheduler not in ("cosine", "linear", "constant", "constant_with_warmup"):
        raise ConfigError(f"train.scheduler {cfg.train.scheduler!r} is not valid; use cosine, linear or constant")
    if cfg.rl.reference not in REFERENCES or cfg.rl.kl_coef < 0:
        raise ConfigError(f"rl.reference {cfg.rl.reference!r} / rl.kl_coef {cfg.rl.kl_coef}: use init or task_start "
                          f"and a kl_coef >= 0")
    if cfg.eval.backend not in ("hf", "vllm"):
        raise ConfigError(f"eval.backend {cfg.eval.backend!r} is not valid; use hf or vllm")
    if not cfg.methods:
        raise ConfigError("methods is empty; name at least one (see `memgen-bench methods`)")
    return cfg
