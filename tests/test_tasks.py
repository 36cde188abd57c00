"""Tasks: loading real benchmark files, malformed input, registry, prompts, synthetic determinism."""

import json

import pytest

from tasks.base import TaskError
from tasks.registry import get_task, resolve_sequence, task_names


def test_registry_lists_foundation_tasks():
    assert {"gsm8k", "math", "aqua", "arith", "reverse", "choice"} <= set(task_names())
    with pytest.raises(TaskError, match="unknown task 'nope'.*valid tasks"):
        get_task("nope")


def test_resolve_sequence():
    assert resolve_sequence("quick") == ["arith", "reverse", "choice"]
    assert resolve_sequence("gsm8k->math") == ["gsm8k", "math"]
    assert resolve_sequence("arith,choice") == ["arith", "choice"]
    with pytest.raises(TaskError, match="unknown task"):
        resolve_sequence("arith,bogus")
    with pytest.raises(TaskError, match="repeats"):
        resolve_sequence("arith,arith")


def test_gsm8k_loads_and_scores_gold(data_dir):
    t = get_task("gsm8k", data_dir)
    ex = t.load("test", limit=20, seed=1)
    assert len(ex) == 20 and ex == t.load("test", limit=20, seed=1)  # seeded and stable
    assert ex != t.load("test", limit=20, seed=2)
    for e in ex:
        assert "<<" not in e.target
        assert t.score(e.target, e) == 1.0  # the gold target scores 1
        assert t.score("The answer is \\boxed{-99999}.", e) == 0.0
    assert len(t.load("train")) == 7473


def test_math_and_aqua_gold_targets_score_one(data_dir):
    for name in ("math", "aqua", "math500"):
        t = get_task(name, data_dir)
        ex = t.load("test", limit=30, seed=0)
        acc = sum(t.score(e.target, e) for e in ex) / len(ex)
        assert acc >= 0.9, (name, acc)  # a few MATH targets hold several \boxed{} in odd places


def test_missing_file_and_malformed_row(tmp_path):
    t = get_task("gsm8k", tmp_path)
    # no gsm8k/ folder under the data root: the Hub is the fallback (offline here, so its one-line error)
    with pytest.raises(TaskError, match="could not load openai/gsm8k split test from the Hub"):
        t.load("test")
    (tmp_path / "gsm8k").mkdir()
    with pytest.raises(TaskError, match="data file not found: .*gsm8k/test.jsonl"):
        t.load("test")
    good = json.dumps({"question": "q", "answer": "x\n#### 3"})
    (tmp_path / "gsm8k" / "test.jsonl").write_text(good + "\n{not json\n")
    with pytest.raises(TaskError, match=r"test.jsonl:2: malformed JSON"):
        t.load("test")
    (tmp_path / "gsm8k" / "test.jsonl").write_text(good + "\n" + json.dumps({"question": "q", "answer": "no hashes"}))
    with pytest.raises(TaskError, match=r"test.jsonl:2: malformed row for task gsm8k"):
        t.load("test")
    with pytest.raises(TaskError, match="no split 'dev'"):
        t.load("dev")


def test_user_task_definition_without_code(tmp_path, monkeypatch):
    defs = tmp_path / "defs"
    defs.mkdir()
    (defs / "capitals.yaml").write_text(
        "name: capitals\nversion: 2\ndomain: knowledge\nprompt: 'Capital of {question}?'\nfilter: first_line\n"
        "metric: exact\nlocal: capitals\nsplits: {test: test}\nfields: {question: country, answer: capital}\n"
    )
    (tmp_path / "capitals").mkdir()
    (tmp_path / "capitals" / "test.jsonl").write_text(json.dumps({"country": "France", "capital": "Paris"}) + "\n")
    monkeypatch.setenv("MEMGEN_BENCH_TASKS", str(defs))
    from tasks import registry

    registry._definitions_cached.cache_clear()
    t = get_task("capitals", tmp_path)
    (e,) = t.load("test")
    assert t.version == "2" and t.prompt(e) == "Capital of France?\n"
    assert t.score("Paris.", e) == 1.0 and t.score("Lyon", e) == 0.0


def test_synthetic_tasks_deterministic_disjoint_and_gold_scores():
    for name in ("arith", "reverse", "choice"):
        t = get_task(name)
        a, b = t.load("test"), t.load("test")
        assert a == b and len(a) >= 250
        train_q = {e.question for e in t.load("train")}
        assert not train_q & {e.question for e in a}
        assert all(t.score(e.target, e) == 1.0 for e in a)
        assert sum(t.score("Answer: 0", e) for e in a) < len(a) / 2


def test_chat_template_prompt():
    from harness.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    t = get_task("arith")
    p = t.prompt(t.load("test", limit=1)[0], tok)
    assert p.startswith("<|im_start|>") and p.endswith("<|im_start|>assistant\n")


def test_scoring_changes_bumped_the_versions():
    want = {"math": "2", "math500": "2", "gsm8k": "2", "aqua": "2", "gpqa": "2", "arc_challenge": "2", "choice": "3"}
    assert {name: get_task(name).version for name in want} == want
    assert get_task("choice").definition.filter == "choice"  # strict; `choice_lenient` is the old cascade


def test_until_cuts_the_completion_before_scoring(data_dir):
    t = get_task("gsm8k", data_dir)
    (e,) = t.load("test", limit=1)
    right = f"So the answer is \\boxed{{{e.answer}}}."
    invented = right + "\nQuestion: what is 1+1?\nAnswer: \\boxed{2}"  # the model goes on with a new question
    assert t.definition.until == ["Question:"]
    assert t.truncate(invented) == right + "\n" and t.score(invented, e) == 1.0
    assert t.explain(invented) == (e.answer, "boxed")


def test_choice_task_gold_and_echoed_options(data_dir):
    t = get_task("aqua", data_dir)
    ex = t.load("test", limit=20, seed=0)
    assert all(t.score(e.target, e) == 1.0 for e in ex)
    assert all(t.explain(e.target) == (e.answer, "boxed") for e in ex)
    # a completion that only echoes the option list ("A)21\nB)22...") scores 0 on every question, also on "A"
    echoes = [e.question.split("Options:\n", 1)[1] for e in ex]
    assert all(t.score(c, e) == 0.0 and t.explain(c) == (None, None) for c, e in zip(echoes, ex, strict=True))


def test_until_must_be_a_list(tmp_path, monkeypatch):
    from tasks import registry

    (tmp_path / "bad.yaml").write_text("name: bad\nversion: 1\ndomain: x\nprompt: '{question}'\nfilter: first_line\n"
                                       "metric: exact\nuntil: 'Question:'\n")
    with pytest.raises(TaskError, match="until must be a list"):
        registry.parse_definition(tmp_path / "bad.yaml")


def test_runner_stores_the_extracted_answer_and_rule():
    from harness.runner import evaluate

    class Scripted:  # a method that answers with fixed text: only the runner's bookkeeping is under test
        name = "scripted"

        def generate(self, task, examples, max_new_tokens):
            return ["The answer is (B).", "A. dog\nB. cat\nC. oak\nD. red", "B"][: len(examples)]

    t = get_task("choice")
    ex = t.load("test", limit=3)
    cell, samples = evaluate(Scripted(), t, ex, 8)
    assert [(s["extracted"], s["extract_rule"]) for s in samples] == [("B", "answer_statement"), (None, None),
                                                                     ("B", "bare_letter")]
    assert cell.n == 3 and cell.correct == sum(s["score"] for s in samples)
