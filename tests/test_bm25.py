"""The one BM25 wrapper (harness/bm25.py): a search corpus read through ``datasets`` (memory-mapped Arrow), its
index built once, saved with bm25s and reloaded (not rebuilt) with identical results; the retrieval memory uses
the same wrapper."""

import json

import numpy as np
import pytest

from harness.bm25 import BM25, DONE, Corpus, corpus_index
from harness.retrieval_index import MemoryStore, RetrievalOptions
from tasks.base import TaskError

ROWS = [{"title": "Gold", "text": "Gold is a chemical element with the symbol Au and atomic number 79."},
        {"title": "Paris", "text": "Paris is the capital and largest city of France, on the Seine."},
        {"title": "", "text": "The Nile is a major river in north-eastern Africa."},
        {"title": "Seine", "text": "The Seine is a river that flows through Paris into the English Channel."}]
QUERIES = ["chemical symbol of gold", "which river flows through Paris", "capital of France", "the of and"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_corpus_is_memory_mapped_arrow_with_titled_passages(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", ROWS)
    c = Corpus(tmp_path / "c.jsonl", tmp_path / "arrow")
    assert len(c) == 4 and c.data.cache_files  # rows in an Arrow file on disk, not a Python list
    assert c[0] == "Gold: Gold is a chemical element with the symbol Au and atomic number 79."
    assert c[2] == "The Nile is a major river in north-eastern Africa."  # empty title: the text alone
    assert list(c) == [c[i] for i in range(4)]
    write_jsonl(tmp_path / "bad.jsonl", [{"body": "no text field"}])
    with pytest.raises(TaskError, match="bad.jsonl: give a JSONL with one"):
        Corpus(tmp_path / "bad.jsonl", tmp_path / "arrow")


def test_index_is_built_once_then_reloaded_with_identical_results(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", ROWS)
    corpus, built = corpus_index(tmp_path / "c.jsonl", tmp_path / "cache")
    assert built.source == "built"
    (folder,) = (tmp_path / "cache" / "bm25").iterdir()
    marker = folder / DONE
    stamp, text = marker.stat().st_mtime_ns, marker.read_text()
    assert json.loads(text)["documents"] == 4

    again_corpus, loaded = corpus_index(tmp_path / "c.jsonl", tmp_path / "cache")
    assert loaded.source == "loaded"  # read from the saved folder, not re-tokenized
    assert marker.stat().st_mtime_ns == stamp and marker.read_text() == text
    assert sorted(p.name for p in (tmp_path / "cache" / "bm25").iterdir()) == [folder.name]  # no second build
    np.testing.assert_array_equal(built.scores(QUERIES), loaded.scores(QUERIES))
    for q in QUERIES:
        assert built.top(q, 2) == loaded.top(q, 2)
    assert [corpus[i] for i, _ in loaded.top("which river flows through Paris", 1)] == [again_corpus[3]]
    assert loaded.top("the of and", 3) == []  # stop words only: nothing matches

    write_jsonl(tmp_path / "c.jsonl", ROWS[:3])  # another corpus content: another key, a new build
    _, other = corpus_index(tmp_path / "c.jsonl", tmp_path / "cache")
    assert other.source == "built" and len(other) == 3
    assert len(list((tmp_path / "cache" / "bm25").iterdir())) == 2


def test_top_is_score_order_and_matches_the_score_matrix():
    idx = BM25.build(r["text"] for r in ROWS)  # a generator: read once
    scores = idx.scores(["river Paris"])[0]  # (N,)
    hits = idx.top("river Paris", 4)
    assert [i for i, _ in hits] == sorted((i for i in range(4) if scores[i] > 0), key=lambda i: -scores[i])
    assert [s for _, s in hits] == pytest.approx([float(scores[i]) for i, _ in hits])


def test_memory_store_bm25_uses_the_wrapper_and_survives_a_stopword_query(tmp_path):
    s = MemoryStore(RetrievalOptions(backend="bm25"))
    s.add([{"key": r["text"], "task": "t"} for r in ROWS])
    assert isinstance(s._bm25, BM25)
    assert [r["key"] for r, _ in s.search(["symbol of gold"], 1)[0]] == [ROWS[0]["text"]]
    assert len(s.search(["the of"], 2)[0]) == 2  # bm25s' get_scores raised IndexError on an empty query
    s.save(tmp_path / "m")
    t = MemoryStore(RetrievalOptions(backend="bm25"))
    t.load(tmp_path / "m")
    assert t._bm25.source == "loaded"
    assert t.search(QUERIES, 2) == s.search(QUERIES, 2)
