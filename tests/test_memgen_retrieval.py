"""MemGen with retrieval (issue 5): the weaver reads retrieved gold solutions, the reasoner's prompt is unchanged,
SFT retrieval excludes the example itself, the store is snapshotted with the checkpoint, and a run goes end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from harness.config import RunConfig, TrainConfig, apply_overrides
from harness.memgen.weaver import MemGenModel
from harness.methods import build_method
from tasks.registry import get_task


def _cfg(tmp_path, *sets: str) -> RunConfig:
    cfg = RunConfig(model="tiny-random", sequence="arith,choice", limit=6, out=str(tmp_path),
                    train=TrainConfig(max_steps=1, batch_size=3, lr=1e-3))
    return apply_overrides(cfg, ["method_options.memgen.k_prompt=2", "method_options.memgen.k_infer=2",
                                 "method_options.memgen.retrieval_backend=bm25", "eval.max_new_tokens=6", *sets])


def _record_widths(mm: MemGenModel) -> tuple[dict[str, list[int]], object]:
    """Input widths of every reasoner and weaver call (the shared base is one module: the adapter tells them apart)."""
    widths: dict[str, list[int]] = {"reasoner": [], "weaver": []}

    def hook(_mod, args, kwargs):
        role = "weaver" if getattr(mm, "_adapter_on", True) else "reasoner"
        widths[role].append(kwargs["inputs_embeds"].shape[1])

    return widths, mm.weaver.register_forward_pre_hook(hook, with_kwargs=True)


def test_weaver_reads_retrieved_text_and_the_reasoner_prompt_is_unchanged(tiny, tmp_path):
    task = get_task("arith")
    train, test = task.load("train", limit=6), task.load("test", limit=2)
    on = build_method("memgen", tiny(), _cfg(tmp_path, "method_options.memgen.retrieval_k=2",
                                             "method_options.memgen.insert_before_training=true"))
    off = build_method("memgen", tiny(), _cfg(tmp_path, "method_options.memgen.insert_before_training=true"))
    on.retrieval.add_task(task, train, stage=1)
    widths = {}
    for name, m in (("on", on), ("off", off)):
        widths[name], handle = _record_widths(m.mm)
        m.generate(task, test[:1], 4)
        handle.remove()
    assert on.last_prompts == off.last_prompts  # the reasoner's prompt stays as it is
    assert widths["on"]["reasoner"][0] == widths["off"]["reasoner"][0]  # its prompt chunk has the same length
    prefix = on.retrieval.prefixes(task, test[:1])[0]
    assert len(prefix) > 0 and on.retrieval.last_texts[0].startswith("Solved examples:")
    # the weaver's first input ([retrieved text ; reasoner states ; queries]) grew by exactly the retrieved text
    assert widths["on"]["weaver"][0] == widths["off"]["weaver"][0] + len(prefix)


def test_sft_retrieval_excludes_the_example_itself(tiny, tmp_path):
    task = get_task("arith")
    train = task.load("train", limit=6)
    m = build_method("memgen", tiny(), _cfg(tmp_path, "method_options.memgen.retrieval_k=6"))
    m.retrieval.add_task(task, train, stage=1)
    own = [f"arith/{e.id}" for e in train]
    with_self = m.retrieval.retrieve(task, train)  # k = the whole store: every row holds its own record
    assert all(len(row) == 6 and i in {r["id"] for r in row} for row, i in zip(with_self, own, strict=True))
    excl = m.retrieval.retrieve(task, train, exclude_self=True)
    assert all(len(row) == 5 and i not in {r["id"] for r in row} for row, i in zip(excl, own, strict=True))
    _, prefixes = m.weaver_context(task, train, train=True)
    assert prefixes is not None and all(e.target not in t for e, t in zip(train, m.retrieval.last_texts, strict=True))
    stats = m.train_on_task(task, train, stage=1)  # adds nothing new (already stored), trains with the prefixes
    assert stats["retrieval"]["memory_size"] == 6


def test_store_snapshot_round_trips_with_save_and_load(tiny, tmp_path):
    arith, choice = get_task("arith"), get_task("choice")
    cfg = _cfg(tmp_path, "method_options.memgen.retrieval_k=2")
    m = build_method("memgen", tiny(), cfg)
    m.train_on_task(arith, arith.load("train", limit=3), stage=1)
    m.save(tmp_path / "s1")
    test = arith.load("test", limit=2)
    first = m.generate(arith, test, 6)
    m.train_on_task(choice, choice.load("train", limit=3), stage=2)
    m.save(tmp_path / "s2")
    loaded = build_method("memgen", tiny(), cfg)
    loaded.load(tmp_path / "s1")
    assert len(loaded.retrieval.store) == 3 and {r["task"] for r in loaded.retrieval.store.records} == {"arith"}
    assert loaded.generate(arith, test, 6) == first
    loaded.load(tmp_path / "s2")
    assert len(loaded.retrieval.store) == 6
    plain = build_method("memgen", tiny(), _cfg(tmp_path))
    plain.save(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="retrieval_memory"):
        loaded.load(tmp_path / "plain")


def test_bad_retrieval_option_is_one_line(tiny, tmp_path):
    with pytest.raises(ValueError, match="retrieval_backend='faiss': use one of dense, bm25"):
        build_method("memgen", tiny(), _cfg(tmp_path, "method_options.memgen.retrieval_backend=faiss"))


def test_cli_run_memgen_with_retrieval(tmp_path):
    out = tmp_path / "runs"
    r = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--model", "tiny-random", "--sequence",
                        "arith,choice", "--methods", "memgen", "--limit", "2", "--set", "train.max_steps=1",
                        "--set", "method_options.memgen.retrieval_k=2", "--set", "method_options.memgen.k_prompt=2",
                        "--set", "method_options.memgen.k_infer=2", "--set", "eval.max_new_tokens=6",
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    ck = out / "memgen" / "checkpoints"
    tasks = [[json.loads(x)["task"] for x in (ck / s / "retrieval_memory" / "records.jsonl").read_text().splitlines()]
             for s in ("stage1", "stage2")]
    assert set(tasks[0]) == {"arith"} and set(tasks[1]) == {"arith", "choice"}  # stage 1's snapshot is untouched
    assert json.loads((out / "memgen" / "summary.json").read_text())["acc"] is not None
