"""The paper-replication profiles under configs/paper/ resolve to the paper's settings (../shared/MEMGEN.md).

The expected values live in this test, not in the profiles: a silent change of a default, of a profile or of a
task definition's per-task MemGen settings fails it."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.config import RunConfig, from_dict, load_yaml
from harness.memgen.options import MemGenOptions

PROFILES = Path(__file__).resolve().parent.parent / "configs" / "paper"

# Shared by every profile: the paper's training and evaluation settings.
COMMON = {
    "dtype": "bf16",
    "chat_template": "chatml",
    "train.lr": 1e-5,
    "train.epochs": 2.0,
    "train.max_steps": 0,
    "train.warmup_ratio": 0.1,
    "train.scheduler": "cosine",
    "train.max_length": 1024,
    "train.train_limit": None,
    "eval.limit": None,
    "eval.max_new_tokens": 1024,
    "memgen.lr": 1e-5,
    "memgen.max_insertions": 5,
    "memgen.lora_r": 16,
    "memgen.lora_alpha": 32,
    "memgen.lora_dropout": 0.1,
    "memgen.lora_targets": ("q_proj", "v_proj"),
    "memgen.delimiters": (",", ".", "\n"),
}
RL = {
    "memgen.weaver_train": "sft+grpo",
    "memgen.grpo_group": 8,
    "memgen.grpo_prompts_per_step": 1,
    "memgen.grpo_lr": 1e-5,
    "memgen.grpo_temperature": 1.0,
    "memgen.grpo_aggregation": "sequence",
    "memgen.grpo_scale": "group",
    "memgen.trigger": "trained",
    "memgen.trigger_group": 8,
    "memgen.trigger_lr": None,  # = train.lr (1e-5); gsm8k_paper sets 1e-6
    "memgen.trigger_aggregation": "token",
    "memgen.trigger_prompt": True,
    "memgen.trigger_train_fraction": 0.3333,
}
EXPECTED = {
    "cl.yaml": {**COMMON, "model": "Qwen/Qwen2.5-1.5B-Instruct", "sequence": "aqua,gpqa,gsm8k_paper,kodcode",
                "methods": ("vanilla", "sft", "expel", "memgen"), "memgen.k_prompt": 8, "memgen.k_infer": 8,
                "memgen.weaver_train": "sft", "memgen.trigger": "always"},
    "main.yaml": {**COMMON, **RL, "model": "Qwen/Qwen2.5-1.5B-Instruct", "sequence": "gsm8k_paper",
                  "memgen.k_prompt": 8, "memgen.k_infer": 8},
    "main_smollm3.yaml": {**COMMON, **RL, "model": "HuggingFaceTB/SmolLM3-3B", "sequence": "gsm8k_paper",
                          "memgen.k_prompt": 4, "memgen.k_infer": 4},
}
# What gsm8k_paper sets for MemGen on GSM8K (the public code's GSM8K scripts).
GSM8K_PAPER = {"max_insertions": 3, "grpo_aggregation": "token", "trigger_lr": 1e-6}


def _resolve(path: Path) -> tuple[RunConfig, MemGenOptions]:
    cfg = from_dict(RunConfig, load_yaml(path))
    opts = from_dict(MemGenOptions, dict(cfg.method_options["memgen"])).check()
    return cfg, opts


def _value(cfg: RunConfig, opts: MemGenOptions, key: str):
    obj: object = cfg
    if key.startswith("memgen."):
        obj, key = opts, key.removeprefix("memgen.")
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def test_every_profile_is_in_the_table():
    assert sorted(p.name for p in PROFILES.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_profile_resolves_to_the_paper_settings(name):
    cfg, opts = _resolve(PROFILES / name)
    wrong = {k: (_value(cfg, opts, k), v) for k, v in EXPECTED[name].items() if _value(cfg, opts, k) != v}
    assert not wrong, f"{name}: (resolved, expected) differ: {wrong}"
    header = (PROFILES / name).read_text().split("\n", 1)[0]
    assert header.startswith("#") and "paper" in (PROFILES / name).read_text().lower()
    assert "departs" in (PROFILES / name).read_text() or name == "main_smollm3.yaml"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_profile_per_task_settings_on_gsm8k(name, data_dir):
    from tasks.registry import get_task

    cfg, opts = _resolve(PROFILES / name)
    task = get_task("gsm8k_paper", data_dir)
    # the profiles leave these to the task definitions, so the GSM8K values apply (options a run sets win)
    per_task = opts.for_task(task.definition.method_defaults["memgen"], set(cfg.method_options["memgen"]))
    assert {k: getattr(per_task, k) for k in GSM8K_PAPER} == GSM8K_PAPER
    # the profile's own values stay in force on the other tasks
    assert opts.max_insertions == 5
