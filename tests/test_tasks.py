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
    with pytest.raises(TaskError, match="data file not found: .*gsm8k/test.jsonl"):
        t.load("test")
    (tmp_path / "gsm8k").mkdir()
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
