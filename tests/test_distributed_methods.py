"""Every training method under a real 2-process launch (gloo on CPU), against the single-process run.

Two launches: the trainers themselves on a task whose reward varies on random text (``distributed_worker.py``;
the weights must change, identically on both processes, and weaver SFT's loss curve must equal the
single-process one), and the CLI runner for reinforce_pp, grpo and memgen (weaver SFT + GRPO + trained trigger).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.config import ConfigError, RunConfig
from harness.distributed import SYNC_LOG_ENV, rank_slice, single_process_cpu_launch

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", **extra}


def test_group_constraints_are_checked_up_front(monkeypatch):
    from baselines.grpo import GRPOOptions, per_device_batch

    assert per_device_batch(GRPOOptions(num_generations=8, prompts_per_step=1), 2) == 4
    assert per_device_batch(GRPOOptions(num_generations=4, prompts_per_step=3), 3) == 4
    with pytest.raises(ConfigError, match=r"prompts_per_step \* num_generations = 1 \* 3 = 3 .* 2 processes"):
        per_device_batch(GRPOOptions(num_generations=3, prompts_per_step=1), 2)
    import baselines.reinforce_pp as rpp

    monkeypatch.setattr(rpp, "world", lambda: (0, 2))  # as under a 2-process launch; fails before any model use
    with pytest.raises(ConfigError, match=r"reinforce_pp: prompts_per_step \* samples_per_prompt = 3 .* 2 proc"):
        rpp.ReinforcePP(None, RunConfig(), {"samples_per_prompt": 3, "prompts_per_step": 1})  # type: ignore[arg-type]


def test_single_process_helpers_and_the_cpu_launch_trap(monkeypatch):
    for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert rank_slice(5) == range(5)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # what `accelerate launch --cpu --num_processes 2` leaves
    assert single_process_cpu_launch()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not single_process_cpu_launch()


def _sync_log(prefix: Path) -> dict[str, dict[int, str]]:
    """label -> {rank: digest} from the per-process logs that ``check_in_sync`` writes; asserts 2 processes."""
    out: dict[str, dict[int, str]] = {}
    for rank in (0, 1):
        for line in Path(f"{prefix}.rank{rank}").read_text().splitlines():
            rec = json.loads(line)
            assert rec["world"] == 2 and rec["rank"] == rank
            out.setdefault(rec["label"], {})[rank] = rec["digest"]
    return out


@pytest.mark.slow
def test_trainers_keep_identical_weights_over_two_processes(tmp_path):
    worker = str(ROOT / "tests" / "distributed_worker.py")
    one = subprocess.run([sys.executable, worker, str(tmp_path / "one")], capture_output=True, text=True,
                         timeout=600, env=_env(), cwd=ROOT)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([*LAUNCH, worker, str(tmp_path / "two")], capture_output=True, text=True, timeout=600,
                         env=_env(**{SYNC_LOG_ENV: str(tmp_path / "sync")}), cwd=ROOT)
    assert two.returncode == 0, two.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    labels = ["reinforce_pp", "grpo", "memgen weaver sft", "memgen weaver grpo", "memgen trigger"]
    assert sorted(r0["digests"]) == sorted(labels)
    for label in labels:
        before, after = r0["digests"][label]
        assert after != before, f"{label}: training did not change the weights"
        assert r1["digests"][label] == [before, after], f"{label}: processes ended with different weights"
    # the trainers' own check_in_sync ran on both processes (and would have raised on a mismatch)
    synced = _sync_log(tmp_path / "sync")
    for label in ("memgen weaver sft", "memgen weaver grpo", "memgen trigger"):
        assert synced[label][0] == synced[label][1] == r0["digests"][label][1]
    assert any(k.startswith("reinforce_pp") for k in synced) and any(k.startswith("grpo") for k in synced)
    # Weaver SFT is deterministic (no dropout, no sampling): sharded rows with token-weighted losses and summed
    # gradients give the single-process token mean, so the whole loss curve (step 2 after one update) matches.
    single = json.loads((tmp_path / "one" / "rank0.json").read_text())
    assert r0["losses"]["memgen weaver sft"] == pytest.approx(single["losses"]["memgen weaver sft"], rel=1e-5)
    assert r0["losses"] == r1["losses"]


def _samples(run: Path) -> dict[str, list[dict]]:
    return {p.name: [json.loads(x) for x in p.read_text().splitlines()]
            for p in sorted((run / "samples").glob("*.jsonl"))}


@pytest.mark.slow
def test_rl_and_memgen_runs_over_two_processes_match_one(tmp_path):
    methods = ["reinforce_pp", "grpo", "memgen"]
    args = ["run", "--model", "tiny-random", "--sequence", "arith,choice", "--methods", ",".join(methods),
            "--limit", "5", "--set", "train.max_steps=2", "--set", "train.batch_size=4",
            "--set", "eval.max_new_tokens=6", "--set", "eval.batch_size=2",
            "--set", "method_options.reinforce_pp.samples_per_prompt=2",
            "--set", "method_options.reinforce_pp.max_completion_length=6",
            "--set", "method_options.grpo.num_generations=2", "--set", "method_options.grpo.max_completion_length=6",
            "--set", "method_options.memgen.k_prompt=2", "--set", "method_options.memgen.k_infer=2",
            "--set", "method_options.memgen.weaver_train=sft+grpo", "--set", "method_options.memgen.grpo_group=2",
            "--set", "method_options.memgen.trigger=trained", "--set", "method_options.memgen.trigger_group=2"]
    one = subprocess.run([sys.executable, "-m", "harness.cli", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=600, env=_env(), cwd=ROOT)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "harness.cli", *args, "--num-processes", "2",
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=600,
                         env=_env(**{SYNC_LOG_ENV: str(tmp_path / "sync")}), cwd=ROOT)
    assert two.returncode == 0, two.stderr[-3000:]
    assert (two.stdout + two.stderr).count("finished in") == 1  # only the main process reports
    synced = _sync_log(tmp_path / "sync")  # both processes trained, and ended each stage with equal weights
    for method in methods:
        stages = [k for k in synced if k.startswith(method)]
        assert stages, f"{method}: no training stage checked its weights"
        assert all(synced[k][0] == synced[k][1] for k in stages)
    for method in methods:
        run1, run2 = tmp_path / "one" / method, tmp_path / "two" / method
        s1, s2 = _samples(run1), _samples(run2)
        assert s1.keys() == s2.keys() and len(s2) == 6  # (1 + 2 rows) x 2 tasks
        for name, recs in s2.items():
            # every sample exactly once, in the original order (5 prompts do not divide over 2 processes)
            assert [r["id"] for r in recs] == [r["id"] for r in s1[name]]
            assert len({r["id"] for r in recs}) == 5 and all(isinstance(r["score"], (int, float)) for r in recs)
            if name.startswith("r0_"):  # before training: the same weights decode greedily to the same samples
                assert recs == s1[name]
        summary = json.loads((run2 / "summary.json").read_text())
        assert summary["complete"] and len(summary["matrix"]) == 3
        assert (run2 / "matrix.csv").read_text().splitlines()[0] == "after,arith,choice"
        assert not [p for p in run2.rglob(".*")]  # no half-written (atomic-write temp) files from any process
        assert (run2 / "checkpoints" / "stage2" / "DONE").exists()
