"""Worker for tests/test_distributed_sharded.py, run under a 2-process ZeRO-3 launch: trains sft and reinforce_pp
over three tasks through the runner and writes, after every task, how many DeepSpeed engines are still alive
(``<out>/rank<r>.json``). Each task builds a new engine; the old ones must be freed (``release_engine``), or each
would keep its optimizer's fp32 master weights and moments for the rest of the run."""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path
from typing import Any

from harness.config import RunConfig, apply_overrides
from harness.distributed import world
from harness.methods import build_method as _build_method
from harness.runner import run_method


def live_engines() -> int:
    from deepspeed.runtime.engine import DeepSpeedEngine

    gc.collect()
    return sum(isinstance(o, DeepSpeedEngine) for o in gc.get_objects())


def main(out: Path) -> None:
    import harness.runner as runner

    counts: dict[str, list[int]] = {}

    def build_method(name: str, *args: Any, **kwargs: Any) -> Any:
        method = _build_method(name, *args, **kwargs)
        train = method.train_on_task

        def counted(task: Any, examples: Any, stage: int) -> Any:
            stats = train(task, examples, stage)
            counts.setdefault(name, []).append(live_engines())
            return stats

        method.train_on_task = counted
        return method

    runner.build_method = build_method  # the runner's own lookup, wrapped
    cfg = apply_overrides(RunConfig(), [
        "model=tiny-random", "sequence=arith,choice,reverse", "limit=3", "train.max_steps=2",
        "train.batch_size=2", "eval.max_new_tokens=4", "eval.limit=2",
        "method_options.reinforce_pp.samples_per_prompt=2", "method_options.reinforce_pp.max_completion_length=4"])
    for name in ("sft", "reinforce_pp"):
        run_method(name, cfg, out / name)
    rank = world()[0]
    (out / f"rank{rank}.json").write_text(json.dumps(counts))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
