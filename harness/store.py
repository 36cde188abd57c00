"""Run directories: atomic writes, run metadata (config, seeds, versions, git commit) and the matrix files.

Layout of one method's run directory::

    config.json          resolved RunConfig
    meta.json            seeds, package versions, task versions, git commit, host, command line; the model
                         (Hub commit, dtype, from_pretrained args), the chat template (choice, sha256, system
                         prompt, special tokens), each task's data source (file sha256 or Hub id + revision),
                         the hardware (torch.utils.collect_env)
    cells/r{row}_{task}.json     one matrix cell: accuracy (percent), n, correct, seconds, generation settings
    samples/r{row}_{task}.jsonl  every evaluated sample: prompt, completion, extracted (the answer the task's
                                 filter found), extract_rule (which of its rules matched), gold, score
    train/stage{i}.json          training statistics of stage i (loss curve, seconds)
    checkpoints/stage{i}/        the method's state after training on task i (DONE marks it complete)
    matrix.csv, summary.json     rewritten after every cell
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "numpy", "pandas", "memgen-bench")


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN -> None (JSON has no NaN), tuples -> lists, paths -> str."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and ``os.replace``: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_clean(obj), indent=2, sort_keys=True) + "\n")


def atomic_write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(_clean(r), ensure_ascii=False) + "\n" for r in rows))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def atomic_dir(final: Path) -> tuple[Path, Any]:
    """A temporary sibling folder and a function that moves it into place (replacing an older copy)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))

    def commit() -> None:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)

    return tmp, commit


def git_commit() -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return {"commit": None}
        return {"commit": sha.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def hardware_record() -> dict[str, Any]:
    """The machine a run used, from ``torch.utils.collect_env`` (what PyTorch's bug template asks for): GPUs,
    CUDA compile/runtime and driver versions, cuDNN, OS and the CPU model (about 2 s, once per run), and torch's
    intra-op thread count (a different count changes the order of float reductions, so two runs that differ only
    in it need not agree bit for bit)."""
    try:
        from torch.utils import collect_env

        env = collect_env.get_env_info()
    except Exception as exc:  # noqa: BLE001 - provenance must never stop a run
        return {"error": f"{type(exc).__name__}: {exc}"}
    cpu = next((line.split(":", 1)[1].strip() for line in (env.cpu_info or "").splitlines()
                if line.startswith("Model name")), None)
    keys = ("torch_version", "cuda_compiled_version", "cuda_runtime_version", "nvidia_driver_version",
            "nvidia_gpu_models", "cudnn_version", "is_cuda_available", "os", "libc_version", "python_platform")
    import torch

    return {**{k: getattr(env, k, None) for k in keys}, "cpu_model": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}


def run_metadata(seeds: dict[str, int], task_versions: dict[str, str]) -> dict[str, Any]:
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seeds": seeds,
        "task_versions": task_versions,
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "git": git_commit(),
        "argv": sys.argv,
    }
