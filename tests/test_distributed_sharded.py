"""Sharded training through the shipped accelerate config files: FSDP2 and DeepSpeed ZeRO-2/3, 2 gloo processes on
CPU.

Each test launches ``accelerate launch --config_file configs/accelerate/<x>_cpu.yaml -m harness.cli run`` over two
tasks with 3 prompts per task (uneven shards) and one prompt per generate call, so the processes make different
numbers of forwards: evaluation between tasks must run without collectives (``harness.sharded.gather_weights``).
The sync log proves that accelerate really sharded (it silently runs DDP on CPU otherwise), that both processes
trained and ended every task with identical weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.config import ConfigError
from harness.distributed import SYNC_LOG_ENV

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["run", "--model", "tiny-random", "--sequence", "arith,choice", "--limit", "3",
        "--set", "train.max_steps=2", "--set", "train.batch_size=2",
        "--set", "eval.max_new_tokens=6", "--set", "eval.batch_size=1",
        "--set", "method_options.reinforce_pp.samples_per_prompt=2",
        "--set", "method_options.reinforce_pp.max_completion_length=6",
        "--set", "method_options.grpo.num_generations=2", "--set", "method_options.grpo.max_completion_length=6",
        # a KL term against the initial model (rl.reference=init): both RL trainers compute the reference with the
        # adapter switched off, inside the sharded forward
        "--set", "rl.kl_coef=0.04"]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    for k in ("ACCELERATE_USE_CPU", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "WORLD_SIZE"):
        if k not in extra:
            env.pop(k, None)
    return env


def _samples(run: Path) -> dict[str, list[dict]]:
    return {p.name: [json.loads(x) for x in p.read_text().splitlines()]
            for p in sorted((run / "samples").glob("*.jsonl"))}


def _sharded_run_matches_one(tmp_path: Path, config: str, methods: list[str], sharding: str, via_cli: bool = False,
                             **env: str) -> None:
    args = [*ARGS, "--methods", ",".join(methods)]
    one = subprocess.run([sys.executable, "-m", "harness.cli", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=600, env=_env(), cwd=ROOT)
    assert one.returncode == 0, one.stderr[-3000:]
    config_file = str(ROOT / "configs" / "accelerate" / config)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file,
              "--main_process_port", "0", "-m", "harness.cli", *args]
    if via_cli:  # `run` launches itself, and sets the CPU environment the config needs
        launch = [sys.executable, "-m", "harness.cli", *args, "--num-processes", "2", "--accelerate-config", config_file]
    two = subprocess.run([*launch, "--out", str(tmp_path / "two")], capture_output=True, text=True,
                         timeout=600, env=_env(**{SYNC_LOG_ENV: str(tmp_path / "sync"), **env}), cwd=ROOT)
    assert two.returncode == 0, two.stderr[-3000:]
    assert (two.stdout + two.stderr).count("finished in") == 1  # only the main process reports
    printed = " ".join((two.stdout + two.stderr).split())  # rich wraps long lines
    assert ("note: this FSDP/DeepSpeed launch shards only" in printed) == ("memgen" in methods)
    logs = [[json.loads(x) for x in Path(f"{tmp_path / 'sync'}.rank{r}").read_text().splitlines()] for r in (0, 1)]
    assert [len(log) for log in logs] == [2 * len(methods)] * 2  # every method, both tasks, on both processes
    for r0, r1 in zip(*logs, strict=True):
        assert (r0["world"], r1["world"], r0["rank"], r1["rank"]) == (2, 2, 0, 1)
        # accelerate really sharded (not a silent DDP); memgen never shards, and says so
        expected = "DATA_PARALLEL" if r0["label"].startswith("memgen") else sharding
        assert r0["sharding"] == r1["sharding"] == expected
        # and the weights were really split while training: each process held about half of them (ZeRO-2 splits
        # only gradients and optimizer states); memgen never calls the gathering, so it records nothing
        if expected == "DATA_PARALLEL" or sharding.endswith("ZERO2"):
            assert r0["held"] == r1["held"] == (None if expected == "DATA_PARALLEL" else 1.0)
        else:
            assert 0.45 < r0["held"] < 0.6 and 0.45 < r1["held"] < 0.6, (r0, r1)
        assert r0["label"] == r1["label"] and r0["digest"] == r1["digest"]
    for method in methods:
        run1, run2 = tmp_path / "one" / method, tmp_path / "two" / method
        s1, s2 = _samples(run1), _samples(run2)
        assert s1.keys() == s2.keys() and len(s2) == 6  # (1 + 2 rows) x 2 tasks
        for name, recs in s2.items():
            # every sample exactly once, in order, though 3 prompts do not divide over 2 processes
            assert [r["id"] for r in recs] == [r["id"] for r in s1[name]] and len({r["id"] for r in recs}) == 3
            if name.startswith("r0_"):  # before training: the same weights decode greedily to the same samples
                assert recs == s1[name]
        summary = json.loads((run2 / "summary.json").read_text())
        assert summary["complete"] and len(summary["matrix"]) == 3
        assert not [p for p in run2.rglob(".*")]  # no half-written files from any process
        # the main process saved the whole adapter, not its shard
        from safetensors.torch import load_file

        adapter = "weaver_adapter" if method == "memgen" else "adapter"

        def shapes(run: Path, adapter: str = adapter) -> dict[str, tuple[int, ...]]:
            f = run / "checkpoints" / "stage2" / adapter / "adapter_model.safetensors"
            return {k: tuple(v.shape) for k, v in load_file(str(f)).items()}

        assert shapes(run2) == shapes(run1)


@pytest.mark.slow
def test_fsdp2_runs_over_two_processes_match_one(tmp_path):
    _sharded_run_matches_one(tmp_path, "fsdp_cpu.yaml", ["sft", "grpo", "reinforce_pp"], "FSDP",
                             ACCELERATE_USE_CPU="true")


@pytest.mark.slow
@pytest.mark.parametrize("config", ["zero2_cpu.yaml", "zero3_cpu.yaml"])
def test_deepspeed_runs_over_two_processes_match_one(tmp_path, config):
    pytest.importorskip("deepspeed", reason="DeepSpeed is optional: pip install -e .[deepspeed] (scripts/setup.sh tries)")
    # no ACCELERATE_USE_CPU: accelerate drops DeepSpeed in a CPU launch; DeepSpeed's CPU accelerator uses gloo.
    # ZeRO-3 partitions every parameter while training: the evaluation between tasks runs on the gathered weights.
    # memgen (ZeRO-3 only, to keep the time down) trains data-parallel in the same launch, with a note saying so.
    # ZeRO-3 goes through `memgen-bench run --num-processes 2 --accelerate-config`, which sets DS_ACCELERATOR itself.
    if "zero3" in config:
        _sharded_run_matches_one(tmp_path, config, ["sft", "grpo", "reinforce_pp", "memgen"], "DEEPSPEED_ZERO3",
                                 via_cli=True)
    else:
        _sharded_run_matches_one(tmp_path, config, ["sft", "grpo", "reinforce_pp"], "DEEPSPEED_ZERO2",
                                 DS_ACCELERATOR="cpu")


def test_unsupported_sharded_setups_fail_with_a_clear_error(monkeypatch):
    from harness.sharded import check_supported

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO3_INIT", "true")
    with pytest.raises(ConfigError, match="zero3_init_flag: true is not supported"):
        check_supported()
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO3_INIT", "false")
    check_supported()
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="FSDP1"):
        check_supported()


def test_models_load_whole_after_a_zero3_trainer_registered_its_config():
    """A ZeRO-3 Trainer registers its DeepSpeed config process-wide (transformers' HfDeepSpeedConfig); the next
    method's model must still load whole (not through deepspeed.zero.Init), or row 0 cannot be evaluated."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is optional: pip install -e .[deepspeed] (scripts/setup.sh tries)")
    from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from harness.models import load_model

    keep = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        assert is_deepspeed_zero3_enabled()
        lm = load_model("smollm2-135m")
        assert not [n for n, p in lm.model.named_parameters() if hasattr(p, "ds_id") or p.numel() == 0]
        assert lm.model.model.embed_tokens.weight.shape[0] == len(lm.tokenizer)
    finally:
        unset_hf_deepspeed_config()
        del keep


@pytest.mark.slow
def test_zero3_frees_each_tasks_engine(tmp_path):
    """Three tasks under ZeRO-3, 2 processes: after each, no engine is left alive. Before ``release_engine`` went
    beyond DeepSpeed's ``destroy`` the count grew by one per task (the engine's own forward hooks stay on the
    model), and the parameters' ``_z3_optimizer`` links kept the last one of each method."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is optional: pip install -e .[deepspeed] (scripts/setup.sh tries)")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "configs" / "accelerate" / "zero3_cpu.yaml"), "--main_process_port", "0",
              str(ROOT / "tests" / "zero3_engine_worker.py"), str(tmp_path)]
    r = subprocess.run(launch, capture_output=True, text=True, timeout=600, env=_env(DS_ACCELERATOR="cpu"), cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in (0, 1):
        counts = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(counts["sft"]) == len(counts["reinforce_pp"]) == 3
        assert max(counts["sft"] + counts["reinforce_pp"]) == 0, counts
