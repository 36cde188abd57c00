"""Evaluation cells computed once: the init row of every method that decodes the frozen model the same way.

Row 0 of ``vanilla``, ``sft``, ``grpo`` and ``reinforce_pp`` (a fresh LoRA adapter starts with B = 0, an exact
no-op, and full fine-tuning has not changed a weight yet) is the same greedy decoding of the same prompts by the
same model. The cell is cached under a key made of everything that determines it: the model (name, dtype, chat
template hash), the task (name, version), the exact prompts (their hash), the generation settings (token budget,
stop tokens, batch size, backend) and the evaluation seed, plus the method's generation identity (``identity``:
``base`` for the frozen model's function; None = not cacheable, e.g. MemGen's latents or a retrieval prompt).
MemGen's row 0 is ``base`` too while it inserts nothing (``insert_before_training`` false, greedy): its decoding
loop is then token for token ``model.generate`` on the same prompts (``tests/test_memgen_generation.py``), with
the same stop ids and batches, and it records no per-sample insertion fields.
A changed prompt, task version, model or adapter misses the cache (tested), and a hit is the recomputed cell byte
for byte (tested). A sweep points every cell at one cache folder, so row 0 is shared across orders and methods.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.store import atomic_write_json, atomic_write_jsonl, read_json

PLAIN_DECODING = ("vanilla", "sft", "grpo", "reinforce_pp")  # generate = generate_greedy(model, task.prompt(e))


def identity(method: Any) -> str | None:
    """What the method generates with, when that is the frozen base model: ``base``; None otherwise.

    Only for methods whose ``generate`` is plain greedy decoding of ``task.prompt`` (``PLAIN_DECODING``), and only
    while every LoRA B matrix is zero (the adapter adds exactly 0) -- i.e. before any training; and for MemGen
    while it inserts no latents and decodes greedily (its reasoner is the frozen base with the adapter off)."""
    if getattr(method, "name", None) == "memgen":
        return "base" if method.plain_decoding() else None
    if getattr(method, "name", None) not in PLAIN_DECODING:
        return None
    model = getattr(method, "model", None) or getattr(getattr(method, "lm", None), "model", None)
    if model is None:
        return None
    if getattr(method, "name", None) != "vanilla":
        for name, p in model.named_parameters():
            if "lora_B" in name and bool(p.detach().abs().max() > 0):
                return None  # a trained (or randomised) adapter changes the function
    return "base"


def cell_key(*, ident: str, model: str, dtype: str, template_sha: str | None, task: str, version: str,
             prompts: Sequence[str], max_new_tokens: int, stop_ids: Sequence[int], batch_size: int, backend: str,
             seed: int) -> str:
    """sha256 over everything that determines an evaluation cell."""
    prompt_sha = hashlib.sha256("\x1e".join(prompts).encode()).hexdigest()
    spec = {"identity": ident, "model": model, "dtype": dtype, "chat_template": template_sha, "task": task,
            "version": version, "prompts": prompt_sha, "n": len(prompts), "max_new_tokens": max_new_tokens,
            "stop": sorted(int(i) for i in stop_ids), "batch_size": batch_size, "backend": backend, "seed": seed}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]


def lookup(root: Path, key: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """The cached (cell result, samples), or None."""
    cell, samples = root / f"{key}.json", root / f"{key}.samples.jsonl"
    if not (cell.exists() and samples.exists()):
        return None
    rows = [json.loads(line) for line in samples.read_text(encoding="utf-8").splitlines() if line.strip()]
    return read_json(cell), rows


def store(root: Path, key: str, result: dict[str, Any], samples: list[dict[str, Any]]) -> None:
    """Write a computed cell (samples first, so a reader never finds a cell without its samples)."""
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(root / f"{key}.samples.jsonl", samples)
    atomic_write_json(root / f"{key}.json", result)
