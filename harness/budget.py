"""Training budgets: what every training stage records, and how a run sums them (``summary.json["budget"]``).

The budget rule (README "Budgets"): per task, every trained method draws from the same training pool (the
``train.train_limit`` seeded subsample), takes ``train.max_steps`` optimizer steps and trains on
``train.batch_size`` sequences per step (SFT: gold targets; GRPO: 1 prompt x 8 samples; REINFORCE++: 8 prompts x
1 sample; REINFORCE++-baseline: 2 prompts x 4 samples); every method is evaluated on the same ``eval.limit`` test
examples, greedily, with each task's generation budget. What a stage really used is recorded, so a method that
departs from the rule (ExpeL attempts every train problem) shows it in the report.

Keys every ``train_on_task`` returns (``METHOD_KEYS``; every method, every phase of a stage summed, e.g. MemGen's
weaver SFT + weaver GRPO + trigger):

- ``examples_seen``: distinct training examples of the task the stage used (prompts for RL, targets for SFT,
  problems attempted or stored for retrieval memories).
- ``optimizer_steps``: optimizer updates (0 for a method that trains no weights).
- ``train_tokens``: non-padding tokens that went through a forward pass with gradients (prompt + target or
  completion), summed over steps, PPO epochs and processes.
- ``generated_tokens``: tokens the model sampled while training (RL rollouts, ExpeL attempts, insight and workflow
  calls), stop token included, over all processes.
- ``trainable_params``: parameters the stage's optimizer(s) update (0 for none).
- ``budget_notes`` (optional, a string): how the stage departs from the rule.

The runner adds, measured the same way around every ``train_on_task`` (``MEASURED_KEYS``): ``wall_seconds`` and
``peak_memory_mb`` with ``peak_memory_kind`` (``cuda_allocated``: the peak of ``torch.cuda.max_memory_allocated``
during the stage; ``rss``: the main process's peak resident memory during the stage, reset through
``/proc/self/clear_refs``; ``rss_process_max``: the process's lifetime peak where the reset is unavailable).

A key a method does not return is recorded as None (not recorded), never as 0.
"""

from __future__ import annotations

import re
import resource
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

METHOD_KEYS = ("examples_seen", "optimizer_steps", "train_tokens", "generated_tokens", "trainable_params")
MEASURED_KEYS = ("wall_seconds", "peak_memory_mb")
BUDGET_KEYS = (*METHOD_KEYS, *MEASURED_KEYS)
# A run's budget sums the per-task quantities and takes the maximum of the sizes.
MAXED = ("trainable_params", "peak_memory_mb")


def trainable_parameters(params: Iterable[torch.nn.Parameter]) -> int:
    """Number of parameters with ``requires_grad`` (each tensor counted once)."""
    seen: set[int] = set()
    n = 0
    for p in params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def distinct_draws(n_examples: int, draws: int) -> int:
    """Distinct examples after ``draws`` draws from ``n_examples`` by seeded passes without replacement (a fresh
    permutation per pass, as ``transformers.Trainer``'s sampler and ``baselines.reinforce_pp.prompt_batches`` draw):
    the first pass covers new examples only, so the count is exact, not an estimate."""
    return min(n_examples, max(draws, 0))


def union_over_processes(items: set[int]) -> set[int]:
    """The union of every process's ``items`` under ``accelerate launch`` (the set itself in one process)."""
    from harness.distributed import world

    if world()[1] == 1:
        return set(items)
    from accelerate.utils import gather_object

    return {i for part in gather_object([sorted(items)]) for i in part}


def _vm_hwm_kb() -> int | None:
    try:
        m = re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(m.group(1)) if m else None


class StageMeter:
    """Wall seconds and peak memory of one training stage: ``with StageMeter(device) as m: ...; m.result()``."""

    def __init__(self, device: str = "cpu"):
        self.cuda = device.startswith("cuda") and torch.cuda.is_available()
        self.kind = "cuda_allocated" if self.cuda else "rss"
        self.t0 = 0.0
        self.seconds = 0.0

    def __enter__(self) -> StageMeter:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            try:  # Linux >= 4.0: "5" resets the peak RSS (VmHWM), so the peak is this stage's own
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.kind = "rss_process_max"
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.t0

    def peak_mb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        kb = _vm_hwm_kb() if self.kind == "rss" else None
        if kb is None:  # ru_maxrss: KiB on Linux, bytes on macOS
            self.kind = "rss_process_max"
            kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1024 if sys.platform == "darwin" else 1)
        return kb / 1024

    def result(self) -> dict[str, Any]:
        return {"wall_seconds": self.seconds, "peak_memory_mb": self.peak_mb(), "peak_memory_kind": self.kind}


def stage_budget(stats: Mapping[str, Any], measured: Mapping[str, Any], trains: bool = True) -> dict[str, Any]:
    """One stage's budget record: the method's keys (None where it did not report one; 0 for a method that never
    trains, such as vanilla), the runner's measurements and the optional ``budget_notes``."""
    out: dict[str, Any] = {k: stats.get(k, None if trains else 0) for k in METHOD_KEYS}
    out.update({k: measured.get(k) for k in (*MEASURED_KEYS, "peak_memory_kind")})
    if stats.get("budget_notes"):
        out["budget_notes"] = str(stats["budget_notes"])
    return out


def run_budget(stages: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A run's budget from its stages' records: sums (maxima for ``MAXED`` keys) over the stages; a key is None if
    any stage did not record it. ``stages`` counts the stages summed."""
    out: dict[str, Any] = {"stages": len(stages)}
    for k in BUDGET_KEYS:
        vals = [s.get(k) for s in stages]
        if not vals or any(v is None for v in vals):
            out[k] = None if vals else 0
            continue
        out[k] = max(vals) if k in MAXED else sum(vals)
    kinds = sorted({s["peak_memory_kind"] for s in stages if s.get("peak_memory_kind")})
    if kinds:
        out["peak_memory_kind"] = ",".join(kinds)
    notes = [s["budget_notes"] for s in stages if s.get("budget_notes")]
    if notes:
        out["budget_notes"] = "; ".join(dict.fromkeys(notes))
    return out


def read_stage_budgets(run_dir: Path) -> list[dict[str, Any]]:
    """The ``budget`` records of ``train/stage*.json`` in stage order (stages trained before a resume included)."""
    import json

    paths = sorted((run_dir / "train").glob("stage*.json"), key=lambda p: int(p.stem.removeprefix("stage") or 0))
    out = []
    for p in paths:
        rec = json.loads(p.read_text(encoding="utf-8"))
        if isinstance(rec.get("budget"), dict):
            out.append(rec["budget"])
    return out
