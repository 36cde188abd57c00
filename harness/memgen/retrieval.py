"""MemGen with retrieval: the weaver reads retrieved solved examples before the reasoner's states.

The paper notes the weaver can also take textual cues from a retriever. With ``retrieval_k > 0`` a store holds
the gold solutions (question + gold target) of the train split of every task trained so far, in a
``harness.retrieval_index.MemoryStore`` (dense sentence embeddings or BM25: the same search, persistence and
per-stage snapshots as the retrieval baselines). At the first weaver call of a sequence (the prompt insertion, or
the first turn insertion of a multi-turn prompt) the weaver's input is
``[weaver token embeddings of the retrieved text ; projected reasoner states ; queries]``; the reasoner's own
prompt and sequence are unchanged. In weaver SFT the store already holds the task being trained, and each
training example's retrieval excludes the example itself (no copying of the answer through the weaver).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.retrieval_index import MemoryStore, RetrievalOptions
from tasks.base import Example, Task

RETRIEVAL_BACKENDS = ("dense", "bm25")
RETRIEVAL_STORES = ("gold",)
MEMORY_DIR = "retrieval_memory"
HEADER = "Solved examples:\n"


def format_record(record: dict[str, Any]) -> str:
    """One retrieved example as the weaver reads it."""
    return f"Question: {record['question'].strip()}\nSolution: {record['target'].strip()}\n\n"


class WeaverRetrieval:
    """The store of gold solutions and the weaver-token prefixes built from it."""

    def __init__(self, k: int, backend: str, store: str, max_tokens: int, tokenizer: Any):
        self.k = k
        self.max_tokens = max_tokens
        self.tokenizer = tokenizer
        self.store = MemoryStore(RetrievalOptions(k=k, backend=backend, store=store))
        self.last_texts: list[str] = []
        """The retrieved text of each row of the last ``prefixes`` call (for inspection and tests)."""

    @staticmethod
    def record_id(task: Task, example: Example) -> str:
        return f"{task.name}/{example.id}"

    def add_task(self, task: Task, examples: Sequence[Example], stage: int) -> int:
        """Store the gold solutions of ``examples`` (ones already stored are skipped); returns how many were added."""
        known = {r["id"] for r in self.store.records}
        new = []
        for e in examples:
            rid = self.record_id(task, e)
            if rid not in known:
                known.add(rid)
                new.append({"id": rid, "task": task.name, "key": e.question, "question": e.question,
                            "target": e.target, "stage": stage})
        self.store.add(new)
        return len(new)

    def retrieve(self, task: Task, examples: Sequence[Example], exclude_self: bool = False) -> list[list[dict[str, Any]]]:
        """The ``k`` nearest stored records per example, best first; ``exclude_self`` drops the example's own record
        (weaver SFT). Read-only: the store's usage clocks are not touched."""
        hits = self.store.search([e.question for e in examples], self.k + int(exclude_self))
        out = []
        for e, row in zip(examples, hits, strict=True):
            own = self.record_id(task, e) if exclude_self else None
            out.append([r for r, _ in row if r["id"] != own][: self.k])
        return out

    def prefixes(self, task: Task, examples: Sequence[Example], exclude_self: bool = False) -> list[list[int]]:
        """Weaver-token ids of each example's retrieved text: a header, then each record within an equal share of
        ``max_tokens`` (most similar first). Empty when nothing is stored."""
        out, texts = [], []
        for recs in self.retrieve(task, examples, exclude_self):
            if not recs:
                out.append([])
                texts.append("")
                continue
            head = self.tokenizer(HEADER, add_special_tokens=False).input_ids
            share = max(1, (self.max_tokens - len(head)) // len(recs))
            ids = list(head)
            for r in recs:
                ids += self.tokenizer(format_record(r), add_special_tokens=False).input_ids[:share]
            ids = ids[: self.max_tokens]
            out.append(ids)
            texts.append(self.tokenizer.decode(ids))
        self.last_texts = texts
        return out

    def stats(self) -> dict[str, Any]:
        return self.store.stats()

    def save(self, path: Path) -> None:
        self.store.save(path / MEMORY_DIR)

    def load(self, path: Path) -> None:
        if not (path / MEMORY_DIR / "state.json").exists():
            raise FileNotFoundError(f"memgen checkpoint {path} has no {MEMORY_DIR}/ but retrieval_k > 0; it was saved "
                                    "without retrieval (set method_options.memgen.retrieval_k=0 to load it)")
        self.store.load(path / MEMORY_DIR)
