"""One ``quick`` evaluation row decoded by MemGen with one of its speed-ups on and off, interleaved in one run.

A row is what every method evaluates after a task (``bench_eval_batch.matrix_row_cells``: arith, reverse, choice
and the first_letter probe, ``--n`` test examples each, each task's token budget, EOS on), at the default
``eval.batch_size``. ``--ab`` picks what is switched off in the "off" runs (only the ratio means anything on this
noisy machine; ``--repeats`` alternates which goes first), and the tokens of both are compared:
- ``drop``: finished rows leave the batch (``memgen_generate(drop_finished=...)``); off, they ride along to the
  batch's longest row.
- ``packed``: the weaver reads each row's unread states packed (``weaver._packed``); off, it reads the span from
  the first unread column as it lies, dead slots (other rows' latent slots) included.
- ``head``: the prompts' common head is prefilled once (``weaver._common_prefix``); off, every prompt whole.

The weaver matters: an untrained one rambles to the token budget; pass a trained checkpoint
(``--weaver runs/default/memgen/checkpoints/stage1``, what ``memgen-bench run`` saves) for the real case.

    python benchmarks/bench_memgen_eval_row.py --weaver /path/to/memgen/checkpoints/stage1 --ab packed
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_eval_batch import matrix_row_cells  # noqa: E402

import harness.memgen.weaver as weaver  # noqa: E402
from harness.generation import length_sorted_batches  # noqa: E402
from harness.memgen.generation import completion_length, delimiter_mask, memgen_generate  # noqa: E402
from harness.memgen.method import ADAPTER_DIR, HEADS_FILE  # noqa: E402
from harness.memgen.options import MemGenOptions  # noqa: E402
from harness.memgen.sft import left_pad  # noqa: E402
from harness.memgen.weaver import MemGenModel  # noqa: E402
from harness.models import load_model  # noqa: E402


def decode_row(mm: MemGenModel, cells, batch: int, drop: bool) -> tuple[float, list[list[int]], int, int]:
    """Seconds for one matrix row, every completion, and the tokens generated / decoding steps x rows paid."""
    isd = delimiter_mask(mm.tokenizer, mm.opts.delimiters, mm.lm_head.weight.shape[0])
    stops = mm.stop_ids()
    seqs, useful, paid, t0 = [], 0, 0, time.perf_counter()
    for ids, budget in cells:
        for idx in length_sorted_batches([len(i) for i in ids], batch):
            inp, mask = left_pad([ids[i] for i in idx], mm.tokenizer.pad_token_id)
            out = memgen_generate(mm, inp, mask, budget, delimiters=isd, eos_token_ids=stops, drop_finished=drop)
            rows = out.sequences.tolist()
            seqs += rows
            useful += sum(completion_length(r, stops) for r in rows)
            paid += out.sequences.shape[1] * len(rows)
    return time.perf_counter() - t0, seqs, useful, paid


def run(mm: MemGenModel, cells, batch: int, ab: str, on: bool) -> tuple[float, list[list[int]], int, int]:
    saved = weaver._packed, weaver._common_prefix
    if not on and ab == "packed":
        weaver._packed = weaver._as_they_lie
    if not on and ab == "head":
        weaver._common_prefix = lambda ids, mask: 0
    try:
        return decode_row(mm, cells, batch, drop=on or ab != "drop")
    finally:
        weaver._packed, weaver._common_prefix = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--weaver", type=Path, default=None, help="a memgen checkpoint folder (default: untrained)")
    ap.add_argument("--n", type=int, default=32, help="test examples per cell (the default eval.limit)")
    ap.add_argument("--batch", type=int, default=32, help="the default eval.batch_size")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--ab", choices=("drop", "packed", "head"), default="drop", help="the speed-up switched off")
    args = ap.parse_args()
    lm = load_model(args.model, "fp32")
    torch.manual_seed(0)
    mm = MemGenModel(lm, MemGenOptions(k_prompt=args.k, k_infer=args.k))
    if args.weaver is not None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(mm.peft, load_file(str(args.weaver / ADAPTER_DIR / "adapter_model.safetensors")))
        mm.heads.load_state_dict(load_file(str(args.weaver / HEADS_FILE)))
        mm.eval()
    cells = matrix_row_cells(lm.tokenizer, args.n)
    print(f"model={args.model} weaver={args.weaver or 'untrained'} n={args.n} per cell, batch={args.batch}, "
          f"K={args.k}, threads={torch.get_num_threads()}, off: {args.ab}")
    secs: dict[bool, list[float]] = {True: [], False: []}
    got: dict[bool, list[list[int]]] = {}
    for r in range(args.repeats):
        for on in (r % 2 == 0, r % 2 == 1):  # alternate which goes first
            s, got[on], useful, paid = run(mm, cells, args.batch, args.ab, on)
            secs[on].append(s)
    same = got[True] == got[False]
    on, off = min(secs[True]), min(secs[False])
    print(f"generated tokens {useful}, row-steps a batch runs to its longest row {paid} "
          f"(useful {useful / paid:.0%})")
    print(f"{args.ab} off: {off:.1f}s   on: {on:.1f}s   on / off = {on / off:.2f}   same tokens: {same}")


if __name__ == "__main__":
    main()
