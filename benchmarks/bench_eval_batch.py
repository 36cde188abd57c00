"""Evaluation batch size on the ``quick`` cells: seconds per matrix row at each batch size, with and without
latents, measured side by side in one run (this machine is noisy: only the ratios mean anything).

A row is the four cells every method evaluates after a task (arith, reverse, choice and the first_letter probe),
``--n`` test examples each, length-sorted left-padded batches, each task's own token budget, EOS on: the real
evaluation, where rows stop and meet delimiters at different steps. ``plain`` is the frozen model's greedy decoding
through MemGen's loop with insertion off (token for token ``model.generate``); ``latents`` inserts after the prompt
and at every delimiter up to the cap with an untrained weaver (which rambles, so it hits the cap: the costly case).

    python benchmarks/bench_eval_batch.py                      # SmolLM2-135M fp32, batches 8,16,32, K 8
    python benchmarks/bench_eval_batch.py --batches 16,32 --ks 4,8
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.generation import length_sorted_batches  # noqa: E402
from harness.memgen.generation import delimiter_mask, memgen_generate  # noqa: E402
from harness.memgen.options import MemGenOptions  # noqa: E402
from harness.memgen.sft import left_pad  # noqa: E402
from harness.memgen.weaver import MemGenModel  # noqa: E402
from harness.models import load_model  # noqa: E402
from tasks.registry import get_task  # noqa: E402

TASKS = ("arith", "reverse", "choice", "first_letter")


def matrix_row_cells(tok, n: int) -> list[tuple[list[list[int]], int]]:
    """The prompts' ids and the token budget of each cell of a ``quick`` matrix row, ``n`` test examples each."""
    cells = []
    for name in TASKS:
        task = get_task(name)
        ids = [tok(task.prompt(e, tok), add_special_tokens=False).input_ids for e in task.load("test", limit=n)]
        cells.append((ids, task.max_new_tokens))
    return cells


def row_seconds(mm: MemGenModel, cells, batch: int, insert: bool) -> tuple[float, int]:
    """Seconds to decode one matrix row, and the latent blocks inserted."""
    tok, isd = mm.tokenizer, delimiter_mask(mm.tokenizer, mm.opts.delimiters, mm.lm_head.weight.shape[0])
    blocks, t0 = 0, time.perf_counter()
    for ids, budget in cells:
        for idx in length_sorted_batches([len(i) for i in ids], batch):
            inp, mask = left_pad([ids[i] for i in idx], tok.pad_token_id)
            out = memgen_generate(mm, inp, mask, budget, insert=insert, delimiters=isd, eos_token_ids=mm.stop_ids())
            blocks += sum(len(p) for p in out.insertions)
    return time.perf_counter() - t0, blocks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--n", type=int, default=32, help="test examples per cell (the default eval.limit)")
    ap.add_argument("--batches", default="8,16,32")
    ap.add_argument("--ks", default="8", help="latents per block (k_prompt = k_infer)")
    args = ap.parse_args()
    lm = load_model(args.model, args.dtype)
    cells = matrix_row_cells(lm.tokenizer, args.n)
    batches = [int(b) for b in args.batches.split(",")]
    print(f"model={args.model} dtype={args.dtype} n={args.n} per cell, threads={torch.get_num_threads()}")
    for k in (int(x) for x in args.ks.split(",")):
        torch.manual_seed(0)
        mm = MemGenModel(lm, MemGenOptions(k_prompt=k, k_infer=k))
        for insert in (False, True) if k == int(args.ks.split(",")[0]) else (True,):
            label = f"latents K={k}" if insert else "plain"
            secs = {}
            for bs in batches:
                secs[bs], blocks = row_seconds(mm, cells, bs, insert)
            ref = secs[batches[-1]]
            print(f"{label:>14}: " + ", ".join(f"batch {bs} {s:.1f}s ({s / ref:.2f}x)" for bs, s in secs.items())
                  + (f"  [{blocks} latent blocks per row]" if insert else ""), flush=True)


if __name__ == "__main__":
    main()
