from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"

# Tests never reach the Hub: local data and built-in models only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if SHARED_DATA.exists():
    os.environ.setdefault("MEMGEN_BENCH_DATA", str(SHARED_DATA))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not SHARED_DATA.exists():
        pytest.fail(f"benchmark data not found at {SHARED_DATA}: tests need ../shared/data beside the checkout")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny():
    """The tiny random Qwen2-style model with the real SmolLM2 tokenizer (fresh weights each test)."""
    from harness.models import load_model

    return lambda seed=0: load_model("tiny-random", seed=seed)


@pytest.fixture(scope="session")
def smollm2():
    from harness.models import load_model

    return lambda: load_model("smollm2-135m")
