"""Data-parallel helpers over ``accelerate``'s process state (a no-op in a single process).

Under ``accelerate launch --num_processes N`` every process runs the same runner: evaluation prompts are sharded
round-robin, the per-sample records are gathered to every process in the original order (so each sample is
scored exactly once, whatever N), and only the main process writes files.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any, TypeVar

T = TypeVar("T")


def launched() -> bool:
    """True inside ``accelerate launch`` / torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@cache
def state():
    from accelerate import PartialState

    return PartialState()


def world() -> tuple[int, int]:
    """(rank, number of processes); (0, 1) outside a launch, without initialising anything."""
    if not launched():
        return 0, 1
    s = state()
    return s.process_index, s.num_processes


def is_main() -> bool:
    return world()[0] == 0


def barrier() -> None:
    if launched():
        state().wait_for_everyone()


def shard_indices(n: int, rank: int, n_proc: int) -> list[int]:
    """Round-robin shard of range(n): every index in exactly one shard, sizes differ by at most one."""
    return list(range(rank, n, n_proc))


def merge_shards(shards: Sequence[Sequence[tuple[int, Any]]], n: int) -> list[Any]:
    """(index, value) pairs from every process -> values in index order; checks each index arrives once."""
    out: list[Any] = [None] * n
    seen = [False] * n
    for shard in shards:
        for i, v in shard:
            if seen[i]:
                raise RuntimeError(f"sample {i} was produced by two processes")
            out[i], seen[i] = v, True
    if not all(seen):
        raise RuntimeError(f"samples {[i for i, s in enumerate(seen) if not s][:5]} were produced by no process")
    return out


def map_sharded(fn: Callable[[list[T]], list[Any]], items: Sequence[T]) -> list[Any]:
    """Apply ``fn`` (a batch function) to this process's shard of ``items`` and gather results in order."""
    rank, n_proc = world()
    if n_proc == 1:
        return fn(list(items))
    from accelerate.utils import gather_object

    idx = shard_indices(len(items), rank, n_proc)
    local = fn([items[i] for i in idx]) if idx else []
    pairs = list(zip(idx, local, strict=True))
    gathered = gather_object([pairs])  # one list of pairs per process
    return merge_shards(gathered, len(items))
