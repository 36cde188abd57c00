"""A Hub model id when the Hub cannot be used: ``memgen-bench config`` resolves a cached one without the network
and fails an uncached one at once with one line (HF_HUB_OFFLINE=1, or no connection to the Hub), and ``load_model``
takes a cached one from the cache, instead of ~25 s of retries inside ``from_pretrained``."""

import json
import os
import subprocess
import sys
import time

import pytest

from harness.errors import ModelLoadError
from harness.models import HUB_PROBE_SECONDS, hub_config_cached, load_tokenizer, tiny_random_model
from tests.test_workflow import cli, error_line

UNREACHABLE = "https://hub.invalid"  # the reserved .invalid TLD never resolves (RFC 2606)


def fake_cache(root, repo="memgen-test/cached"):
    """A Hugging Face hub cache holding only ``repo``'s config.json (the layout huggingface_hub writes)."""
    folder = root / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps({"model_type": "qwen2", "torch_dtype": "bfloat16"}))
    return root


def test_the_check_fails_fast_offline_and_when_unreachable(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE=1 is set"):
        hub_config_cached("memgen-test/not-cached", {})
    assert time.perf_counter() - t0 < 2.0
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", UNREACHABLE)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError, match=r"the Hub \(hub.invalid\) is unreachable"):
        hub_config_cached("memgen-test/not-cached", {})
    assert time.perf_counter() - t0 < HUB_PROBE_SECONDS + 1.0
    fake_cache(tmp_path)
    assert hub_config_cached("memgen-test/cached", {})  # found in the cache: no network asked
    assert not hub_config_cached("/no/such/model", {})  # not a repo id: from_pretrained names the problem


def test_config_command_with_a_hub_id_offline(tmp_path):
    env = {"HF_HUB_CACHE": str(fake_cache(tmp_path)), "HF_ENDPOINT": UNREACHABLE}
    r = cli("config", "--set", "model=memgen-test/cached", env={**env, "HF_HUB_OFFLINE": "0"})  # cached: no network
    assert r.returncode == 0, r.stderr[-2000:]
    assert "model: memgen-test/cached" in r.stdout
    r = cli("config", "--set", "model=memgen-test/not-cached", env={**env, "HF_HUB_OFFLINE": "1"})
    assert "model 'memgen-test/not-cached' is not in the local Hugging Face cache and HF_HUB_OFFLINE=1" in error_line(r)
    r = cli("config", "--set", "model=memgen-test/not-cached", env={**env, "HF_HUB_OFFLINE": "0"})  # conftest sets 1
    assert "the Hub (hub.invalid) is unreachable" in error_line(r)


LOAD_SCRIPT = """
import json, time
from harness.models import load_model
t0 = time.perf_counter()
lm = load_model("memgen-test/tiny-cached")
print(json.dumps({"seconds": time.perf_counter() - t0, "params": sum(p.numel() for p in lm.model.parameters())}))
"""


def test_load_model_takes_a_cached_hub_model_from_the_cache_when_the_hub_is_unreachable(tmp_path):
    """HF_HUB_OFFLINE unset and no Hub: the cached model loads from the cache at once (``local_files_only``),
    not after from_pretrained's retries of every file it would ask the Hub for."""
    root = fake_cache(tmp_path, "memgen-test/tiny-cached")
    snap = next((root / "models--memgen-test--tiny-cached" / "snapshots").iterdir())
    tok = load_tokenizer("tiny-random")
    model = tiny_random_model(tok, seed=0)
    model.save_pretrained(snap)
    tok.save_pretrained(snap)
    env = {**os.environ, "HF_HUB_CACHE": str(root), "HF_ENDPOINT": UNREACHABLE, "HF_HUB_OFFLINE": "0",
           "TRANSFORMERS_OFFLINE": "0"}
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(var, None)
    r = subprocess.run([sys.executable, "-c", LOAD_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["params"] == sum(p.numel() for p in model.parameters())
    # measured: 1.1 s from the cache; before, 24.8 s (five retries of the adapter-config HEAD request)
    assert out["seconds"] < HUB_PROBE_SECONDS + 8.0, out
