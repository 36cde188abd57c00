"""A weaver GRPO step with and without the shared prompt of a group (``WovenState.feed_prompt``), interleaved in
one process (this machine is noisy; only the ratio means anything).

One step = ``group`` sampled MemGen rollouts of one prompt (latents at every delimiter up to the cap), the log-prob
recompute with the latents re-woven, and its backward: what ``weaver_grpo_step`` does besides scoring. ``off`` feeds
every row of the group on its own (the behaviour before rows with the same prompt shared its prefill and prompt
latents); both see the same rollouts (same seed per prompt).

    python benchmarks/bench_shared_prompt.py                  # SmolLM2-135M fp32, arith, group 8, 3 prompts
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import harness.memgen.weaver as weaver  # noqa: E402
from harness.memgen.generation import delimiter_mask  # noqa: E402
from harness.memgen.grpo import rollout_logprobs, sample_rollouts  # noqa: E402
from harness.memgen.options import MemGenOptions  # noqa: E402
from harness.models import load_model  # noqa: E402
from tasks.registry import get_task  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="arith")
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=3)
    args = ap.parse_args()
    lm = load_model(args.model, "fp32")
    tok = lm.tokenizer
    torch.manual_seed(0)
    mm = weaver.MemGenModel(lm, MemGenOptions())
    is_delim = delimiter_mask(tok, mm.opts.delimiters, mm.lm_head.weight.shape[0])
    task = get_task(args.task)
    budget = task.max_new_tokens
    shared = weaver._distinct_rows

    def every_row(rows: torch.Tensor):
        return None, torch.arange(len(rows))

    total = {"on": 0.0, "off": 0.0}
    examples = task.load("train", limit=args.prompts + 1)
    warm = sample_rollouts(mm, [tok(task.prompt(examples[-1], tok), add_special_tokens=False).input_ids], args.group,
                           budget, is_delim, 1.0, torch.Generator().manual_seed(99))
    rollout_logprobs(mm, warm, 1.0)[0].sum().backward()  # warm-up: the first recompute pays one-off page faults
    mm.zero_grad(set_to_none=True)
    for i, e in enumerate(examples[: args.prompts]):
        ids = [tok(task.prompt(e, tok), add_special_tokens=False).input_ids]
        for mode in ("on", "off") if i % 2 == 0 else ("off", "on"):  # alternate which goes first
            weaver._distinct_rows = shared if mode == "on" else every_row
            t0 = time.perf_counter()
            ro = sample_rollouts(mm, ids, args.group, budget, is_delim, 1.0, torch.Generator().manual_seed(i))
            t1 = time.perf_counter()
            logp, mask = rollout_logprobs(mm, ro, 1.0)
            ((logp * mask).sum() / mask.sum()).backward()
            t2 = time.perf_counter()
            mm.zero_grad(set_to_none=True)
            total[mode] += t2 - t0
            print(f"prompt {i} shared prompt {mode:>3}: rollout {t1 - t0:5.1f}s, recompute + backward {t2 - t1:5.1f}s, "
                  f"mean length {sum(map(len, ro.completions)) / args.group:.1f}", flush=True)
    weaver._distinct_rows = shared
    print(f"step time shared / every row fed = {total['on'] / total['off']:.2f}")


if __name__ == "__main__":
    main()
