"""Experiment tracking (``--report-to none|tensorboard|wandb``) through accelerate's trackers.

One tracker per run directory, opened by the runner on the main process. What it logs:

- ``train/<task>/<phase>loss`` and the step's other scalars (``learning_rate``, ``reward``, ``kl``, ``insert_rate``,
  ``tokens_per_s``...; the Trainer-based methods forward the Trainer's log dict) at every optimizer step, live
  (the ``on_step`` hook every method calls, ``harness/methods.py``);
- at the end of each stage, every curve the method recorded in its train stats (``losses``, ``rewards``, ``kl``,
  MemGen's ``grpo``/``trigger`` sub-dicts, insertion rates, learning rates ...) as ``stage<i>/<task>/<key>`` at
  their own step index, and the stage's scalars (seconds, tokens, ...) as ``stage/<task>/<key>`` at the stage;
- each matrix cell as it is computed (``eval/<task>/accuracy``, ``eval/<task>/tokens_per_s`` at the row), and the
  final continual-learning metrics (``final/acc``, ``final/bwt``, ...).

TensorBoard writes event files under ``<run dir>/tensorboard/``; W&B writes ``<run dir>/wandb/`` (offline with
``WANDB_MODE=offline``; project ``$WANDB_PROJECT`` or ``memgen-bench``). accelerate's trackers are used rather
than the SDKs directly so the custom training loops and the runner share one way to log.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harness.config import REPORT_TO, ConfigError

# extra -> the module each backend needs (``pip install memgen-bench[tracking]``)
BACKEND_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def _numbers(prefix: str, obj: Any, out: dict[str, float]) -> None:
    """Flatten the finite scalars of ``obj`` (nested dicts) into ``out`` as ``prefix/key`` (lists are skipped)."""
    if isinstance(obj, bool):
        out[prefix] = float(obj)
    elif isinstance(obj, int | float):
        if math.isfinite(float(obj)):
            out[prefix] = float(obj)
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            _numbers(f"{prefix}/{k}", v, out)


def _curves(prefix: str, obj: Any, out: dict[str, list[float]]) -> None:
    """Collect the lists of numbers of ``obj`` (nested dicts) as curves ``prefix/key`` -> values."""
    if isinstance(obj, list | tuple) and obj and all(isinstance(v, int | float) and not isinstance(v, bool)
                                                     for v in obj):
        out[prefix] = [float(v) for v in obj]
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            _curves(f"{prefix}/{k}", v, out)


class RunTracker:
    """Logs scalars of one run to TensorBoard or W&B; ``kind="none"`` makes every call a no-op."""

    def __init__(self, kind: str, run_dir: Path, run_name: str, config: dict[str, Any] | None = None):
        if kind not in REPORT_TO:
            raise ConfigError(f"report_to {kind!r} is not valid; use one of {', '.join(REPORT_TO)}")
        self.kind = kind
        self.tracker: Any = None
        if kind == "none":
            return
        from harness.extras import require

        require("tracking", [BACKEND_MODULES[kind]], f"--report-to {kind}")
        from accelerate import PartialState
        from accelerate.tracking import TensorBoardTracker, WandBTracker

        PartialState()  # accelerate's trackers log through its logger, which needs the (single-process) state

        run_dir.mkdir(parents=True, exist_ok=True)
        if kind == "tensorboard":
            self.tracker = TensorBoardTracker("tensorboard", str(run_dir))
        else:
            self.tracker = WandBTracker(os.environ.get("WANDB_PROJECT", "memgen-bench"), name=run_name,
                                        dir=str(run_dir), config=config or {}, reinit="finish_previous")
        start = getattr(self.tracker, "start", None)
        if start is not None and getattr(self.tracker, "tracker", None) is None:
            start()  # accelerate >= 1.4 starts a tracker explicitly (before, its __init__ did)

    def log(self, values: Mapping[str, float], step: int) -> None:
        """``values`` at ``step``. TensorBoard keeps a step per tag; W&B wants one increasing step per run, so
        there the step travels as a value (``<tag>_step``) and W&B numbers its own rows."""
        if self.tracker is None or not values:
            return
        if self.kind == "tensorboard":
            self.tracker.log(dict(values), step=step)
        else:
            self.tracker.log({**values, **{f"{k}_step": step for k in values}})

    def log_stage(self, task: str, stage: int, stats: Mapping[str, Any]) -> None:
        """A finished stage: its recorded curves at their own step index and its scalars at the stage."""
        if self.tracker is None:
            return
        curves: dict[str, list[float]] = {}
        _curves(f"stage{stage}/{task}", stats, curves)
        for tag, values in curves.items():
            for i, v in enumerate(values, 1):
                if math.isfinite(v):
                    self.log({tag: v}, i)
        scalars: dict[str, float] = {}
        _numbers(f"stage/{task}", stats, scalars)
        self.log(scalars, stage)

    def log_summary(self, summary: Mapping[str, Any], stage: int) -> None:
        """The final continual-learning metrics (NaN ones, undefined, are left out)."""
        scalars: dict[str, float] = {}
        for key in ("acc", "bwt", "fwt", "forgetting", "learning_acc", "retention"):
            if key in summary:
                _numbers(f"final/{key}", summary[key], scalars)
        self.log(scalars, stage)

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.finish()
            self.tracker = None
