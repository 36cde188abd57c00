"""Progress inside one evaluation cell: examples done, generated tokens/s and ETA.

The runner opens ``cell_progress(total, sink)`` around a cell's generation; the generation loops
(``harness.generation.generate_greedy``, MemGen's ``generate``) call ``advance(examples, tokens)`` once per batch,
which is a no-op outside a cell and otherwise a few additions, so generation is not slowed. ``sink`` receives a
``snapshot`` after every batch; the CLI shows it as a rich bar on a terminal and, where stderr is not a terminal
(SLURM, nohup), prints the plain line only when ``line_due`` says so: every ``LINE_SECONDS`` or each quarter.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

LINE_SECONDS = 30.0  # a plain progress line at least this often ...
LINE_FRACTION = 0.25  # ... and each time another quarter of the cell is done


def eta_seconds(done: int, total: int, elapsed: float) -> float | None:
    """Seconds left at the mean rate so far; None before the first example. (8 of 32 in 10 s -> 30 s.)"""
    if done <= 0 or total <= 0:
        return None
    return max(total - done, 0) * elapsed / done


def format_duration(seconds: float | None) -> str:
    """``h:mm:ss`` (``?`` when unknown), as rich's time columns print it."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


@dataclass
class CellProgress:
    """Counters of one cell (this process's share of it under a launch)."""

    total: int
    sink: Callable[[dict[str, Any]], None] | None = None
    done: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    _last_line: float = field(default=0.0, init=False)  # when the last plain line was due (perf_counter)
    _last_quarter: int = field(default=0, init=False)  # quarters of the cell reported so far

    def __post_init__(self) -> None:
        self._last_line = self.started

    def advance(self, examples: int, tokens: int = 0) -> None:
        self.done += examples
        self.tokens += tokens
        if self.sink is not None:
            self.sink(self.snapshot())

    def line_due(self, now: float) -> bool:
        """A plain line is due: ``LINE_SECONDS`` since the last one, a new quarter reached, or the cell done."""
        quarter = int(self.done / max(self.total, 1) / LINE_FRACTION + 1e-9)
        due = now - self._last_line >= LINE_SECONDS or quarter > self._last_quarter or self.done >= self.total
        if due:
            self._last_line, self._last_quarter = now, quarter
        return due

    def snapshot(self) -> dict[str, Any]:
        now = time.perf_counter()
        elapsed = now - self.started
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        eta = eta_seconds(self.done, self.total, elapsed)
        text = (f"{self.done}/{self.total} examples, {rate:.1f} tok/s, elapsed {format_duration(elapsed)}, "
                f"ETA {format_duration(eta)}")
        return {"done": self.done, "total": self.total, "tokens": self.tokens, "elapsed_s": elapsed,
                "tokens_per_s": rate, "eta_s": eta, "line_due": self.line_due(now), "text": text}


_current: ContextVar[CellProgress | None] = ContextVar("memgen_cell_progress", default=None)


@contextmanager
def cell_progress(total: int, sink: Callable[[dict[str, Any]], None] | None = None) -> Iterator[CellProgress]:
    """Count the batches generated inside the block towards one cell of ``total`` examples."""
    progress = CellProgress(total, sink)
    token = _current.set(progress)
    try:
        yield progress
    finally:
        _current.reset(token)


def advance(examples: int, tokens: int = 0) -> None:
    """One generated batch: ``examples`` completions, ``tokens`` new tokens (no-op outside ``cell_progress``)."""
    progress = _current.get()
    if progress is not None:
        progress.advance(examples, tokens)
