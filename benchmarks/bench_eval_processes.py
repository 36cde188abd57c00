"""Evaluation tokens/s with 1 process vs N data-parallel processes (``accelerate launch``), side by side.

The parent alternates, ``--repeats`` times, between a 1-process run and an N-process ``accelerate launch`` of this
same file in worker mode; each worker loads the model, takes its round-robin shard of the prompts through
``harness.distributed.map_sharded`` (exactly what the runner's evaluation does), generates greedily, and the main
process reports the generated tokens and the wall time of the gathered evaluation. The parent prints tokens/s of
each and the ratio N-proc / 1-proc. On CPU, torch threads are split so both sides use the same cores
(1 process x C threads vs N processes x C/N threads).

    python benchmarks/bench_eval_processes.py --model smollm2-135m --task gsm8k --n 64 --procs 2
    python benchmarks/bench_eval_processes.py --device cuda --procs 2   # on a multi-GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(args: argparse.Namespace) -> None:
    import torch

    from harness.distributed import barrier, is_main, map_sharded, world
    from harness.generation import generate_greedy
    from harness.models import load_model
    from tasks.registry import get_task

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    lm = load_model(args.model, "fp32" if device == "cpu" else "bf16", device, seed=0)
    task = get_task(args.task)
    prompts = [task.prompt(e, lm.tokenizer) for e in task.load("test", limit=args.n, seed=0)]
    # Warm-up on a few prompts (first-call allocations) outside the timed region.
    generate_greedy(lm.model, lm.tokenizer, prompts[:2], 4, batch_size=2)
    barrier()
    t0 = time.perf_counter()
    outs = map_sharded(lambda shard: generate_greedy(lm.model, lm.tokenizer, shard, args.max_new_tokens,
                                                     batch_size=args.batch_size), prompts)
    seconds = time.perf_counter() - t0
    if is_main():
        tokens = sum(len(lm.tokenizer(o, add_special_tokens=False).input_ids) + 1 for o in outs)
        Path(args.result).write_text(json.dumps({"tokens": tokens, "seconds": seconds, "n": len(outs),
                                                  "procs": world()[1]}))


def run_side(args: argparse.Namespace, procs: int, cores: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "r.json"
        threads = max(1, cores // procs)
        common = [__file__, "--worker", "--result", str(result), "--model", args.model, "--task", args.task,
                  "--n", str(args.n), "--batch-size", str(args.batch_size), "--max-new-tokens",
                  str(args.max_new_tokens), "--device", args.device, "--threads", str(threads)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        if procs == 1:
            cmd = [sys.executable, *common]
        else:
            # --multi_gpu starts procs processes through torchrun; on CPU ACCELERATE_USE_CPU makes them gloo
            # processes (accelerate's --cpu launcher would start only one: see harness/cli/launch.py _relaunch).
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(procs),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", "0", *common]
            if args.device == "cpu":
                env["ACCELERATE_USE_CPU"] = "true"
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        out = json.loads(result.read_text())
        if out["procs"] != procs:
            raise RuntimeError(f"asked for {procs} processes but the evaluation ran in {out['procs']}")
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="gsm8k")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="CPU cores shared by both sides")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", default="", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    rates: dict[int, list[float]] = {1: [], args.procs: []}
    for rep in range(args.repeats):
        for procs in (1, args.procs):
            r = run_side(args, procs, args.cores)
            rates[procs].append(r["tokens"] / r["seconds"])
            print(f"repeat {rep} procs={procs}: {r['tokens']} tokens over {r['n']} prompts in {r['seconds']:.1f} s "
                  f"= {rates[procs][-1]:.1f} tok/s", flush=True)
    best1, bestn = max(rates[1]), max(rates[args.procs])
    print(f"model={args.model} task={args.task} n={args.n} batch={args.batch_size} device={args.device}")
    print(f"1 process: {best1:.1f} tok/s | {args.procs} processes: {bestn:.1f} tok/s | ratio {bestn / best1:.2f}x")


if __name__ == "__main__":
    main()
