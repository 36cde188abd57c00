"""MemGen generation cost vs plain ``generate`` and vs the naive re-compute implementation, side by side.

Both sides generate the same number of positions: EOS is suppressed (``min_new_tokens`` for ``generate``, no
stop ids for MemGen), and MemGen inserts K latents after the prompt and at forced steps (every ``--every``
tokens, up to ``--cap``), so an untrained weaver's odd output does not change what is measured. Variants are run
alternately ``--repeats`` times and the median is reported; the machine is shared, so only ratios measured in
the same run mean anything.

    python benchmarks/bench_memgen_generation.py                    # SmolLM2-135M, batch 8 and 1, 256 tokens
    python benchmarks/bench_memgen_generation.py --model tiny-random --tokens 64 --naive-tokens 32

``--staggered`` measures what insertion itself costs in the realistic case: row b of a batch inserts at steps
t with (t + offset_b) % every == 0, offsets spread over the rows, as happens when each row meets its own
delimiters (at batch 32 nearly every step then has some row inserting). It prints, per dtype and batch size,
MemGen with insertion / the same loop with insertion off (and that loop / ``model.generate``), and beside it the
ratio of token positions the forwards process with and without insertion (the weaver reads every state up to a
row's last insertion, plus K queries, and the reasoner K latents per insertion): the work insertion adds by
definition, and the ratio of forward calls (an insertion event is two more: the weaver's, then the reasoner's over
the K latent slots). Where forwards are compute-bound (this CPU at batch >= 8: a batch-32 decoding step costs about
what a 32-token chunk does) the time ratio cannot go far below the token ratio; where a forward costs mostly per
call (batch 1; in bf16 on the AMX machine one token 35 ms, 8 rows x 8 tokens 66 ms) it follows the call ratio:

    python benchmarks/bench_memgen_generation.py --staggered --tokens 128 --batches 1,8,32 --dtypes fp32,bf16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from harness.memgen.generation import memgen_generate  # noqa: E402
from harness.memgen.options import MemGenOptions  # noqa: E402
from harness.memgen.weaver import MemGenModel  # noqa: E402
from harness.models import load_model  # noqa: E402
from tasks.registry import get_task  # noqa: E402


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--batches", default="8,1")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--every", type=int, default=40)
    ap.add_argument("--cap", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--naive-tokens", type=int, default=256, help="0 skips the naive comparison")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--dtype", default="bf16", help="model dtype (bf16 = the runner's default; fp32 for exactness)")
    ap.add_argument("--staggered", action="store_true", help="rows insert at different steps; ratio to insert-off")
    ap.add_argument("--dtypes", default="fp32,bf16", help="with --staggered: the dtypes to measure")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.staggered:
        staggered(args)
        return

    lm = load_model(args.model, args.dtype)
    tok = lm.tokenizer
    mm = MemGenModel(lm, MemGenOptions(k_prompt=args.k, k_infer=args.k, max_insertions=args.cap))
    task = get_task("arith")
    examples = task.load("test", limit=max(int(b) for b in args.batches.split(",")))
    every_token = torch.ones(mm.lm_head.weight.shape[0], dtype=torch.bool)

    def trigger(ctx):
        return torch.full_like(ctx.candidates, ctx.step % args.every == 0)

    print(f"model={args.model} tokens={args.tokens} K={args.k} insertions=prompt+{args.cap} every {args.every} "
          f"threads={torch.get_num_threads()} dtype={args.dtype}")
    for bs in (int(b) for b in args.batches.split(",")):
        enc = tok([task.prompt(e, tok) for e in examples[:bs]], return_tensors="pt", padding=True,
                  add_special_tokens=False)

        def plain(enc=enc):
            with torch.no_grad():
                out = lm.model.generate(**enc, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                                        do_sample=False, pad_token_id=tok.pad_token_id)
            assert out.shape[1] - enc.input_ids.shape[1] == args.tokens

        def woven(enc=enc):
            out = memgen_generate(mm, enc.input_ids, enc.attention_mask, args.tokens, trigger=trigger,
                                  delimiters=every_token, eos_token_ids=[])
            assert out.sequences.shape[1] == args.tokens
            assert all(len(p) == 1 + min(args.cap, (args.tokens - 1) // args.every) for p in out.insertions)

        plain()  # warm-up (allocations, lazy inits)
        times: dict[str, list[float]] = {"plain": [], "memgen": []}
        for _ in range(args.repeats):
            times["plain"].append(timed(plain))
            times["memgen"].append(timed(woven))
        med = {k: statistics.median(v) for k, v in times.items()}
        per = {k: 1000 * v / (args.tokens * bs) for k, v in med.items()}
        print(f"batch {bs}: plain {per['plain']:.2f} ms/position, memgen {per['memgen']:.2f} ms/position, "
              f"ratio memgen/plain = {med['memgen'] / med['plain']:.3f}  (runs: "
              + ", ".join(f"{k} {[round(x, 2) for x in v]}" for k, v in times.items()) + ")")

    if args.naive_tokens:
        from memgen_reference import naive_generate

        n = args.naive_tokens
        enc = tok([task.prompt(examples[0], tok)], return_tensors="pt", add_special_tokens=False)
        prompt = enc.input_ids[0].tolist()

        def cached():
            memgen_generate(mm, enc.input_ids, enc.attention_mask, n, trigger=trigger, delimiters=every_token,
                            eos_token_ids=[])

        def naive():
            tokens, _ = naive_generate(mm, prompt, n, lambda s: s % args.every == 0, every_token, args.cap, eos=[])
            assert len(tokens) == n

        t_cached = statistics.median(timed(cached) for _ in range(args.repeats))
        t_naive = timed(naive)
        print(f"batch 1, {n} tokens: cached {t_cached:.2f}s, naive re-compute {t_naive:.2f}s, "
              f"speed-up naive/cached = {t_naive / t_cached:.2f}x")


def _staggered_times(lm, mm: MemGenModel, enc, offset: torch.Tensor, args: argparse.Namespace) -> dict[str, float]:
    """Median seconds of insert-on, insert-off (same loop) and ``model.generate``, timed interleaved."""
    every_token = torch.ones(mm.lm_head.weight.shape[0], dtype=torch.bool)

    def trigger(ctx):
        return ((ctx.step + offset) % args.every == 0) & ctx.candidates

    def run(insert: bool):
        out = memgen_generate(mm, enc.input_ids, enc.attention_mask, args.tokens, insert=insert, trigger=trigger,
                              delimiters=every_token, eos_token_ids=[])
        assert out.sequences.shape[1] == args.tokens
        return out

    def plain() -> None:
        with torch.no_grad():
            lm.model.generate(**enc, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                              pad_token_id=lm.tokenizer.pad_token_id)

    # warm-up runs, counting the forward calls of the transformer stacks (the reasoner and the weaver: one stack
    # when they share the base); per row the steps it inserted at (0 = after the prompt)
    calls = [0]
    hooks = [m.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
             for m in {id(mm.reasoner): mm.reasoner, id(mm.weaver): mm.weaver}.values()]
    points = run(True).insertions
    on_calls, calls[0] = calls[0], 0
    run(False)
    off_calls = calls[0]
    for h in hooks:
        h.remove()
    times: dict[str, list[float]] = {"on": [], "off": [], "generate": []}
    for _ in range(args.repeats):  # interleaved, so machine noise hits every variant alike
        times["on"].append(timed(lambda: run(True)))
        times["off"].append(timed(lambda: run(False)))
        times["generate"].append(timed(plain))
    med = {k: statistics.median(v) for k, v in times.items()}
    med["token_ratio"] = token_ratio(enc.attention_mask, points, args.tokens, args.k)
    med["call_ratio"] = on_calls / off_calls
    return med


def token_ratio(mask: torch.Tensor, points: list[list[int]], tokens: int, k: int) -> float:
    """Token positions the forwards process with insertion / without, for prompts ``mask`` (B, P) and insertion
    steps ``points`` per row. Without: the reasoner reads the prompts and ``tokens`` per row. With, per row: the
    reasoner also reads K latents per insertion; the weaver reads the prompt, the tokens and latents before the row's
    last insertion, and K queries per insertion. (Sharing the prompts' common head is ignored on both sides.)"""
    prompt = mask.sum(1).tolist()  # (B,)
    off = sum(prompt) + len(prompt) * tokens
    on = off
    for p, pts in zip(prompt, points, strict=True):
        n = len(pts)
        on += n * k  # reasoner: latents
        on += p + (pts[-1] if pts else 0) + max(n - 1, 0) * k + n * k  # weaver: read states, queries
    return on / off


def staggered(args: argparse.Namespace) -> None:
    """Insertion cost with rows inserting at different steps: insert on / insert off of the same loop."""
    task = get_task("arith")
    batches = [int(b) for b in args.batches.split(",")]
    examples = task.load("test", limit=max(batches))
    print(f"staggered: model={args.model} tokens={args.tokens} K={args.k} cap={args.cap} every={args.every} "
          f"threads={torch.get_num_threads()}")
    for dtype in args.dtypes.split(","):
        lm = load_model(args.model, dtype)
        torch.manual_seed(0)
        mm = MemGenModel(lm, MemGenOptions(k_prompt=args.k, k_infer=args.k, max_insertions=args.cap))
        for bs in batches:
            enc = lm.tokenizer([task.prompt(e, lm.tokenizer) for e in examples[:bs]], return_tensors="pt",
                               padding=True, add_special_tokens=False)
            offset = torch.tensor([b * args.every // bs for b in range(bs)])  # (B,) spread over the period
            med = _staggered_times(lm, mm, enc, offset, args)
            print(f"{dtype} batch {bs}: insert-on / insert-off = {med['on'] / med['off']:.3f} "
                  f"(token ratio {med['token_ratio']:.2f}, forward-call ratio {med['call_ratio']:.2f}), "
                  f"insert-off / generate = {med['off'] / med['generate']:.3f}  "
                  f"(medians on {med['on']:.2f}s off {med['off']:.2f}s generate {med['generate']:.2f}s)", flush=True)


if __name__ == "__main__":
    main()
