"""Evaluation throughput: harness.generation.generate_greedy vs a bare ``model.generate`` loop.

Both sides generate for the same prompts with the same batch size and token budget, alternating in one process
(this machine is noisy), and the script prints tokens/s of each and the ratio (target: >= 0.9).

    python benchmarks/bench_eval_generation.py --model smollm2-135m --task gsm8k --n 32 --batch-size 8
"""

from __future__ import annotations

import argparse
import time

import torch

from harness.generation import generate_greedy, stop_token_ids
from harness.models import load_model
from tasks.registry import get_task


def bare_loop(model, tok, prompts, max_new, bs):
    """The reference: prompts in the given order, left-padded batches, greedy generate; counts new tokens."""
    tok.padding_side = "left"
    n_tokens = 0
    eos = stop_token_ids(tok)
    for i in range(0, len(prompts), bs):
        enc = tok(prompts[i : i + bs], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new, do_sample=False, eos_token_id=eos,
                                 pad_token_id=tok.pad_token_id)
        new = gen[:, enc.input_ids.shape[1] :]
        n_tokens += int((~torch.isin(new, torch.tensor(eos))).sum())
    return n_tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="gsm8k")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    lm = load_model(args.model)
    task = get_task(args.task)
    prompts = [task.prompt(e, lm.tokenizer) for e in task.load("test", limit=args.n, seed=0)]
    # Same prompts, same greedy decoding: both sides produce the same completions, so the throughput ratio is
    # the inverse ratio of wall times; tokens are counted on the reference side. The sides alternate and each
    # keeps its best (shortest) repeat, so a burst of load on this shared machine hits neither side's figure.
    t_ours: list[float] = []
    t_bare: list[float] = []
    tokens = 0
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        tokens = bare_loop(lm.model, lm.tokenizer, prompts, args.max_new_tokens, args.batch_size)
        t_bare.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        generate_greedy(lm.model, lm.tokenizer, prompts, args.max_new_tokens, args.batch_size)
        t_ours.append(time.perf_counter() - t0)
    print(f"bare generate loop : {tokens / min(t_bare):8.1f} tok/s (best of {[round(t, 1) for t in t_bare]} s)")
    print(f"generate_greedy    : {tokens / min(t_ours):8.1f} tok/s (best of {[round(t, 1) for t in t_ours]} s)")
    print(f"ratio ours/bare    : {min(t_bare) / min(t_ours):.2f}  (target >= 0.9)")


if __name__ == "__main__":
    main()
