"""The init row is computed once (harness/eval_cache.py): vanilla and an untrained sft share it, byte for byte
what a recomputation gives; a changed prompt, task version or adapter misses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from harness import eval_cache
from harness.config import RunConfig, from_dict
from harness.runner import run_method

BASE = {"model": "tiny-random", "sequence": "arith,choice", "limit": 4, "seed": 1,
        "train": {"max_steps": 1, "batch_size": 2}, "eval": {"batch_size": 2, "max_new_tokens": 8}}


def _cfg(out: Path, **over) -> RunConfig:
    data = json.loads(json.dumps(BASE))
    for k, v in over.items():
        if isinstance(v, dict):
            data[k] = {**data.get(k, {}), **v}
        else:
            data[k] = v
    return from_dict(RunConfig, {**data, "out": str(out)})


def _cell(run: Path, name: str) -> dict:
    d = json.loads((run / "cells" / f"{name}.json").read_text())
    for k in ("seconds", "cached", "cache_key"):
        d.pop(k, None)
    return d


@pytest.mark.slow
def test_vanilla_and_untrained_sft_share_row_0_byte_for_byte(tmp_path):
    out = tmp_path / "shared"
    cfg = _cfg(out)
    run_method("vanilla", cfg, out / "vanilla")
    run_method("sft", cfg, out / "sft")
    fresh = tmp_path / "fresh"
    run_method("sft", _cfg(fresh, eval={"cache": False}), fresh / "sft")
    for task in ("arith", "choice"):
        v = json.loads((out / "vanilla" / "cells" / f"r0_{task}.json").read_text())
        s = json.loads((out / "sft" / "cells" / f"r0_{task}.json").read_text())
        assert v["cached"] is False and s["cached"] is True and v["cache_key"] == s["cache_key"]
        recomputed = (fresh / "sft" / "samples" / f"r0_{task}.jsonl").read_bytes()
        assert (out / "sft" / "samples" / f"r0_{task}.jsonl").read_bytes() == recomputed
        assert _cell(out / "sft", f"r0_{task}") == _cell(fresh / "sft", f"r0_{task}")
        assert "cached" not in json.loads((out / "sft" / "cells" / f"r1_{task}.json").read_text())  # trained rows


@pytest.mark.slow
def test_memgen_row_0_without_latents_is_the_frozen_models_cell(tmp_path):
    out = tmp_path / "shared"
    cfg = _cfg(out, sequence="arith", train={"max_steps": 1, "batch_size": 2})
    run_method("vanilla", cfg, out / "vanilla")
    run_method("memgen", cfg, out / "memgen")
    fresh = tmp_path / "fresh"
    run_method("memgen", _cfg(fresh, sequence="arith", eval={"cache": False}), fresh / "memgen")
    m = json.loads((out / "memgen" / "cells" / "r0_arith.json").read_text())
    assert m["cached"] is True
    assert (out / "memgen" / "samples" / "r0_arith.jsonl").read_bytes() == \
        (fresh / "memgen" / "samples" / "r0_arith.jsonl").read_bytes() == \
        (out / "vanilla" / "samples" / "r0_arith.jsonl").read_bytes()
    assert _cell(out / "memgen", "r0_arith") == _cell(fresh / "memgen", "r0_arith")
    assert "cached" not in json.loads((out / "memgen" / "cells" / "r1_arith.json").read_text())  # latents


def test_key_misses_on_prompt_version_model_or_budget():
    base = dict(ident="base", model="m", dtype="fp32", template_sha="t", task="arith", version="2",
                prompts=["a", "b"], max_new_tokens=8, stop_ids=[2, 1], batch_size=2, backend="hf", seed=0)
    k = eval_cache.cell_key(**base)
    assert eval_cache.cell_key(**{**base, "stop_ids": [1, 2]}) == k  # order of stop ids does not matter
    for change in ({"prompts": ["a", "b!"]}, {"version": "3"}, {"model": "m2"}, {"dtype": "bf16"},
                   {"template_sha": "u"}, {"max_new_tokens": 9}, {"seed": 1}, {"backend": "vllm"}):
        assert eval_cache.cell_key(**{**base, **change}) != k, change


def test_identity_is_base_only_for_a_no_op_adapter(tiny):
    from harness.config import RunConfig
    from harness.methods import build_method

    cfg = RunConfig(model="tiny-random")
    sft = build_method("sft", tiny(0), cfg)
    assert eval_cache.identity(sft) == "base"  # fresh LoRA: B = 0
    with torch.no_grad():
        next(p for n, p in sft.model.named_parameters() if "lora_B" in n).add_(1e-3)
    assert eval_cache.identity(sft) is None  # a trained adapter misses the cache
    memgen = build_method("memgen", tiny(0), cfg)
    assert eval_cache.identity(memgen) == "base"  # row 0 without latents: the frozen reasoner's greedy decoding
    memgen.trained = True
    assert eval_cache.identity(memgen) is None  # latents: never the frozen model's plain decoding
    eager = build_method("memgen", tiny(0), RunConfig(model="tiny-random", method_options={
        "memgen": {"insert_before_training": True}}))
    assert eval_cache.identity(eager) is None
