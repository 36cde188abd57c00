"""The ``expel`` and ``awm`` methods with real (tiny or SmolLM2) models: per-stage memory snapshots, read-only
evaluation, resume through the runner, and honest storage of self-generated successes."""

import hashlib
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from harness.config import EvalConfig, RunConfig
from harness.methods import build_method
from harness.runner import run_method
from tasks.base import render_prompt
from tasks.registry import get_task


def _cfg(**options):
    return RunConfig(model="tiny-random", eval=EvalConfig(batch_size=8, max_new_tokens=6), method_options=options)


def _tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def test_expel_snapshot_is_unaffected_by_later_stages(tiny, tmp_path):
    lm = tiny()
    opts = {"store": "gold", "backend": "bm25", "k": 2, "insight_pairs": 1, "insight_tokens": 8}
    m = build_method("expel", lm, _cfg(expel=opts))
    arith, reverse = get_task("arith"), get_task("reverse")
    tests = arith.load("test", limit=3)
    stats = m.train_on_task(arith, arith.load("train", limit=5), 1)
    assert stats["memory_size"] == 5 and stats["memory_per_task"] == {"arith": 5}
    assert stats["probe_ms_per_query_batched"] > 0
    m.save(tmp_path / "stage1")
    snap = _tree_hash(tmp_path / "stage1")
    prompts1 = m.build_prompts(arith, tests)
    # Evaluation is read-only: the memory (usage clocks included) does not change.
    records = [dict(r) for r in m.memory.records]
    m.generate(arith, tests, 4)
    assert m.last_prompts == prompts1 and m.memory.records == records
    # Row-1 prompts carry two gold arith solutions as solved turns.
    assert prompts1[0].count("<|im_start|>assistant") == 3 and "Answer:" in prompts1[0]

    m.train_on_task(reverse, reverse.load("train", limit=4), 2)
    m.save(tmp_path / "stage2")
    assert len(m.memory) == 9
    assert _tree_hash(tmp_path / "stage1") == snap  # the stage-1 snapshot is untouched

    fresh = build_method("expel", lm, _cfg(expel=opts))
    fresh.load(tmp_path / "stage1")
    assert len(fresh.memory) == 5 and fresh.build_prompts(arith, tests) == prompts1


def test_empty_memory_gives_the_vanilla_prompt(tiny):
    lm = tiny()
    task = get_task("choice")
    ex = task.load("test", limit=2)
    for name in ("expel", "awm"):
        m = build_method(name, lm, _cfg(**{name: {"backend": "bm25"}}))
        assert m.build_prompts(task, ex) == [task.prompt(e, lm.tokenizer) for e in ex]
        assert m.build_prompts(task, ex)[0] == render_prompt(task.user_message(ex[0]), lm.tokenizer)


def test_awm_merges_identical_workflows_and_hides_example_values(tiny, tmp_path):
    lm = tiny()
    m = build_method("awm", lm, _cfg(awm={"store": "gold", "backend": "bm25", "k": 1}))
    reverse = get_task("reverse")
    train = reverse.load("train", limit=6)
    stats = m.train_on_task(reverse, train, 1)
    # Every reversal of five words abstracts to the same workflow, supported by all six examples.
    assert stats["memory_size"] == 1 and stats["workflows_induced"] == 1
    wf = m.memory.records[0]
    assert wf["workflow"] == "Answer: {v5} {v4} {v3} {v2} {v1}" and wf["support"] == 6
    assert wf["key"] == "Reverse the order of these words: {v1} {v2} {v3} {v4} {v5}"
    prompt = m.build_prompts(reverse, reverse.load("test", limit=1))[0]
    assert "Answer: {v5} {v4} {v3} {v2} {v1}" in prompt
    for word in train[0].question.split(":")[1].split():
        assert word not in wf["workflow"] + wf["key"]
    # A second stage with the same task merges into the existing workflow instead of duplicating it.
    m.train_on_task(reverse, reverse.load("train", limit=4, seed=1), 2)
    assert len(m.memory) == 1 and m.memory.records[0]["support"] == 10
    m.save(tmp_path / "s")
    again = build_method("awm", lm, _cfg(awm={"store": "gold", "backend": "bm25", "k": 1}))
    again.load(tmp_path / "s")
    assert again.memory.records == m.memory.records


def test_bad_option_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match=r"method_options.awm.induction='llm' is not valid"):
        build_method("awm", tiny(), _cfg(awm={"induction": "llm"}))
    with pytest.raises(ValueError, match=r"unknown config key.*method_options.expel.kk"):
        build_method("expel", tiny(), _cfg(expel={"kk": 3}))


@pytest.mark.slow
def test_runner_resume_reloads_the_stage_memory(tmp_path):
    """Kill-and-resume, simulated by deleting everything after stage 1: the resumed run equals the full one."""
    opts = {"store": "gold", "backend": "bm25", "k": 2, "insight_pairs": 1, "insight_tokens": 8}
    cfg = replace(_cfg(expel=opts), sequence="arith,reverse", limit=3, seed=3, methods=("expel",))
    full = tmp_path / "full"
    run_method("expel", cfg, full)
    part = tmp_path / "part"
    shutil.copytree(full, part)
    for stage in (2,):
        shutil.rmtree(part / "checkpoints" / f"stage{stage}")
        (part / "train" / f"stage{stage}.json").unlink()
        for p in [*(part / "cells").glob(f"r{stage}_*"), *(part / "samples").glob(f"r{stage}_*")]:
            p.unlink()
    for p in (part / "cells").glob("r1_*"):  # row 1 is re-evaluated from the reloaded stage-1 memory
        p.unlink()
    events = []
    run_method("expel", cfg, part, on_event=lambda kind, info: events.append((kind, info)))
    assert ("resume", {"method": "expel", "stage": 1}) in events
    for name in sorted(p.name for p in (full / "samples").glob("*.jsonl")):
        assert (part / "samples" / name).read_text() == (full / "samples" / name).read_text(), name
    assert (part / "matrix.csv").read_text() == (full / "matrix.csv").read_text()
    ck = full / "checkpoints"
    assert [len((ck / f"stage{i}" / "memory" / "records.jsonl").read_text().splitlines()) for i in (1, 2)] == [3, 6]
    row0 = (full / "samples" / "r0_arith.jsonl").read_text()
    row1 = (full / "samples" / "r1_arith.jsonl").read_text()
    assert "<|im_start|>assistant\\n" not in row0.split('"completion"')[0].split('"prompt"')[1][:-30]
    assert row1.count("Answer:") > row0.count("Answer:")  # row 1 prompts hold retrieved gold solutions


@pytest.mark.slow
def test_smollm2_self_memory_stores_only_scored_successes(smollm2, tmp_path):
    lm = smollm2()
    cfg = RunConfig(model="smollm2-135m", eval=EvalConfig(batch_size=8),
                    method_options={"expel": {"store": "self", "backend": "bm25", "retries": 1,
                                              "insight_pairs": 1, "insight_sets": 1, "insight_tokens": 24}})
    m = build_method("expel", lm, cfg)
    task = get_task("choice")
    train = task.load("train", limit=4)
    stats = m.train_on_task(task, train, 1)
    by_id = {f"choice/{e.id}": e for e in train}
    assert len(m.memory) == stats["solved_any_round"] >= stats["solved_zero_shot"]
    assert stats["attempts"] == 4 + (4 - stats["solved_zero_shot"])
    for r in m.memory.records:  # every stored trajectory is the model's own and passes the task's scorer
        assert r["source"] == "self" and task.score(r["turns"][-1]["content"], by_id[r["id"]]) == 1.0
    assert stats["insight_compare_calls"] == min(1, stats["pairs"])
    assert stats["insight_success_calls"] == min(1, stats["successes"] // 2)  # a set needs two successes
    assert len(stats["insight_replies"]) == stats["insight_calls"] >= stats["insight_parse_failures"]
    assert stats["generated_tokens"] == stats["generated_tokens_attempts"] + stats["generated_tokens_insights"]
    m.save(tmp_path / "s")
    assert (tmp_path / "s" / "memory_stats.json").exists() and (tmp_path / "s" / "insights.json").exists()


# -- the memory goes into the task's real message list ------------------------------------------------------------
class _Searcher:
    """Records the turn examples the search loop hands to a method and answers like a reader: search first, then
    answer with the first word of the first passage (real retrieval and scoring decide what happens)."""

    name = "searcher"

    def __init__(self):
        self.seen = []

    def generate(self, task, examples, max_new_tokens):
        self.seen.extend(examples)
        out = []
        for e in examples:
            info = [m["content"] for m in e.meta["messages"] if m["content"].startswith("<information>")]
            words = info[-1].split("Doc 1: ")[1].split() if info and "Doc 1: " in info[-1] else ["unknown"]
            out.append(f"<answer>{words[0]}</answer>" if info else f"<search>{e.question}</search>")
        return out


def _search_qa(tmp_path):
    import dataclasses
    import json

    from tasks.qa import OpenQATask
    from tasks.registry import definitions

    rows = [{"question": q, "question_id": f"q{i}", "answer": {"value": a, "aliases": [a], "normalized_aliases": []}}
            for i, (q, a) in enumerate([("Which city is the capital of France?", "Paris"),
                                        ("What is the chemical symbol for gold?", "Au")])]
    (tmp_path / "triviaqa").mkdir()
    (tmp_path / "triviaqa" / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "corpus.jsonl").write_text(json.dumps({"title": "Paris", "text": "capital city of France."}) + "\n")
    d = definitions()["triviaqa"]
    return OpenQATask(dataclasses.replace(d, options={**d.options, "corpus": "corpus.jsonl", "top_k": 1}), tmp_path)


def test_empty_memory_is_vanilla_on_search_qa_and_a_memory_keeps_the_search_turns(tiny, tmp_path):
    lm = tiny()
    task = _search_qa(tmp_path)
    rec = _Searcher()
    task.rollout(rec, task.load("test"), 16)
    later = [e for e in rec.seen if len(e.meta["messages"]) > 1]
    assert later and all(len(e.meta["messages"]) == 3 for e in later)  # question, search, information
    for name in ("expel", "awm"):  # (the vanilla method's prompt is task.prompt)
        m = build_method(name, lm, _cfg(**{name: {"backend": "bm25"}}))
        assert m.build_prompts(task, rec.seen) == [task.prompt(e, lm.tokenizer) for e in rec.seen]
    m = build_method("expel", lm, _cfg(expel={"backend": "bm25", "store": "gold", "insights": False, "k": 1}))
    m.train_on_task(task, task.load("test")[:1], 1)
    prompt = m.build_prompts(task, later[-1:])[0]
    assert "<information>" in prompt and "<search>" in prompt  # the episode's own turns are still there
    assert prompt.count("<|im_start|>assistant") == 3  # the stored solved turn, the search turn, the new turn
    assert prompt.index("<answer>Paris</answer>") < prompt.index("<information>\n")  # the shot comes first


def test_empty_memory_is_vanilla_on_textworld_express_and_history_survives(tiny):
    import shutil

    if shutil.which("java") is None:
        pytest.skip("textworld_express needs java on PATH (apt-get install default-jre-headless)")
    pytest.importorskip("textworld_express", reason="pip install textworld-express (scripts/setup.sh does)")
    lm = tiny()
    task = get_task("textworld_express")
    turns = task.load("train", limit=2, seed=0)
    assert any(len(e.meta["messages"]) > 2 for e in turns)  # system, goal, then earlier expert turns
    for name in ("expel", "awm"):
        m = build_method(name, lm, _cfg(**{name: {"backend": "bm25"}}))
        assert m.build_prompts(task, turns) == [task.prompt(e, lm.tokenizer) for e in turns]
    m = build_method("expel", lm, _cfg(expel={"backend": "bm25", "store": "gold", "insights": False, "k": 1,
                                              "max_memory_tokens": 4000}))
    stats = m.train_on_task(task, turns, 1)
    assert stats["memory_size"] == 2  # one record per expert episode (its last turn holds the whole history)
    e = max(turns, key=lambda x: len(x.meta["messages"]))
    prompt = m.build_prompts(task, [e])[0]
    assert prompt.startswith("<|im_start|>system\n" + task.options.system_prompt)
    for msg in e.meta["messages"][1:]:
        assert msg["content"] in prompt  # the conversation so far is kept, turn by turn
    assert prompt.count("<|im_start|>assistant") > sum(m["role"] == "assistant" for m in e.meta["messages"]) + 1


def test_self_memory_gives_up_when_nothing_succeeds_and_counts_tokens(tiny):
    lm = tiny()  # random weights: it solves no arith problem
    m = build_method("expel", lm, _cfg(expel={"backend": "bm25", "give_up_after": 4, "insight_pairs": 1}))
    task = get_task("arith")
    stats = m.train_on_task(task, task.load("train", limit=10), 1)
    assert stats["gave_up"] and stats["attempts"] == 4 and stats["attempts_cap"] == 4
    assert stats["solved_any_round"] == 0 and stats["memory_size"] == 0 and stats["examples_seen"] == 4
    assert 0 < stats["generated_tokens"] <= 4 * 6  # eval.max_new_tokens=6 per attempt
    a = build_method("awm", lm, _cfg(awm={"backend": "bm25", "give_up_after": 4}))
    stats = a.train_on_task(task, task.load("train", limit=10), 1)
    assert stats["gave_up"] and stats["attempts"] == 4 and stats["workflows_induced"] == 0


def test_task_scoped_retrieval_and_insights_stay_within_the_task(tiny):
    lm = tiny()
    opts = {"backend": "bm25", "store": "gold", "k": 2, "task_scoped": True, "insight_pairs": 1, "insight_sets": 1,
            "insight_tokens": 8}
    m = build_method("expel", lm, _cfg(expel=opts))
    arith, reverse = get_task("arith"), get_task("reverse")
    m.train_on_task(arith, arith.load("train", limit=3), 1)
    stats = m.train_on_task(reverse, reverse.load("train", limit=3), 2)
    assert set(m.insights) <= {"arith", "reverse"} and stats["insight_calls"] >= 1
    assert {"insight_parse_failures", "insight_ops_applied", "generated_tokens_insights"} <= set(stats)
    prompt = m.build_prompts(arith, arith.load("test", limit=1))[0]
    assert "Reverse the order" not in prompt and prompt.count("Compute") == 3  # 2 arith shots + the question
    unscoped = build_method("expel", lm, _cfg(expel={**opts, "task_scoped": False, "insights": False}))
    unscoped.memory = m.memory
    hits = unscoped.memory.search(["Reverse the order of these words: a b c d e"], 6)[0]
    assert {r["task"] for r, _ in hits} == {"arith", "reverse"}
