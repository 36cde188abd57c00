"""Retrieval latency per query of the memory backends, side by side in one run (this machine is noisy).

Stores of N records (questions of the ``quick`` tasks) are searched by held-out test questions, one batched call
and one call per query, with dense exact (numpy), dense FAISS (IndexFlatIP) and BM25 (bm25s). Dense search time
is mostly the query embedding (all-MiniLM-L6-v2 forward), which the ratio to BM25 shows.

    python benchmarks/bench_retrieval.py --sizes 100 1000 --queries 64
"""

from __future__ import annotations

import argparse
import json
import time

from harness.retrieval_index import MemoryStore, RetrievalOptions, load_embedder
from tasks.registry import get_task

BACKENDS = {"dense-exact": {"backend": "dense", "dense_search": "exact"},
            "dense-faiss": {"backend": "dense", "dense_search": "faiss"},
            "bm25": {"backend": "bm25"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="best of this many timings per cell")
    args = ap.parse_args()
    tasks = [get_task(n) for n in ("arith", "reverse", "choice")]
    pool = [e.question for t in tasks for e in t.load("train", limit=max(args.sizes) // 3 + 1, seed=0)]
    queries = [e.question for t in tasks for e in t.load("test", limit=args.queries // 3 + 1, seed=0)][: args.queries]
    load_embedder()  # loading the embedder is a one-off cost, not a per-query one
    rows = []
    for n in args.sizes:
        keys = pool[:n]
        for name, kw in BACKENDS.items():
            store = MemoryStore(RetrievalOptions(**kw))
            t0 = time.perf_counter()
            store.add([{"key": k, "task": "bench"} for k in keys])
            build = time.perf_counter() - t0
            best = {"probe_ms_per_query_batched": float("inf"), "probe_ms_per_query_single": float("inf")}
            for _ in range(args.repeats):
                for key, v in store.probe_latency(queries, args.k).items():
                    best[key] = min(best[key], v)
            rows.append({"n": n, "backend": name, "build_s": build, "batched_ms": best["probe_ms_per_query_batched"],
                         "single_ms": best["probe_ms_per_query_single"]})
    print(f"{'N':>6} {'backend':<12} {'build s':>8} {'batched ms/q':>13} {'single ms/q':>12} {'single / bm25':>14}")
    for r in rows:
        ref = next(x for x in rows if x["n"] == r["n"] and x["backend"] == "bm25")
        print(f"{r['n']:>6} {r['backend']:<12} {r['build_s']:>8.2f} {r['batched_ms']:>13.3f} {r['single_ms']:>12.3f} "
              f"{r['single_ms'] / ref['single_ms']:>13.1f}x")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
