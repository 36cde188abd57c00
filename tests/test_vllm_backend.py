"""The vLLM generation backend (harness/vllm_backend.py).

The first tests need no vllm (config, routing, the report's warning). Those marked ``vllm`` run in .venv-vllm
(``bash scripts/setup.sh --vllm``; ``OMP_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=2 .venv-vllm/bin/python -m pytest -q
-m vllm tests/test_vllm_backend.py``) with SmolLM2-135M on CPU, and are skipped where vllm is not installed. They
print the agreement and every mismatch between the backends (``-s`` shows them).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from harness.config import ConfigError, RunConfig, apply_overrides
from harness.vllm_backend import VLLM_METHODS, fallback_note, method_backend, mixed_backend_warning

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def vllm_test(fn):
    """Marked ``vllm`` (and ``slow``), skipped with the reason where vllm is not installed."""
    skip = pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed here: run in .venv-vllm "
                              "(bash scripts/setup.sh --vllm)")
    return pytest.mark.vllm(pytest.mark.slow(skip(fn)))


os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB of KV cache: plenty for 135M at batch 32, small machine


def test_backend_config_and_routing():
    cfg = apply_overrides(RunConfig(), ["eval.backend=vllm", "eval.vllm_args.max_model_len=2048"])
    assert cfg.eval.backend == "vllm" and cfg.eval.vllm_args == {"max_model_len": 2048}
    assert RunConfig().eval.backend == "hf"
    with pytest.raises(ConfigError, match="eval.backend 'tgi'"):
        apply_overrides(RunConfig(), ["eval.backend=tgi"])
    assert [method_backend(m, cfg) for m in VLLM_METHODS] == ["vllm"] * len(VLLM_METHODS)
    assert method_backend("memgen", cfg) == "hf"  # its own decoding loop
    assert fallback_note("memgen", cfg).startswith("note: memgen keeps its own hf decoding loop")
    assert fallback_note("sft", cfg) is None and fallback_note("memgen", RunConfig()) is None


@pytest.mark.skipif(HAS_VLLM, reason="checks the error shown where vllm is missing")
def test_vllm_backend_without_vllm_is_a_one_line_error(tiny):
    from harness.vllm_backend import use_backend

    cfg = apply_overrides(RunConfig(), ["model=tiny-random", "eval.backend=vllm"])
    with pytest.raises(ConfigError, match="setup.sh --vllm"):
        use_backend("vanilla", tiny(0), cfg)


def _fake_run(root: Path, name: str, backend: str | None) -> None:
    run = root / name
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"method": name, "complete": False}))
    (run / "meta.json").write_text(json.dumps({} if backend is None else {"backend": backend}))


def test_report_warns_when_runs_used_different_backends(tmp_path):
    _fake_run(tmp_path / "a", "sft", "vllm")
    _fake_run(tmp_path / "a", "vanilla", "vllm")
    assert mixed_backend_warning([tmp_path / "a"]) is None
    _fake_run(tmp_path / "b", "sft", None)  # recorded before backends existed: hf
    warning = mixed_backend_warning([tmp_path])
    assert warning is not None and "hf: 1 run(s)" in warning and "vllm: 2 run(s)" in warning


# -- with vllm (.venv-vllm) -------------------------------------------------------------------------------------


def _quick_examples(n: int = 32):
    from tasks.registry import get_task

    tasks = [get_task(t) for t in ("arith", "reverse", "choice")]
    per = [n // 3 + (i < n % 3) for i in range(3)]  # 11 / 11 / 10
    return [(t, e) for t, k in zip(tasks, per, strict=True) for e in t.load("test", limit=k, seed=0)]


def _vllm_cfg(**train):
    from harness.config import TrainConfig

    return RunConfig(model="smollm2-135m", train=TrainConfig(**train), eval=apply_overrides(
        RunConfig(), ["eval.backend=vllm"]).eval)


def _compare(label: str, hf: list[str], vl: list[str], items) -> tuple[int, float, float]:
    same = sum(a == b for a, b in zip(hf, vl, strict=True))
    s_hf = 100 * sum(t.score(c, e) for c, (t, e) in zip(hf, items, strict=True)) / len(items)
    s_vl = 100 * sum(t.score(c, e) for c, (t, e) in zip(vl, items, strict=True)) / len(items)
    print(f"\n{label}: identical {same}/{len(items)}; accuracy hf {s_hf:.2f} vllm {s_vl:.2f}")
    for (t, e), a, b in zip(items, hf, vl, strict=True):
        if a != b:
            print(f"  mismatch {t.name}/{e.id}:\n    hf:   {a!r}\n    vllm: {b!r}")
    return same, s_hf, s_vl


def _generate_all(method, items, budget_of=lambda t: t.max_new_tokens):
    out: list[str] = []
    for t in dict.fromkeys(t for t, _ in items):
        out += method.generate(t, [e for tt, e in items if tt is t], budget_of(t))
    return out


@vllm_test
def test_greedy_completions_match_hf_on_quick(smollm2):
    from baselines.vanilla import Vanilla
    from harness.generation import set_greedy_backend
    from harness.vllm_backend import use_backend

    items = _quick_examples(32)
    lm, cfg = smollm2(), _vllm_cfg()
    method = Vanilla(lm, cfg, {})
    set_greedy_backend(None)
    hf = _generate_all(method, items)
    assert use_backend("vanilla", lm, cfg) == "vllm"
    vl = _generate_all(method, items)
    same, s_hf, s_vl = _compare("vanilla greedy, 32 quick prompts", hf, vl, items)
    assert same >= 30 and abs(s_hf - s_vl) <= 2.0


@vllm_test
def test_sft_lora_stage_through_vllm_equals_the_hf_cell(tmp_path, smollm2):
    """A real run (runner, one engine, the stage's adapter swapped in as a LoRARequest) against the same checkpoint
    evaluated by transformers."""
    from baselines.sft import SFT
    from harness import vllm_backend
    from harness.generation import set_greedy_backend
    from harness.runner import run_method
    from harness.store import read_json
    from tasks.registry import get_task

    cfg = apply_overrides(RunConfig(), ["model=smollm2-135m", "sequence=arith", "limit=32", "train.max_steps=8",
                                        "eval.backend=vllm", "methods=sft"])
    before = vllm_backend._ENGINES.get(vllm_backend._engine_key(cfg))
    run_method("sft", cfg, tmp_path / "sft")
    engine = vllm_backend._ACTIVE
    assert engine is not None and (before is None or engine is before)  # built once, reused
    assert engine._lora_id >= 2  # the untrained adapter for row 0, the trained one for row 1: swapped, not rebuilt
    cell = read_json(tmp_path / "sft" / "cells" / "r1_arith.json")
    assert cell["backend"] == "vllm" and read_json(tmp_path / "sft" / "meta.json")["backend"] == "vllm"
    samples = [json.loads(x) for x in (tmp_path / "sft" / "samples" / "r1_arith.jsonl").read_text().splitlines()]

    set_greedy_backend(None)  # transformers from here on
    hf_cfg = apply_overrides(cfg, ["eval.backend=hf"])
    method = SFT(smollm2(), hf_cfg, {})
    method.load(tmp_path / "sft" / "checkpoints" / "stage1")
    task = get_task("arith")
    examples = task.load("test", limit=32, seed=0)
    assert [e.id for e in examples] == [s["id"] for s in samples]
    hf = method.generate(task, examples, task.max_new_tokens)
    same, s_hf, s_vl = _compare("sft stage 1 (arith, 8 LoRA steps), 32 prompts", hf,
                                [s["completion"] for s in samples], [(task, e) for e in examples])
    assert s_vl == pytest.approx(cell["accuracy"])
    assert same >= 30 and abs(s_hf - s_vl) <= 2.0


@vllm_test
def test_grpo_three_steps_through_trls_vllm_colocate_path(smollm2):
    from baselines.grpo import GRPO, grpo_config, parse_options
    from tasks.registry import get_task

    cfg = apply_overrides(RunConfig(), ["model=smollm2-135m", "train.max_steps=3", "eval.backend=vllm"])
    opts = {"num_generations": 2, "prompts_per_step": 2, "max_completion_length": 16}
    args = grpo_config(cfg, parse_options(opts), 0, 3, 16)
    assert args.use_vllm and args.vllm_mode == "colocate"
    method = GRPO(smollm2(), cfg, opts)
    task = get_task("choice")
    stats = method.train_on_task(task, task.load("train", limit=8, seed=0), stage=1)
    assert stats["optimizer_steps"] == 3 and len(stats["rewards"]) == 3


@vllm_test
def test_reinforce_pp_rollouts_through_the_engine(smollm2):
    from baselines.reinforce_pp import ReinforcePP
    from harness import vllm_backend
    from tasks.registry import get_task

    cfg = apply_overrides(RunConfig(), ["model=smollm2-135m", "train.max_steps=2", "eval.backend=vllm"])
    lm = smollm2()
    method = ReinforcePP(lm, cfg, {"prompts_per_step": 2, "samples_per_prompt": 2, "max_completion_length": 16})
    assert vllm_backend.use_backend("reinforce_pp", lm, cfg) == "vllm"
    task = get_task("choice")
    prompts = [task.prompt(e, lm.tokenizer) for e in task.load("train", limit=2, seed=0)]
    r = method.rollout(prompts, 2, 16)
    assert r.input_ids.shape[0] == 4 and r.completion_mask.sum() > 0
    assert r.attention_mask.shape == r.input_ids.shape
    stats = method.train_on_task(task, task.load("train", limit=8, seed=0), stage=1)
    assert stats["optimizer_steps"] == 2 and stats["generated_tokens"] > 0
