"""The one BM25 wrapper (``bm25s``) of the benchmark, and search corpora read through ``datasets``.

Every BM25 caller goes through ``BM25``: the retrieval memories (``harness/retrieval_index.py``, ``backend=bm25``)
and the QA search tool (``tasks/qa.py``, ``options.corpus``). Text is lower-cased, split into word tokens and
English stop words are dropped (``bm25s.tokenize``); scores are bm25s' defaults (Lucene BM25, k1 1.5, b 0.75).

A search corpus (a JSONL of ``{"text": ..., "title": ...}`` passages) is loaded with
``datasets.load_dataset("json")``: the passages live in a memory-mapped Arrow file, not in Python lists, so a
Wikipedia-size corpus need not fit in memory as strings. Its index is built once and saved with bm25s' own
``save`` under ``<cache>/bm25/<sha256 of the corpus file>`` (``$MEMGEN_BENCH_CACHE`` or ``~/.cache/memgen-bench``),
and every later run reloads it (memory-mapped) instead of re-tokenizing the corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

INDEX_VERSION = 1  # part of the cache key: bump when the tokenization or scoring settings change
DONE = "DONE"  # marker (with the build time) written last into a finished cache folder


def _tokenize(texts: Iterable[str], ids: bool) -> Any:
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", return_ids=ids, show_progress=False)


class BM25:
    """A BM25 index over N documents (numbered 0..N-1 in the order they were given)."""

    def __init__(self, retriever: Any, source: str):
        self.retriever = retriever
        self.source = source  # "built" or "loaded" (from a saved folder)

    @classmethod
    def build(cls, texts: Iterable[str]) -> BM25:
        """Index ``texts`` (any iterable: a generator over a corpus is read once, never held as a list)."""
        import bm25s

        retriever = bm25s.BM25()
        retriever.index(_tokenize(texts, ids=True), show_progress=False)
        return cls(retriever, "built")

    def __len__(self) -> int:
        return int(self.retriever.scores["num_docs"])

    def scores(self, queries: Sequence[str]) -> np.ndarray:
        """BM25 score of every document for each query, (Q, N); a query with no indexed word scores 0 everywhere."""
        out = np.zeros((len(queries), len(self)), dtype=np.float32)  # (Q, N)
        for q, tokens in enumerate(_tokenize(list(queries), ids=False)):
            known = self.retriever.get_tokens_ids(tokens)
            if known:
                out[q] = self.retriever.get_scores(known)
        return out

    def top(self, query: str, k: int) -> list[tuple[int, float]]:
        """The ``k`` best documents for ``query`` with a positive score, best first: (index, score)."""
        scores = self.scores([query])[0]  # (N,)
        k = min(k, len(scores))
        if k <= 0:
            return []
        best = np.argpartition(-scores, k - 1)[:k]
        best = best[np.lexsort((best, -scores[best]))]  # score descending, ties by index: deterministic
        return [(int(i), float(scores[i])) for i in best if scores[i] > 0]

    def save(self, path: Path) -> None:
        self.retriever.save(str(path), show_progress=False)

    @classmethod
    def load(cls, path: Path, mmap: bool = False) -> BM25:
        import bm25s

        return cls(bm25s.BM25.load(str(path), mmap=mmap, show_progress=False), "loaded")


class Corpus:
    """Passages of a JSONL search corpus, memory-mapped through ``datasets`` (Arrow); ``corpus[i]`` is passage i
    (``title: text`` when the row has a title)."""

    def __init__(self, path: Path, cache_dir: Path | None = None):
        import datasets

        from tasks.base import TaskError

        quiet = not datasets.are_progress_bars_disabled()
        if quiet:  # no "Generating train split" bars in a run's log
            datasets.disable_progress_bars()
        try:
            self.data = datasets.load_dataset("json", data_files=str(path), split="train",
                                              cache_dir=str(cache_dir) if cache_dir else None)
        except Exception as exc:  # noqa: BLE001 - pyarrow/datasets raise many kinds for a malformed file
            raise TaskError(f"search corpus {path} did not load as JSONL ({type(exc).__name__}: {exc})") from exc
        finally:
            if quiet:
                datasets.enable_progress_bars()
        if "text" not in self.data.column_names or not len(self.data):
            raise TaskError(f"search corpus {path}: give a JSONL with one {{\"text\": ...}} passage per line "
                            f"(optionally 'title'); it has columns {self.data.column_names} and {len(self.data)} rows")
        self.path = path
        self.titled = "title" in self.data.column_names

    def __len__(self) -> int:
        return len(self.data)

    def _passage(self, row: dict[str, Any], i: int) -> str:
        if row["text"] is None:
            from tasks.base import TaskError

            raise TaskError(f"{self.path}:{i + 1}: corpus rows need a 'text' field (optionally 'title')")
        return f"{row['title']}: {row['text']}" if self.titled and row.get("title") else str(row["text"])

    def __getitem__(self, i: int) -> str:
        return self._passage(self.data[int(i)], int(i))

    def __iter__(self) -> Iterator[str]:
        i = 0
        for batch in self.data.iter(batch_size=4096):  # Arrow batches: one batch of strings in memory at a time
            for j, text in enumerate(batch["text"]):
                yield self._passage({"text": text, "title": batch["title"][j] if self.titled else None}, i)
                i += 1


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_root() -> Path:
    from harness.models import cache_dir

    return cache_dir()


def corpus_index(path: Path, root: Path | None = None) -> tuple[Corpus, BM25]:
    """The corpus at ``path`` and its BM25 index: loaded from ``<root>/bm25/<key>`` when a finished one is there,
    else built from the corpus and saved there first. Writers of the same key (processes of a launch) each build
    into a temporary folder and rename it into place; the first rename wins, the others use it."""
    root = root or cache_root()
    corpus = Corpus(path, root / "corpora")
    key = f"{file_sha256(path)[:32]}-v{INDEX_VERSION}"
    folder = root / "bm25" / key
    if (folder / DONE).exists():
        return corpus, BM25.load(folder, mmap=True)
    index = BM25.build(iter(corpus))
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=folder.parent))
    index.save(tmp)
    (tmp / DONE).write_text(json.dumps({"corpus": str(path), "documents": len(index), "built": time.time()}) + "\n")
    try:
        os.rename(tmp, folder)
    except OSError:  # another process finished the same index first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return corpus, index
