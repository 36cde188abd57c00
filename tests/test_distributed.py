"""Data-parallel runs: sharding math, and a real 2-process `accelerate launch --cpu` (gloo) run vs 1 process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.distributed import SYNC_LOG_ENV, merge_shards, shard_indices


@pytest.mark.parametrize(("n", "p"), [(5, 2), (1, 2), (0, 3), (7, 3), (8, 4)])
def test_shards_cover_every_index_once(n, p):
    shards = [shard_indices(n, r, p) for r in range(p)]
    flat = sorted(i for s in shards for i in s)
    assert flat == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    merged = merge_shards([[(i, f"v{i}") for i in s] for s in shards], n)
    assert merged == [f"v{i}" for i in range(n)]


def test_merge_detects_duplicates_and_gaps():
    with pytest.raises(RuntimeError, match="two processes"):
        merge_shards([[(0, "a")], [(0, "b")]], 1)
    with pytest.raises(RuntimeError, match="no process"):
        merge_shards([[(0, "a")]], 2)


def _records(run):
    out = {}
    for p in sorted((run / "samples").glob("*.jsonl")):
        out[p.name] = [json.loads(x) for x in p.read_text().splitlines()]
    return out


@pytest.mark.slow
def test_two_process_run_matches_single_process(tmp_path):
    args = ["run", "--model", "tiny-random", "--sequence", "arith,choice", "--methods", "vanilla,sft",
            "--limit", "5", "--set", "train.max_steps=2", "--set", "train.batch_size=4",
            "--set", "eval.max_new_tokens=10", "--set", "eval.batch_size=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "harness.cli", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "harness.cli", *args, "--num-processes", "2",
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=900,
                         env={**env, SYNC_LOG_ENV: str(tmp_path / "sync")})
    assert two.returncode == 0, two.stderr[-3000:]
    assert "accelerate.commands.launch" in two.stderr
    # two processes really ran (``accelerate launch --cpu`` alone would start one) and sft kept them in sync
    logs = [[json.loads(x) for x in Path(f"{tmp_path / 'sync'}.rank{r}").read_text().splitlines()] for r in (0, 1)]
    assert [x["world"] for x in logs[0] + logs[1]] == [2] * 4  # sft after each of the 2 tasks, on each process
    assert [x["digest"] for x in logs[0]] == [x["digest"] for x in logs[1]]
    for method in ("vanilla", "sft"):
        r1, r2 = _records(tmp_path / "one" / method), _records(tmp_path / "two" / method)
        # 3 rows x 2 tasks; vanilla never trains, so only its row 0 is generated (later rows copy it)
        assert r1.keys() == r2.keys() and len(r1) == (2 if method == "vanilla" else 6)
        for name in r1:
            # every sample scored exactly once, in the original order, even though 5 does not divide by 2
            assert [s["id"] for s in r2[name]] == [s["id"] for s in r1[name]]
            assert len({s["id"] for s in r2[name]}) == 5
    # Greedy evaluation of the same weights is deterministic: vanilla is identical sample for sample, and so is
    # every row-0 (init) cell of sft. Later sft rows follow DDP training, whose per-rank token-mean loss averaged
    # over ranks differs slightly from the single-process token mean, so only their structure is compared.
    assert _records(tmp_path / "one" / "vanilla") == _records(tmp_path / "two" / "vanilla")
    sft1, sft2 = _records(tmp_path / "one" / "sft"), _records(tmp_path / "two" / "sft")
    for name in sft1:
        if name.startswith("r0_"):
            assert sft1[name] == sft2[name]
    s2 = json.loads((tmp_path / "two" / "sft" / "summary.json").read_text())
    assert s2["complete"]
    assert (tmp_path / "two" / "sft" / "checkpoints" / "stage2" / "DONE").exists()
