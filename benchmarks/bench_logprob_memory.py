"""Peak memory of one RL log-prob step (forward + backward), full-vocabulary fp32 logits vs the chunked
``harness.logprobs.token_logprobs``, side by side: MemGen's weaver-GRPO recompute (``--method memgen``) or
REINFORCE++'s policy log-probs through a LoRA policy (``--method reinforce_pp``, ``baselines.reinforce_pp.token_logps``).

Each variant runs in its own fresh subprocess (peak RSS is per process and never goes down), on the same rollouts:
``--rows`` completions of ``--tokens`` random tokens with latents re-woven at 5 points, SmolLM2-135M (vocabulary
49,152; a 150k vocabulary makes the full tensor 3x larger). Printed: peak RSS above the RSS after loading, per
variant, and the ratio.

    python benchmarks/bench_logprob_memory.py                       # 8 x 512 tokens, SmolLM2-135M, fp32
    python benchmarks/bench_logprob_memory.py --method reinforce_pp  # the same for REINFORCE++
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child_reinforce_pp(args: argparse.Namespace) -> None:
    import torch

    from baselines.reinforce_pp import token_logps
    from harness.config import RunConfig
    from harness.models import load_model
    from harness.training import trainable_model

    lm = load_model(args.model, args.dtype)
    policy = trainable_model(lm.model, RunConfig(), "reinforce_pp", lora_dropout=0.0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 40000, (args.rows, 64 + args.tokens), generator=g)  # (B, P + C) prompt then completion
    mask = torch.ones_like(ids)
    base = _rss_mb()
    policy.eval()
    logp = token_logps(policy, ids, mask, args.tokens, chunked=args.variant == "chunked")  # (B, C)
    (-logp.mean()).backward()
    print(json.dumps({"variant": args.variant, "peak_mb": _rss_mb(), "base_mb": base, "tokens": int(logp.numel())}))


def child(args: argparse.Namespace) -> None:
    import torch

    import harness.memgen.sft as sft
    from harness.memgen.grpo import WeaverRollouts, rollout_logprobs
    from harness.memgen.options import MemGenOptions
    from harness.memgen.weaver import MemGenModel
    from harness.models import load_model

    if args.variant == "full":  # what the recompute did before: (N, V) fp32 log-softmax kept for backward
        def full(h, head, y, temperature=1.0):
            return torch.log_softmax(head(h).float() / temperature, dim=-1).gather(1, y[:, None]).squeeze(1)

        sft.token_logprobs = full
    lm = load_model(args.model, args.dtype)
    torch.manual_seed(0)
    mm = MemGenModel(lm, MemGenOptions(k_prompt=8, k_infer=8, max_insertions=5))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 40000, (64,), generator=g).tolist() for _ in range(args.rows)]
    comps = [torch.randint(0, 40000, (args.tokens,), generator=g).tolist() for _ in range(args.rows)]
    points = [[0, *range(args.tokens // 6, args.tokens, args.tokens // 6)][:6] for _ in range(args.rows)]
    ro = WeaverRollouts(prompts, comps, points, [""] * args.rows)
    base = _rss_mb()
    mm.eval()
    logp, mask = rollout_logprobs(mm, ro, temperature=1.0)
    (-(logp * mask).sum() / mask.sum()).backward()
    print(json.dumps({"variant": args.variant, "peak_mb": _rss_mb(), "base_mb": base,
                      "tokens": int(mask.sum())}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=["memgen", "reinforce_pp"], default="memgen")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--variant", choices=["full", "chunked"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        (child_reinforce_pp if args.method == "reinforce_pp" else child)(args)
        return
    out = {}
    for variant in ("full", "chunked"):
        cmd = [sys.executable, __file__, "--variant", variant, "--method", args.method, "--model", args.model,
               "--dtype", args.dtype, "--rows", str(args.rows), "--tokens", str(args.tokens)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:  # e.g. killed by the kernel for memory: say so, measure the other variant anyway
            print(f"{variant:8s}: failed with exit code {res.returncode} ({res.stderr.strip().splitlines()[-1:]})")
            continue
        out[variant] = json.loads(res.stdout.strip().splitlines()[-1])
        r = out[variant]
        print(f"{variant:8s}: peak RSS {r['peak_mb']:.0f} MB, {r['peak_mb'] - r['base_mb']:.0f} MB above the loaded "
              f"model ({r['tokens']} completion tokens)", flush=True)
    if len(out) < 2:
        return
    f, c = (out[v]["peak_mb"] - out[v]["base_mb"] for v in ("full", "chunked"))
    print(f"{args.method}: one log-prob step, {args.rows} x {args.tokens} tokens: chunked / full = {c / f:.3f} of the memory "
          f"above the loaded model")


if __name__ == "__main__":
    main()
