"""Sandbox throughput on the HumanEval canonical solutions (all must pass), measured side by side in one run.

Configurations, interleaved round by round so the shared machine's noise hits them alike:
- ``sandbox x2``: the full sandbox (namespaces, minimal read-only root, tmpfs, uid switch, rlimits) with 2 workers
  (the figure for the note);
- ``sandbox x1``: the same with 1 worker (parallel speed-up);
- ``bare x2``: the same test programs as plain ``python -c`` subprocesses with 2 workers, no containment at all
  (the cost of the containment).

Usage: ``python benchmarks/bench_sandbox.py [--rounds 2] [--limit N] [--data-dir ../shared/data] [--timeout-s 10]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from harness.sandbox import Sandbox, SandboxLimits, detect_isolation
from tasks.registry import get_task


def bare_run(solution: str, tests: str, entry: str) -> bool:
    code = f"{solution}\n{tests}\ncheck({entry})\n"
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run([sys.executable, "-I", "-B", "-c", code], cwd=d, capture_output=True, timeout=30,
                           stdin=subprocess.DEVNULL)
    return r.returncode == 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--limit", type=int, default=None, help="HumanEval problems (default all 164)")
    ap.add_argument("--data-dir", default=os.environ.get("MEMGEN_BENCH_DATA", "../shared/data"))
    ap.add_argument("--timeout-s", type=float, default=10.0,
                    help="wall-clock limit per program; raise it on a busy machine, where a canonical solution can "
                         "otherwise time out and abort the run")
    args = ap.parse_args()

    task = get_task("humaneval", args.data_dir)
    examples = task.load("test", limit=args.limit)
    programs = [task.program(e.target, e) for e in examples]
    n = len(programs)
    print(f"isolation: {detect_isolation().mode} ({detect_isolation().reason}); {n} programs; "
          f"{os.cpu_count()} CPUs; {args.rounds} rounds")
    limits = SandboxLimits(timeout_s=args.timeout_s, cpu_s=10)
    sb2, sb1 = Sandbox(limits, workers=2), Sandbox(limits, workers=1)
    pool = ThreadPoolExecutor(max_workers=2)
    times: dict[str, list[float]] = {"sandbox x2": [], "sandbox x1": [], "bare x2": []}
    try:
        for _ in range(args.rounds):
            for name in times:
                t0 = time.perf_counter()
                if name == "bare x2":
                    ok = list(pool.map(lambda p: bare_run(p.solution, p.tests, p.entry_point), programs))
                    passed = sum(ok)
                else:
                    outs = (sb2 if name == "sandbox x2" else sb1).run_many(programs)
                    passed = sum(o.status == "passed" for o in outs)
                dt = time.perf_counter() - t0
                if passed != n:
                    raise SystemExit(f"{name}: only {passed}/{n} canonical solutions passed")
                times[name].append(dt)
    finally:
        sb2.close()
        sb1.close()
        pool.shutdown()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{'config':<12} {'median s':>9} {'programs/s':>11} {'ms/program':>11}")
    for k, v in med.items():
        print(f"{k:<12} {v:>9.2f} {n / v:>11.2f} {1000 * v / n:>11.1f}")
    print(f"ratio sandbox x2 / sandbox x1 throughput: {med['sandbox x1'] / med['sandbox x2']:.2f}")
    print(f"ratio sandbox x2 / bare x2 time (cost of containment): {med['sandbox x2'] / med['bare x2']:.2f}")


if __name__ == "__main__":
    main()
