"""End to end: the CLI fills the matrix; a run killed mid-way resumes and equals an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.runner import completed_stage

ARGS = ["run", "--model", "tiny-random", "--sequence", "arith,reverse,choice", "--methods", "sft,vanilla",
        "--limit", "6", "--seed", "3", "--set", "train.max_steps=4", "--set", "eval.batch_size=3",
        "--set", "eval.max_new_tokens=12"]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "harness.cli", *args]


def cells(run: Path) -> dict[str, dict]:
    out = {}
    for p in sorted((run / "cells").glob("*.json")):
        d = json.loads(p.read_text())
        d.pop("seconds", None)
        out[p.name] = d
    return out


def samples(run: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((run / "samples").glob("*.jsonl"))}


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    full, killed = tmp_path / "full", tmp_path / "killed"
    r = subprocess.run(cli(*ARGS, "--out", str(full)), capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]

    proc = subprocess.Popen(cli(*ARGS, "--out", str(killed)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    target = killed / "sft" / "cells" / "r1_reverse.json"  # mid row 1: after stage 1, before stage 2
    deadline = time.time() + 300
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert target.exists(), "the run ended before the kill point"
    assert not (killed / "sft" / "cells" / "r3_choice.json").exists(), "killed too late to test resume"
    assert completed_stage(killed / "sft") == 1
    stage1 = (killed / "sft" / "train" / "stage1.json").stat().st_mtime_ns

    r = subprocess.run(cli(*ARGS, "--out", str(killed)), capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming after stage 1" in r.stderr
    assert (killed / "sft" / "train" / "stage1.json").stat().st_mtime_ns == stage1  # stage 1 was not redone
    for method in ("sft", "vanilla"):
        assert cells(killed / method) == cells(full / method)
        assert samples(killed / method) == samples(full / method)
        assert (killed / method / "matrix.csv").read_text() == (full / method / "matrix.csv").read_text()
    summary = json.loads((full / "sft" / "summary.json").read_text())
    assert summary["complete"] and set(summary) >= {"acc", "bwt", "fwt", "forgetting", "learning_acc", "retention"}
    meta = json.loads((full / "sft" / "meta.json").read_text())
    assert meta["seeds"]["master"] == 3 and meta["task_versions"] == {"arith": "1", "reverse": "1", "choice": "3"}
    assert meta["packages"]["torch"] and "commit" in meta["git"]
    header = (full / "sft" / "matrix.csv").read_text().splitlines()
    assert header[0] == "after,arith,reverse,choice" and [h.split(",")[0] for h in header[1:]] == [
        "init", "arith", "reverse", "choice"]
    # vanilla never trains: rows 1..T are row 0 copied
    v = json.loads((full / "vanilla" / "cells" / "r2_arith.json").read_text())
    assert v["copied_from_row"] == 0


def test_changed_config_refuses_to_resume(tmp_path):
    out = tmp_path / "o"
    (out / "vanilla").mkdir(parents=True)
    (out / "vanilla" / "config.json").write_text(json.dumps({"seed": 99}))
    (out / "vanilla" / "cells").mkdir()  # a finished cell: only then is the directory another run's
    (out / "vanilla" / "cells" / "r0_arith.json").write_text(json.dumps({"accuracy": 0.0}))
    r = subprocess.run(cli("run", "--model", "tiny-random", "--sequence", "arith", "--methods", "vanilla",
                           "--limit", "2", "--out", str(out)), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "different config" in r.stderr
