"""Knowledge tasks on hand-made rows in the official column layouts (TriviaQA, PopQA, GPQA, ARC).

The GPQA rows are invented (its authors ask that real questions not be copied around in plain text)."""

from __future__ import annotations

import csv
import dataclasses
import json

import pytest

from harness.bm25 import BM25
from tasks.base import TaskError
from tasks.qa import (
    ChoiceTask,
    OpenQATask,
    alias_match,
    exact_match,
    extract_answer,
    normalize_answer,
    token_f1,
)
from tasks.registry import definitions

TRIVIA = [
    {"question": "Which city is the capital of France?", "question_id": "tq1", "question_source": "x",
     "entity_pages": {"doc_source": [], "filename": [], "title": [], "wiki_context": []},
     "search_results": {"description": [], "filename": [], "rank": [], "title": [], "url": [], "search_context": []},
     "answer": {"aliases": ["Paris", "Paris, France", "City of Light"], "normalized_aliases": ["paris", "paris france",
                "city of light"], "matched_wiki_entity_name": "", "normalized_matched_wiki_entity_name": "",
                "normalized_value": "paris", "type": "WikipediaEntity", "value": "Paris"}},
    {"question": "What is the chemical symbol for gold?", "question_id": "tq2", "question_source": "x",
     "entity_pages": {}, "search_results": {},
     "answer": {"aliases": ["Au"], "normalized_aliases": ["au"], "matched_wiki_entity_name": "",
                "normalized_matched_wiki_entity_name": "", "normalized_value": "au", "type": "FreeForm",
                "value": "Au"}},
]

POPQA = [
    {"id": 100 + i, "subj": s, "prop": "occupation", "obj": o, "subj_id": i, "prop_id": 22, "obj_id": i,
     "s_aliases": "[]", "o_aliases": json.dumps([o.lower()]), "s_uri": "", "o_uri": "", "s_wiki_title": s,
     "o_wiki_title": o, "s_pop": 10 * i, "o_pop": 5, "question": f"What is {s}'s occupation?",
     "possible_answers": json.dumps([o, o.lower(), f"{o} (profession)"])}
    for i, (s, o) in enumerate([("Ann Lee", "Painter"), ("Bo Chan", "Chemist"), ("Cy Ross", "Pilot"),
                                ("Di Park", "Baker"), ("Ed Moss", "Poet"), ("Flo Kim", "Judge")])
]

GPQA_COLUMNS = ["Pre-Revision Question", "Pre-Revision Correct Answer", "Pre-Revision Incorrect Answer 1",
                "Pre-Revision Incorrect Answer 2", "Pre-Revision Incorrect Answer 3", "Pre-Revision Explanation",
                "Self-reported question-writing time (minutes)", "Question", "Correct Answer", "Incorrect Answer 1",
                "Incorrect Answer 2", "Incorrect Answer 3", "Explanation", "Revision Comments (from Question Writer)",
                "Subdomain", "Writer's Difficulty Estimate", "Extra Revised Question", "Extra Revised Explanation",
                "Extra Revised Correct Answer", "Extra Revised Incorrect Answer 1", "Extra Revised Incorrect Answer 2",
                "Extra Revised Incorrect Answer 3", "Non-Expert Validator Accuracy", "Majority Non-Expert Vals Incorrect",
                "Expert Validator Accuracy", "Record ID", "High-level domain", "Question Writer"]


def gpqa_row(k: int) -> dict[str, str]:
    row = dict.fromkeys(GPQA_COLUMNS, "")
    row.update({"Question": f"Made-up question {k}: which toy particle has spin {k}?",
                "Correct Answer": f"particle-{k}", "Incorrect Answer 1": f"decoy-{k}a",
                "Incorrect Answer 2": f"decoy-{k}b", "Incorrect Answer 3": f"decoy-{k}c",
                "Explanation": f"By construction particle-{k} has spin {k}.", "Record ID": f"rec{k:03d}",
                "High-level domain": "Physics", "Subdomain": "Toy"})
    return row


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def task(name: str, root, cls, **options):
    d = definitions()[name]
    return cls(dataclasses.replace(d, options={**d.options, **options}), root)


def test_answer_normalisation_and_scores():
    assert normalize_answer("The  City of Light!") == "city of light"
    assert exact_match("the Paris.", ["Paris"]) == 1.0 and exact_match("Paris France", ["Paris"]) == 0.0
    assert alias_match("I think it is Paris, France", ["Paris"]) == 1.0
    assert alias_match("Parisian", ["Paris"]) == 0.0  # whole words only
    assert alias_match("", ["Paris"]) == 0.0
    # F1: pred "paris in france" vs gold "paris france": common 2, P = 2/3, R = 1 -> 0.8
    assert token_f1("Paris in France", ["Paris, France"]) == pytest.approx(0.8)
    assert token_f1("Rome", ["Paris"]) == 0.0
    assert extract_answer("<think>hm</think><answer> Au </answer>") == "Au"
    assert extract_answer("<answer>Au") == "Au" and extract_answer("Answer: Au\n") == "Au"


def test_triviaqa_closed_book_from_local_rows(tmp_path):
    write_jsonl(tmp_path / "triviaqa" / "validation.jsonl", TRIVIA)
    t = task("triviaqa", tmp_path, OpenQATask)
    assert t.closed_book and t.rollout is None
    exs = t.load("test")
    assert [e.id for e in exs] == ["tq1", "tq2"] and "City of Light" in exs[0].meta["aliases"]
    assert exs[0].target == "<answer>Paris</answer>"
    assert t.score("<answer>city of light</answer>", exs[0]) == 1.0
    assert t.score("<answer>Lyon</answer>", exs[0]) == 0.0
    assert t.score("The symbol is Au.", exs[1]) == 1.0
    assert task("triviaqa", tmp_path, OpenQATask, metric="em").score("<answer>gold, Au</answer>", exs[1]) == 0.0
    assert "Question: Which city" in t.prompt(exs[0])


def test_popqa_json_answers_and_disjoint_hash_split(tmp_path):
    write_jsonl(tmp_path / "popqa" / "test.jsonl", POPQA)
    t = task("popqa", tmp_path, OpenQATask)
    train, test = t.load("train"), t.load("test")
    assert {e.id for e in train}.isdisjoint({e.id for e in test})
    assert len(train) + len(test) == len(POPQA) and train and test
    e = (train + test)[0]
    assert e.meta["aliases"][0] == e.answer and t.score(f"<answer>{e.answer.lower()}</answer>", e) == 1.0


def test_malformed_rows_and_missing_corpus_fail_clearly(tmp_path):
    write_jsonl(tmp_path / "popqa" / "test.jsonl", [{**POPQA[0], "possible_answers": "[]"}])
    with pytest.raises(TaskError, match=r"test.jsonl:1: malformed popqa row"):
        task("popqa", tmp_path, OpenQATask, train_fraction=None).load("test")
    with pytest.raises(TaskError, match="search corpus nope.jsonl not found"):
        task("popqa", tmp_path, OpenQATask, corpus="nope.jsonl")
    with pytest.raises(TaskError, match="options.metric"):
        task("popqa", tmp_path, OpenQATask, metric="bleu")


def test_hub_loading_offline_names_the_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MEMGEN_BENCH_DATA", raising=False)
    with pytest.raises(TaskError, match="mandarjoshi/trivia_qa"):
        task("triviaqa", None, OpenQATask).load("test", limit=2)
    with pytest.raises(TaskError, match=r"Idavidrein/gpqa \(gpqa_diamond"):
        task("gpqa", None, ChoiceTask).load("test", limit=2)


def test_bm25_index_finds_the_passage():
    idx = BM25.build(["Paris is the capital of France.", "Au is the chemical symbol of gold.",
                      "The Nile is a river in Africa."])
    assert [i for i, _ in idx.top("chemical symbol gold", k=1)] == [1]
    assert idx.top("the of", k=3) == []  # stopwords only
    assert len(idx.top("capital river", k=3)) == 2


class Reader:
    """A rule-based reader for the search loop: searches the question, then answers with the first capitalised
    word of the first retrieved passage. Real retrieval and real scoring decide whether that is right."""

    name = "reader"

    def generate(self, task, examples, max_new_tokens):
        out = []
        for e in examples:
            info = [m["content"] for m in e.meta["messages"] if m["content"].startswith("<information>")]
            if not info:
                out.append(f"<search>{e.question}</search>")
            else:
                out.append(f"<answer>{info[-1].split('Doc 1: ')[1].split()[0]}</answer>")
        return out


def test_search_loop_retrieves_and_scores(tmp_path):
    write_jsonl(tmp_path / "triviaqa" / "validation.jsonl", TRIVIA)
    write_jsonl(tmp_path / "corpus.jsonl", [{"title": "Gold", "text": "chemical symbol Au; element 79."},
                                            {"title": "Paris", "text": "capital city of France."}])
    t = task("triviaqa", tmp_path, OpenQATask, corpus="corpus.jsonl", top_k=1)
    assert not t.closed_book and t.rollout is not None
    exs = t.load("test")
    comps = t.rollout(Reader(), exs, 16)
    trajs = [json.loads(c) for c in comps]
    assert [tr["turns"] for tr in trajs] == [2, 2]
    assert trajs[0]["steps"][0]["observation"].startswith("<information>\nDoc 1: Paris: capital city")
    # The reader answers "Paris:" for tq1 (right after normalisation) and "Gold:" for tq2 (wrong).
    assert [t.score(c, e) for c, e in zip(comps, exs, strict=True)] == [1.0, 0.0]
    assert trajs[0]["success"] and not trajs[1]["success"]


def test_gpqa_csv_shuffle_is_fixed_per_question_and_train_excludes_test(tmp_path):
    folder = tmp_path / "gpqa"
    folder.mkdir()
    for name, ks in (("gpqa_main", range(8)), ("gpqa_diamond", range(5, 8))):
        with (folder / f"{name}.csv").open("w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=GPQA_COLUMNS)
            w.writeheader()
            w.writerows(gpqa_row(k) for k in ks)
    t = task("gpqa", tmp_path, ChoiceTask)
    test, train = t.load("test"), t.load("train")
    assert [e.id for e in test] == ["rec005", "rec006", "rec007"]
    assert [e.id for e in train] == [f"rec{k:03d}" for k in range(5)]
    for e in test + train:
        k = int(e.id[3:])
        assert e.meta["options"]["ABCD".index(e.answer)] == f"particle-{k}"
        assert f"{e.answer}. particle-{k}" in e.question and e.target.endswith(f"\\boxed{{{e.answer}}}.")
        assert t.score(f"so the answer is \\boxed{{{e.answer}}}", e) == 1.0
    # the order depends on the question only: the same on every load and under any run seed
    assert [e.question for e in t.load("test", seed=5)] == [e.question for e in test]
    assert len({e.answer for e in train + test}) > 1  # shuffled, not always A


def test_arc_numeric_labels_become_letters(tmp_path):
    rows = [{"id": "Mercury_1", "question": "Which is a mammal?",
             "choices": {"text": ["shark", "whale", "trout", "eel"], "label": ["1", "2", "3", "4"]}, "answerKey": "2"},
            {"id": "Mercury_2", "question": "Water boils at?",
             "choices": {"text": ["50 C", "100 C", "150 C"], "label": ["A", "B", "C"]}, "answerKey": "B"}]
    write_jsonl(tmp_path / "arc_challenge" / "test.jsonl", rows)
    t = task("arc_challenge", tmp_path, ChoiceTask)
    a, b = t.load("test")
    assert a.meta["options"]["ABCD".index(a.answer)] == "whale"
    assert b.meta["options"]["ABC".index(b.answer)] == "100 C" and "D." not in b.question
    write_jsonl(tmp_path / "arc_challenge" / "test.jsonl", [{**rows[0], "answerKey": "E"}])
    with pytest.raises(TaskError, match="answerKey 'E' is not among the labels"):
        t.load("test")
