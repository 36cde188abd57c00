"""Generation throughput of the two backends: hf (``generate_greedy``) vs vllm (``harness.vllm_backend``).

Same prompts (the ``quick`` tasks, mixed), same greedy rule and token budget, same batch sizes: hf decodes batches
of B prompts, vLLM gets them B at a time (one ``generate`` call each). Tokens are counted alike for both (the
completion re-tokenised), so the figure is decoded tokens per wall-clock second; the runs alternate in one
process. Needs .venv-vllm (``bash scripts/setup.sh --vllm``):

    OMP_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=2 .venv-vllm/bin/python benchmarks/bench_backends.py \
        --n 64 --batch-sizes 8,64 --max-new-tokens 64 --out results/benchmarks/backends_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from harness.config import RunConfig, apply_overrides
from harness.generation import generate_greedy, set_greedy_backend
from harness.models import load_model
from harness.vllm_backend import use_backend
from tasks.registry import get_task


def quick_prompts(tok, n: int) -> list[str]:
    tasks = [get_task(t) for t in ("arith", "reverse", "choice")]
    per = [n // 3 + (i < n % 3) for i in range(3)]
    return [t.prompt(e, tok) for t, k in zip(tasks, per, strict=True) for e in t.load("test", limit=k, seed=0)]


def timed(fn, prompts: list[str], tok, batch: int, max_new: int) -> tuple[float, int, list[str]]:
    t0 = time.perf_counter()
    outs: list[str] = []
    for i in range(0, len(prompts), batch):
        outs += fn(prompts[i : i + batch], batch, max_new)
    seconds = time.perf_counter() - t0
    return seconds, sum(len(tok(c, add_special_tokens=False).input_ids) for c in outs), outs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch-sizes", default="8,64")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    lm = load_model(a.model)
    cfg = apply_overrides(RunConfig(), [f"model={a.model}", "eval.backend=vllm"])
    prompts = quick_prompts(lm.tokenizer, a.n)
    t0 = time.perf_counter()
    use_backend("vanilla", lm, cfg)  # builds the engine and routes generate_greedy through it
    build = time.perf_counter() - t0
    from harness.vllm_backend import _greedy  # the hook itself, so hf and vllm can alternate

    def hf(batch_prompts, bs, max_new):
        set_greedy_backend(None)
        return generate_greedy(lm.model, lm.tokenizer, batch_prompts, max_new, bs)

    def vllm(batch_prompts, bs, max_new):
        return _greedy(lm.model, lm.tokenizer, batch_prompts, max_new)

    vllm(prompts[:2], 2, 4)  # warm-up outside the timings
    rows = []
    for bs in [int(b) for b in a.batch_sizes.split(",")]:
        s_hf, n_hf, o_hf = timed(hf, prompts, lm.tokenizer, bs, a.max_new_tokens)
        s_vl, n_vl, o_vl = timed(vllm, prompts, lm.tokenizer, bs, a.max_new_tokens)
        row = {"batch": bs, "hf_tok_s": n_hf / s_hf, "vllm_tok_s": n_vl / s_vl, "ratio_vllm_over_hf":
               (n_vl / s_vl) / (n_hf / s_hf), "hf_seconds": s_hf, "vllm_seconds": s_vl, "hf_tokens": n_hf,
               "vllm_tokens": n_vl, "identical": sum(x == y for x, y in zip(o_hf, o_vl, strict=True))}
        rows.append(row)
        print(f"batch {bs:3d}: hf {row['hf_tok_s']:7.1f} tok/s  vllm {row['vllm_tok_s']:7.1f} tok/s  "
              f"ratio {row['ratio_vllm_over_hf']:.2f}x  identical {row['identical']}/{len(prompts)}", flush=True)
    result = {"model": a.model, "n_prompts": len(prompts), "max_new_tokens": a.max_new_tokens,
              "engine_build_seconds": build, "omp_threads": os.environ.get("OMP_NUM_THREADS"),
              "kv_cache_gib": os.environ.get("VLLM_CPU_KVCACHE_SPACE"), "rows": rows}
    print(json.dumps(result, indent=2))
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
