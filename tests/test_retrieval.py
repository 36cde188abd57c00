"""Retrieval memory: pure search/eviction functions, hand-made stores (dense exact, FAISS, BM25), persistence,
and the ExpeL/AWM pure helpers (insight operations, workflow abstraction) against hand-computed values."""

import numpy as np
import pytest

from baselines.retrieval_awm import anti_unify, induce_rule_workflows, lex, shape
from baselines.retrieval_expel import InsightOp, apply_insight_ops, parse_insight_ops
from harness.retrieval_index import MemoryStore, RetrievalOptions, check_options, choose_evictions, top_k

# -- pure functions --------------------------------------------------------------------------------------------


def test_top_k_orders_by_score_and_breaks_ties_by_index():
    scores = np.array([[0.1, 0.9, 0.9, 0.3], [0.5, 0.2, 0.7, 0.7]])  # (Q=2, N=4)
    idx, vals = top_k(scores, 3)
    assert idx.tolist() == [[1, 2, 3], [2, 3, 0]]
    assert vals.tolist() == [[0.9, 0.9, 0.3], [0.7, 0.7, 0.5]]
    idx, _ = top_k(scores, 10)  # k larger than the store: everything, still sorted
    assert idx.tolist() == [[1, 2, 3, 0], [2, 3, 0, 1]]
    idx, vals = top_k(np.zeros((2, 0)), 3)
    assert idx.shape == (2, 0) and vals.shape == (2, 0)


def _recs(spec):
    return [{"task": t, "added": a, "last_used": u} for t, a, u in spec]


def test_eviction_rules_hand_computed():
    recs = _recs([("a", 1, 9), ("a", 2, 2), ("b", 3, 3), ("b", 4, 8), ("c", 5, 5)])
    assert choose_evictions(recs, None, "fifo") == []
    assert choose_evictions(recs, 5, "fifo") == []
    assert choose_evictions(recs, 3, "fifo") == [0, 1]  # the two oldest
    assert choose_evictions(recs, 3, "lru") == [1, 2]  # last used at 2 and 3
    # per_task: a and b hold 2 each (tie -> a, seen first) -> drop a's oldest (0); then b has 2 -> drop b's oldest.
    assert choose_evictions(recs, 3, "per_task") == [0, 2]
    recs = _recs([("a", 1, 1), ("a", 2, 2), ("a", 3, 3), ("b", 4, 4)])
    assert choose_evictions(recs, 2, "per_task") == [0, 1]  # b keeps its only record
    with pytest.raises(ValueError, match="unknown eviction rule"):
        choose_evictions(recs, 1, "random")


def test_bad_options_name_the_key():
    with pytest.raises(ValueError, match=r"method_options.expel.backend='faiss'.*dense, bm25"):
        check_options(RetrievalOptions(backend="faiss"), "expel")
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        check_options(RetrievalOptions(capacity=0), "awm")


# -- hand-made stores --------------------------------------------------------------------------------------------
KEYS = [
    "Compute (3 + 4) * 2.",
    "Reverse the order of these words: apple bread chair delta eagle",
    "Which of these is a fruit?\nA) mango\nB) hammer\nC) taxi\nD) red",
    "What is the capital city of France?",
    "Write a Python function that sorts a list of integers.",
]
QUERIES = {  # query -> index of the key it must retrieve first
    "Compute (12 - 5) + 7.": 0,
    "Reverse the order of these words: tiger lemon ocean piano quilt": 1,
    "Which of these is an animal?\nA) wolf\nB) blue\nC) drill\nD) Peru": 2,
    "Which city is the capital of Spain?": 3,
    "Python function: sort integers in a list": 4,
}


def _store(backend, search="exact", **kw):
    s = MemoryStore(RetrievalOptions(backend=backend, dense_search=search, **kw))
    s.add([{"key": k, "task": f"t{i}", "n": i} for i, k in enumerate(KEYS)])
    return s


@pytest.mark.parametrize("backend,search", [("dense", "exact"), ("dense", "faiss"), ("bm25", "exact")])
def test_store_returns_the_right_neighbours(backend, search, tmp_path):
    s = _store(backend, search)
    hits = s.search(list(QUERIES), k=2)
    assert [h[0][0]["n"] for h in hits] == list(QUERIES.values())
    assert all(len(h) == 2 and h[0][1] >= h[1][1] for h in hits)
    assert s.stats()["retrieval_queries"] == len(QUERIES) and s.latency_ms_per_query() > 0
    # Persisted and reloaded (index files, not re-embedded): the same neighbours with the same scores.
    s.save(tmp_path / "mem")
    t = MemoryStore(s.opts)
    t.load(tmp_path / "mem")
    again = t.search(list(QUERIES), k=2)
    assert [[(r["n"], round(v, 5)) for r, v in h] for h in again] == [[(r["n"], round(v, 5)) for r, v in h] for h in hits]
    if backend == "dense":
        assert (tmp_path / "mem" / "embeddings.npy").exists()
        assert (tmp_path / "mem" / "index.faiss").exists() == (search == "faiss")
    else:
        assert (tmp_path / "mem" / "bm25").is_dir()


def test_dense_exact_and_faiss_agree():
    a, b = _store("dense", "exact"), _store("dense", "faiss")
    ha, hb = a.search(list(QUERIES), k=5), b.search(list(QUERIES), k=5)
    for x, y in zip(ha, hb, strict=True):
        assert [r["n"] for r, _ in x] == [r["n"] for r, _ in y]
        assert np.allclose([v for _, v in x], [v for _, v in y], atol=1e-5)


def test_capacity_evicts_and_keeps_the_index_aligned(tmp_path):
    s = _store("dense", capacity=3)  # fifo: the first two keys are gone
    assert [r["n"] for r in s.records] == [2, 3, 4] and s.evicted == 2
    for q, want in QUERIES.items():
        if want >= 2:
            assert s.search([q], k=1)[0][0][0]["n"] == want
    with pytest.raises(ValueError, match="built with backend='dense'"):
        s.save(tmp_path / "m")
        MemoryStore(RetrievalOptions(backend="bm25")).load(tmp_path / "m")


def test_touch_only_when_asked():
    s = _store("bm25", eviction="lru")
    before = [r["last_used"] for r in s.records]
    s.search(["Compute (1 + 1) * 1."], k=1)  # evaluation: read-only
    assert [r["last_used"] for r in s.records] == before
    s.search(["Compute (1 + 1) * 1."], k=1, touch=True)
    assert s.records[0]["last_used"] > max(before)


def test_empty_store_returns_nothing(tmp_path):
    s = MemoryStore(RetrievalOptions(backend="bm25"))
    assert s.search(["anything"], k=3) == [[]]
    s.save(tmp_path / "e")
    t = MemoryStore(s.opts)
    t.load(tmp_path / "e")
    assert len(t) == 0


# -- ExpeL insight operations ------------------------------------------------------------------------------------


def test_parse_insight_ops():
    reply = ("Sure! Here are the operations:\n"
             "ADD: Always show each step.\n"
             "- EDIT 2: Check the sign of the result.\n"
             "UPVOTE 1\n"
             "DOWNVOTE 3\n"
             "1. Add 7 and 4: 11.\n"  # a numbered step, not an operation
             "ADD the numbers\n"  # ADD without its colon
             "upvote 2\n"  # keywords are upper case
             "AGREE 4: keep it\n"
             "REMOVE 5\n"
             "This line is not an operation.")
    ops = parse_insight_ops(reply)
    assert ops == [InsightOp("ADD", None, "Always show each step."), InsightOp("EDIT", 2, "Check the sign of the result."),
                   InsightOp("UPVOTE", 1, ""), InsightOp("DOWNVOTE", 3, ""), InsightOp("UPVOTE", 4, "keep it"),
                   InsightOp("DOWNVOTE", 5, "")]


def test_parse_insight_ops_on_garbage_finds_nothing():
    # What a 135M model writes back: numbered steps, lower-case keywords, echoes of the prompt.
    for reply in ["1. Add 3 and 4: 7.\n2. Multiply by 2.", "add: be careful", "Current rules:\n(none yet)", "",
                  "ADDITION: sum the numbers", "EDITING the rules now"]:
        assert parse_insight_ops(reply) == [], reply


def test_apply_insight_ops_follows_expel_update_rules():
    base = [{"text": "Show each step.", "votes": 2}, {"text": "Be brief always.", "votes": 1},
            {"text": "Use the letters.", "votes": 3}]
    ops = [InsightOp("ADD", None, "Check the sign."), InsightOp("EDIT", 3, "Answer with one letter."),
           InsightOp("UPVOTE", 1, ""), InsightOp("DOWNVOTE", 2, ""),
           InsightOp("ADD", None, "show each step."),  # duplicate of 1 -> rejected
           InsightOp("UPVOTE", 9, ""), InsightOp("ADD", None, ""),  # no insight 9, empty text -> rejected
           InsightOp("ADD", None, "ADD: two ops run together"),  # keyword inside -> rejected
           InsightOp("EDIT", 2, "Show each step.")]  # EDIT to an existing text = UPVOTE of insight 1
    out, counts = apply_insight_ops(base, ops, max_insights=8)
    # 1: 2 +1 +1 = 4; 2: 1 -1 = 0 -> removed; 3: 3 +1 (edit) = 4; new: 2. Sorted by importance, stable.
    assert out == [{"text": "Show each step.", "votes": 4}, {"text": "Answer with one letter.", "votes": 4},
                   {"text": "Check the sign.", "votes": 2}]
    assert counts == {"applied": 5, "rejected": 4}
    assert base[1]["votes"] == 1  # the input list is not modified


def test_full_list_still_accepts_add_and_downvotes_weigh_three():
    full = [{"text": f"Rule number {i}.", "votes": 3} for i in range(1, 4)]
    out, counts = apply_insight_ops(full, [InsightOp("DOWNVOTE", 1, ""), InsightOp("ADD", None, "A later task rule.")],
                                    max_insights=3)
    # Full (3 of 3): DOWNVOTE costs 3 -> rule 1 is removed; ADD is not refused (ExpeL has no hard cap).
    assert out == [{"text": "Rule number 2.", "votes": 3}, {"text": "Rule number 3.", "votes": 3},
                   {"text": "A later task rule.", "votes": 2}]
    assert counts == {"applied": 2, "rejected": 0}
    out, _ = apply_insight_ops(full, [InsightOp("DOWNVOTE", 1, "")], max_insights=4)  # not full: -1
    assert out[-1] == {"text": "Rule number 1.", "votes": 2}


def test_attempts_stop_when_nothing_succeeds():
    from harness.retrieval_index import attempt_examples
    from tasks.registry import get_task

    task = get_task("arith")
    ex = task.load("train", limit=10)
    calls = []

    def wrong(prompts, budget):  # a policy that never solves arith (the scorer decides)
        calls.append(len(prompts))
        return ["Answer: nope"] * len(prompts)

    log = attempt_examples(wrong, task, ex, 8, lambda e, r: e.question, 2, 1.0, give_up_after=4)
    assert log.gave_up and log.attempts == 4 and calls == [4]
    right = {e.question: e.target for e in ex}
    log = attempt_examples(lambda ps, b: [right[p] for p in ps], task, ex, 8, lambda e, r: e.question, 2, 1.0,
                           give_up_after=4)
    assert not log.gave_up and log.attempts == 10  # successes: every problem is attempted, nothing retried


# -- AWM rule induction --------------------------------------------------------------------------------------------


def test_lex_round_trips_and_keeps_signs():
    text = "3 - 17 = -14. -14 - 6 = -20.\nAnswer: -20"
    toks, seps = lex(text)
    assert toks == ["3", "-", "17", "=", "-14", ".", "-14", "-", "6", "=", "-20", ".", "Answer", ":", "-20"]
    assert "".join(s + t for s, t in zip(seps, toks, strict=False)) + seps[-1] == text
    assert shape("Answer: -20") == shape("Answer: 7") == ("W", ":", "N")


def test_anti_unification_abstracts_what_the_examples_do_not_share():
    qs = ["Compute (3 + 4) * 2.", "Compute (10 + 7) * 5.", "Compute (8 + 2) * 3."]
    sols = ["3 + 4 = 7. 7 * 2 = 14.\nAnswer: 14", "10 + 7 = 17. 17 * 5 = 85.\nAnswer: 85",
            "8 + 2 = 10. 10 * 3 = 30.\nAnswer: 30"]
    q, s = anti_unify(qs, sols)
    assert q == "Compute ({v1} + {v2}) * {v3}."
    assert s == "{v1} + {v2} = {r1}. {r1} * {v3} = {r2}.\nAnswer: {r2}"
    # Option letters at fixed positions are shared, so they stay; the chosen option is computed ({r}).
    qs = ["Which of these is a fruit?\nmango (A)\nhammer (B)", "Which of these is a tool?\nred (A)\nsaw (B)"]
    q, s = anti_unify(qs, ["mango (A) is a fruit.\nAnswer: A", "saw (B) is a tool.\nAnswer: B"])
    assert q == "Which of these is a {v1}?\n{v2} (A)\n{v3} (B)"
    assert s == "{r1} ({r2}) is a {v1}.\nAnswer: {r2}"
    # Questions of different shapes: values are looked up in each example's own question.
    _, s = anti_unify(["go to the red room", "then go to the big blue hall"], ["open red", "open hall"])
    assert s == "open {v1}"


def test_rule_induction_needs_support_and_groups_by_shape():
    items = [("Compute (1 + 2) * 3.", "k", "1 + 2 = 3. 3 * 3 = 9.\nAnswer: 9"),
             ("Compute (2 + 5) * 2.", "k", "2 + 5 = 7. 7 * 2 = 14.\nAnswer: 14"),
             ("Compute (4 - 1) + 6.", "k", "4 - 1 = 3. 3 + 6 = 9.\nAnswer: 9")]  # another shape, alone
    ws = induce_rule_workflows(items, min_support=2)
    assert ws == [{"key": "Compute ({v1} + {v2}) * {v3}.", "workflow": "{v1} + {v2} = {r1}. {r1} * {v3} = {r2}."
                   "\nAnswer: {r2}", "support": 2}]
    assert induce_rule_workflows(items, min_support=3) == []
