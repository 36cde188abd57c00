"""MemGen's RL stages wired into the ``memgen`` method (issue 4): weaver GRPO / SFT+GRPO, the trained trigger (LoRA
adapter on the shared base, or a head), their options, checkpoints and per-sample insertion records."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from harness.config import RunConfig, TrainConfig, apply_overrides, from_dict
from harness.memgen.options import MemGenOptions
from harness.memgen.trigger import TriggerRecorder, TriggerSchedule, decode_with, train_trigger
from harness.memgen.trigger_lm import TriggerLM, TriggerSession
from harness.memgen.weaver import MemGenModel
from harness.methods import build_method
from tasks.base import Example, render_prompt


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


# Delimiters that random tiny-model text hits often, so the trigger is really asked.
VOWELS = '["a","e","i","o","u","n","s","t"]'
SMALL = ["--set", "train.max_steps=1", "--set", "train.batch_size=2", "--set", "eval.max_new_tokens=8",
         "--set", "method_options.memgen.k_prompt=2", "--set", "method_options.memgen.k_infer=2",
         "--set", "method_options.memgen.grpo_group=2", "--set", "method_options.memgen.trigger_group=2",
         "--set", f"method_options.memgen.delimiters={VOWELS}"]


def _samples(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.parametrize(
    ("setting", "msg"),
    [
        ("weaver_train=dpo", "weaver_train='dpo': use one of sft, grpo, sft+grpo"),
        ("trigger=sometimes", "trigger='sometimes': use one of always, trained"),
        ("trigger_model=mlp", "trigger_model='mlp': use one of lora, head"),
        ("grpo_group=0", "grpo_group must be >= 1"),
        ("trigger_steps=-1", "trigger_steps must be >= 0"),
        ("trigger_threshold=1.5", "trigger_threshold must be in [0, 1]"),
        ("trigger_lam=-0.1", "trigger_lam must be >= 0"),
        ("grpo_temperature=0", "grpo_temperature must be > 0"),
        ("trigger_lr=0", "trigger_lr must be > 0"),
    ],
)
def test_bad_rl_option_is_one_clear_line(setting, msg):
    key, value = setting.split("=")
    with pytest.raises(ValueError, match="memgen option") as err:
        from_dict(MemGenOptions, {key: yaml.safe_load(value)}).check()
    assert msg in str(err.value) and "\n" not in str(err.value)


def test_lora_trigger_needs_the_shared_base():
    with pytest.raises(ValueError, match="trigger_model=lora shares the reasoner's base"):
        MemGenOptions(weaver_model="tiny-random", trigger="trained").check()
    MemGenOptions(weaver_model="tiny-random", trigger="trained", trigger_model="head").check()


def test_bad_rl_option_through_the_cli(tmp_path):
    r = cli("run", "--model", "tiny-random", "--sequence", "arith", "--methods", "memgen", "--limit", "2",
            "--set", "method_options.memgen.weaver_train=dpo", "--out", str(tmp_path))
    assert r.returncode == 2
    assert "weaver_train='dpo': use one of sft, grpo, sft+grpo" in r.stderr and "Traceback" not in r.stderr


def _mm(tiny) -> MemGenModel:
    torch.manual_seed(0)
    return MemGenModel(tiny(0), MemGenOptions(k_prompt=2, k_infer=2, max_insertions=4, lora_r=4))


def _prompts(mm: MemGenModel) -> list[list[int]]:
    tok = mm.tokenizer
    return [tok(render_prompt(q, tok), add_special_tokens=False).input_ids for q in ("Hi", "A longer question?", "x")]


def test_lora_trigger_leaves_reasoner_and_weaver_alone_and_recomputes_its_decisions(tiny):
    """Adding the trigger adapter (even with non-zero weights) changes neither the reasoner nor the weaver: always-
    insert generation is identical. The cached p(insert) at decoding equals the recomputed one."""
    mm = _mm(tiny)
    every = torch.ones(mm.lm_head.weight.shape[0], dtype=torch.bool)
    before = decode_with(mm, TriggerRecorder(None, policy="always"), _prompts(mm), 10, every)
    tl = TriggerLM(mm)
    torch.manual_seed(1)
    torch.nn.init.normal_(tl.head.out.weight, std=0.3)
    for p in tl.adapter_parameters():
        torch.nn.init.normal_(p, std=0.1)
    assert not any(p.requires_grad for p in tl.adapter_parameters())
    assert all(".default." in n for n, p in mm.peft.named_parameters() if p.requires_grad)
    assert decode_with(mm, TriggerRecorder(tl, policy="always"), _prompts(mm), 10, every) == before
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    query = TriggerSession.query

    def spy(self):
        out = query(self)
        seen.append(out)
        return out

    rec = TriggerRecorder(tl, policy="sample", generator=torch.Generator().manual_seed(0))
    TriggerSession.query = spy  # type: ignore[method-assign]
    try:
        decode_with(mm, rec, _prompts(mm), 10, every)
    finally:
        TriggerSession.query = query  # type: ignore[method-assign]
    asked, inserted = rec.counts(3)
    assert min(asked) > 0 and 0 < sum(inserted) < sum(asked)
    tl.set_adapter_trainable(True)
    logits, dec, mask = rec.decision_logits(3)  # (B, J, 2)
    p_cached = rec._layout(3, [p[r] for (p, _), r in zip(seen, rec.rows, strict=True)], torch.tensor(0.0))
    torch.testing.assert_close(torch.softmax(logits, -1)[..., 1] * mask, p_cached * mask, atol=1e-5, rtol=0)
    logits.sum().backward()
    assert all(p.grad is not None for p in tl.parameters_to_train())


class ConstantTask:
    name, version, domain, max_new_tokens = "constant", "1", "test", 8

    def load(self, split: str, limit: int | None = None, seed: int = 0) -> list[Example]:
        return [Example(id=f"c{i}", question=f"Say anything ({i}).", answer="", target="ok") for i in range(limit or 4)]

    def prompt(self, example: Example, tokenizer=None) -> str:
        return render_prompt(example.question, tokenizer)

    def extract(self, completion: str) -> str | None:
        return completion

    def score(self, completion: str, example: Example) -> float:
        return 1.0


def test_lora_trigger_training_changes_only_the_trigger(tiny):
    mm = _mm(tiny)
    tl = TriggerLM(mm)
    reasoner = {k: v.clone() for k, v in mm.reasoner_state().items()}
    weaver = {n: p.detach().clone() for n, p in mm.peft.named_parameters() if ".default." in n}
    heads = [p.detach().clone() for p in mm.heads.parameters()]
    trig = [p.detach().clone() for p in tl.parameters_to_train()]
    task = ConstantTask()  # constant reward: only the sparsity penalty separates rollouts
    sch = TriggerSchedule(steps=2, prompts_per_step=1, group=4, lr=1e-2, max_new_tokens=8, lam=1.0)
    stats = train_trigger(mm, tl, task, task.load("train"), torch.ones(mm.lm_head.weight.shape[0], dtype=torch.bool),
                          sch)
    assert all(torch.isfinite(torch.tensor(stats["losses"])))
    after = mm.reasoner_state()
    assert all(torch.equal(reasoner[k], after[k]) for k in reasoner)
    assert all(torch.equal(weaver[n], p) for n, p in mm.peft.named_parameters() if n in weaver)
    assert all(torch.equal(a, b) for a, b in zip(heads, mm.heads.parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(trig, tl.parameters_to_train(), strict=True))
    assert not any(p.requires_grad for p in tl.adapter_parameters())


def _cfg(tmp_path, *sets: str) -> RunConfig:
    cfg = RunConfig(model="tiny-random", sequence="arith", limit=3, out=str(tmp_path),
                    train=TrainConfig(max_steps=1, batch_size=2, lr=1e-3))
    return apply_overrides(cfg, ["method_options.memgen.k_prompt=2", "method_options.memgen.k_infer=2",
                                 "method_options.memgen.grpo_group=2", "method_options.memgen.trigger_group=2",
                                 f"method_options.memgen.delimiters={VOWELS}", "eval.max_new_tokens=8", *sets])


@pytest.mark.parametrize("model", ["lora", "head"])
def test_trained_trigger_checkpoint_round_trip(tiny, tmp_path, model):
    """Weaver SFT+GRPO then the trigger; the reasoner is bit-identical; a reloaded checkpoint generates the same
    text with the same insertion records."""
    from tasks.registry import get_task

    cfg = _cfg(tmp_path, "method_options.memgen.weaver_train=sft+grpo", "method_options.memgen.trigger=trained",
               f"method_options.memgen.trigger_model={model}", "method_options.memgen.trigger_lr=0.5")
    method = build_method("memgen", tiny(), cfg)
    reasoner = {k: v.clone() for k, v in method.mm.reasoner_state().items()}
    task = get_task("arith")
    test = task.load("test", limit=3)
    stats = method.train_on_task(task, task.load("train", limit=4), stage=1)
    assert len(stats["losses"]) == 1 and len(stats["grpo"]["rewards"]) == 1
    assert stats["trigger"]["model"] == model and len(stats["trigger"]["insert_rate"]) == 1
    after = method.mm.reasoner_state()
    assert all(torch.equal(reasoner[k], after[k]) for k in reasoner)
    out = method.generate(task, test, 8)
    records = method.last_records
    assert [r["insertions"] for r in records] == method.last_insertions
    assert all(r["trigger_inserted"] == len(r["insertions"]) - 1 <= r["trigger_queried"] for r in records)
    assert sum(r["trigger_queried"] for r in records) > 0
    method.save(tmp_path / "ckpt")
    other = build_method("memgen", tiny(), cfg)
    other.load(tmp_path / "ckpt")
    assert other.trigger_trained and other.generate(task, test, 8) == out and other.last_records == records
    # trigger=always on the same checkpoint (the always-insert ablation) inserts at every queried delimiter
    always = build_method("memgen", tiny(), apply_overrides(cfg, ["method_options.memgen.trigger=always"]))
    always.load(tmp_path / "ckpt")
    always.generate(task, test, 8)
    assert all(r["trigger_inserted"] == r["trigger_queried"] for r in always.last_records)


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["weaver_train=grpo", "weaver_train=sft+grpo,trigger=trained"])
def test_rl_runs_through_the_cli_eval_and_plots(tmp_path, setting):
    out = tmp_path / "runs"
    sets = [x for kv in setting.split(",") for x in ("--set", f"method_options.memgen.{kv}")]
    r = cli("run", "--model", "tiny-random", "--sequence", "arith,reverse", "--methods", "memgen", "--limit", "2",
            *SMALL, *sets, "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    run = out / "memgen"
    train = json.loads((run / "train" / "stage2.json").read_text())
    assert len(train["grpo"]["rewards"]) == 1 and ("losses" in train) == ("sft" in setting)
    assert ("trigger" in train) == ("trigger=trained" in setting)
    # progress lines (stderr is no terminal here) name each phase that ran
    printed = " ".join(r.stderr.split())
    for phase, ran in (("weaver-sft", "sft" in setting), ("weaver-grpo", True), ("trigger", "trigger=trained" in setting)):
        assert (f"memgen train reverse {phase} step 1/" in printed) == ran, phase
    samples = _samples(run / "samples" / "r2_arith.jsonl")
    assert all({"insertions", "trigger_queried", "trigger_inserted"} <= s.keys() for s in samples)
    assert sum(s["trigger_queried"] for s in samples) > 0
    ev = cli("eval", "--task", "arith", "--method", "memgen", "--model", "tiny-random", "--limit", "2", *SMALL, *sets,
             "--checkpoint", str(run / "checkpoints" / "stage2"), "--out", str(tmp_path / "ev"))
    assert ev.returncode == 0, ev.stderr[-3000:]
    again = _samples(tmp_path / "ev" / "arith.samples.jsonl")
    assert [s["completion"] for s in again] == [s["completion"] for s in samples]
    rep = cli("report", str(out), "--ci", "--plots", "--out", str(tmp_path / "report"))
    assert rep.returncode == 0, rep.stderr[-3000:]
    assert (tmp_path / "report" / "plots" / "trigger_rate.png").exists()
    if "trigger=trained" in setting:
        _check_trigger_ablation(run, tmp_path / "ablation.json")


def _check_trigger_ablation(run, path):
    """`trigger-ablation` re-evaluates each stage's checkpoint: its trigger column reproduces the run's diagonal
    cells and insertion rates; its always column inserts at every delimiter asked."""
    r = cli("trigger-ablation", str(run), "--out", str(path))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(path.read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert [x["task"] for x in rows] == summary["tasks"]
    for i, x in enumerate(rows, start=1):
        assert x["trigger_acc"] == pytest.approx(summary["matrix"][i][i - 1])
        samples = _samples(run / "samples" / f"r{i}_{x['task']}.jsonl")
        asked = sum(s["trigger_queried"] for s in samples)
        assert x["trigger_ins_per_sample"] == pytest.approx(sum(s["trigger_inserted"] for s in samples) / len(samples))
        if asked:
            assert x["trigger_rate"] == pytest.approx(100 * sum(s["trigger_inserted"] for s in samples) / asked)
        assert x["always_rate"] == pytest.approx(100.0)
    bad = cli("trigger-ablation", str(run.parent / "nope"))
    assert bad.returncode != 0 and "not a run directory" in bad.stderr


def test_sharded_evaluation_keeps_records_with_their_samples(monkeypatch):
    """Two emulated processes: each shard's records come back aligned with its samples."""
    import harness.runner as runner
    from harness.distributed import merge_shards, shard_indices

    def two_shards(fn, items):
        gathered = []
        for rank in range(2):
            idx = shard_indices(len(items), rank, 2)
            gathered.append(list(zip(idx, fn([items[i] for i in idx]), strict=True)))
        return merge_shards(gathered, len(items))

    class Echo:
        name = "echo"

        def generate(self, task, examples, max_new_tokens):
            self.last_records = [{"trigger_queried": 2, "trigger_inserted": int(e.id[1:]) % 2, "insertions": [0]}
                                 for e in examples]
            return [e.id for e in examples]

    monkeypatch.setattr(runner, "map_sharded", two_shards)
    task = ConstantTask()
    _, samples = runner.evaluate(Echo(), task, task.load("test", limit=5), 4)
    assert [s["completion"] for s in samples] == [f"c{i}" for i in range(5)]
    assert [s["trigger_inserted"] for s in samples] == [i % 2 for i in range(5)]
