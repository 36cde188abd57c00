"""Training budgets (harness/budget.py): per-stage records, their sums in summary.json and the report's table;
SFT's budget-related options (MLP LoRA targets, max_length that never cuts a target the task could generate)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from harness.budget import BUDGET_KEYS, StageMeter, distinct_draws, run_budget, stage_budget
from harness.config import RunConfig, TrainConfig, apply_overrides
from harness.training import tokenize_prompt_target
from tasks.base import Example, render_prompt


def test_distinct_draws_counts_passes_without_replacement():
    assert distinct_draws(256, 96) == 96  # GRPO: 96 steps x 1 prompt
    assert distinct_draws(256, 96 * 8) == 256  # SFT / REINFORCE++: 768 draws cover the pool
    assert distinct_draws(5, 0) == 0


def test_stage_and_run_budget_hand_values():
    measured = {"wall_seconds": 2.5, "peak_memory_mb": 900.0, "peak_memory_kind": "rss"}
    s1 = stage_budget({"examples_seen": 8, "optimizer_steps": 2, "train_tokens": 300, "generated_tokens": 40,
                       "trainable_params": 1000, "losses": [1.0]}, measured)
    s2 = stage_budget({"examples_seen": 6, "optimizer_steps": 2, "train_tokens": 200, "generated_tokens": 10,
                       "trainable_params": 1000, "budget_notes": "attempts every train problem"},
                      {**measured, "wall_seconds": 1.5, "peak_memory_mb": 1200.0})
    assert set(s1) == {*BUDGET_KEYS, "peak_memory_kind"} and "losses" not in s1
    total = run_budget([s1, s2])
    assert (total["examples_seen"], total["optimizer_steps"], total["train_tokens"], total["generated_tokens"]) == (
        14, 4, 500, 50)
    assert total["wall_seconds"] == pytest.approx(4.0)
    assert total["trainable_params"] == 1000 and total["peak_memory_mb"] == 1200.0  # sizes: the maximum
    assert total["stages"] == 2 and total["budget_notes"] == "attempts every train problem"
    # a quantity a method does not record is None ("not recorded"), never 0; a method that never trains gets 0
    partial = run_budget([s1, stage_budget({"examples_seen": 3}, measured)])
    assert partial["examples_seen"] == 11 and partial["train_tokens"] is None
    vanilla = stage_budget({"trained": False}, measured, trains=False)
    assert vanilla["optimizer_steps"] == 0 and vanilla["trainable_params"] == 0
    assert run_budget([])["optimizer_steps"] == 0


def test_stage_meter_sees_this_stages_peak():
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, allocated before the stage: not this stage's peak...
    del big
    with StageMeter("cpu") as m:
        x = torch.ones(128 * 2**20 // 4)  # ...128 MiB inside it is
        x += 1
    r = m.result()
    assert r["wall_seconds"] > 0 and r["peak_memory_kind"] in ("rss", "rss_process_max")
    assert r["peak_memory_mb"] > 128


def test_max_length_never_cuts_a_target_the_task_can_generate(tiny):
    tok = tiny(0).tokenizer
    prompt = render_prompt("Write a long function.", tok)
    target = " ".join(f"x{i} = {i}" for i in range(40))
    n_p, n_t = len(tok(prompt, add_special_tokens=False).input_ids), len(tok(target, add_special_tokens=False).input_ids)
    cut = tokenize_prompt_target(tok, prompt, target, max_length=n_p + 5)  # the old behaviour: cut to 5 tokens
    assert len(cut["input_ids"]) == n_p + 5
    kept = tokenize_prompt_target(tok, prompt, target, max_length=n_p + 5, target_budget=n_t)
    assert len(kept["input_ids"]) == n_p + n_t + 1 and kept["labels"][-1] == tok.eos_token_id
    over = tokenize_prompt_target(tok, prompt, target, max_length=n_p + 5, target_budget=10)  # budget < target
    assert len(over["input_ids"]) == n_p + 11


class LongTargets:
    """A real task whose targets are longer than train.max_length but within its generation budget."""

    name, version, domain, max_new_tokens = "long", "1", "test", 96

    def load(self, split: str, limit: int | None = None, seed: int = 0) -> list[Example]:
        return [Example(id=f"t{i}", question=f"Count to {i}.", answer="", target=" ".join(map(str, range(30 + i))))
                for i in range(limit or 4)]

    def prompt(self, example: Example, tokenizer=None) -> str:
        return render_prompt(example.question, tokenizer)

    def extract(self, completion: str) -> str | None:
        return completion

    def score(self, completion: str, example: Example) -> float:
        return float(completion.strip() == example.target)


@pytest.mark.slow
def test_sft_all_linear_targets_and_budget(tiny):
    from baselines.sft import SFT

    cfg = RunConfig(model="tiny-random", train=TrainConfig(max_steps=2, batch_size=2, max_length=24,
                                                          lora_targets=("all-linear",), warmup_ratio=0.0))
    method = SFT(tiny(0), cfg, {})
    names = [n for n, p in method.model.named_parameters() if p.requires_grad]
    assert any("mlp.down_proj.lora_A" in n for n in names) and any("self_attn.q_proj.lora_B" in n for n in names)
    assert not any("lm_head" in n for n in names)
    stats = method.train_on_task(LongTargets(), LongTargets().load("train", limit=3), stage=1)
    assert stats["truncated_targets"] == 0  # 24 tokens would cut every target; the task's budget keeps them
    assert stats["optimizer_steps"] == 2 and stats["examples_seen"] == 3  # 2 steps x 2 over 3 examples
    assert stats["train_tokens"] > 2 * 2 * 24 and stats["generated_tokens"] == 0
    assert stats["trainable_params"] == sum(p.numel() for p in method.model.parameters() if p.requires_grad)


@pytest.mark.slow
def test_runner_sums_budgets_and_report_prints_them(tmp_path):
    from harness.analysis.budget import budget_table
    from harness.cli import app
    from harness.runner import run_method
    from harness.store import read_json

    cfg = apply_overrides(RunConfig(), ["model=tiny-random", "sequence=arith,choice", "limit=3", "train.max_steps=2",
                                        "train.batch_size=2", "eval.max_new_tokens=4"])
    for method in ("vanilla", "sft"):
        run_method(method, cfg, tmp_path / method)
    sft, vanilla = read_json(tmp_path / "sft" / "summary.json"), read_json(tmp_path / "vanilla" / "summary.json")
    stage1 = read_json(tmp_path / "sft" / "train" / "stage1.json")["budget"]
    b = sft["budget"]
    assert b["stages"] == 2 and b["optimizer_steps"] == 4 and b["examples_seen"] == 3 + 3
    assert b["train_tokens"] > stage1["train_tokens"] > 0 and b["generated_tokens"] == 0
    assert b["wall_seconds"] >= stage1["wall_seconds"] > 0 and b["peak_memory_mb"] > 0
    assert vanilla["budget"]["optimizer_steps"] == 0 and vanilla["budget"]["trainable_params"] == 0
    partial = tmp_path / "memgen"  # an unfinished run (as a sweep leaves it mid-way): left out, as in the metrics
    partial.mkdir()
    (partial / "summary.json").write_text(json.dumps({**sft, "method": "memgen", "complete": False}))
    table = budget_table([tmp_path])
    assert list(table["method"]) == ["sft", "vanilla"] and list(table["steps"]) == [4, 0]
    r = CliRunner().invoke(app, ["report", str(tmp_path)], catch_exceptions=False)
    assert r.exit_code == 0 and "Training budget (per run)" in r.output and "train tok" in r.output
    r = CliRunner().invoke(app, ["report", str(tmp_path), "--ci", "--resamples", "20", "--out", str(tmp_path / "rep")],
                           catch_exceptions=False)
    assert r.exit_code == 0 and "mean per method over runs" in r.output
    assert (tmp_path / "rep" / "budget.csv").read_text().startswith("method,runs,stages,examples")
