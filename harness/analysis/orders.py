"""Task orders: the given order or rows of a balanced Latin square (Williams design), so that every task comes
at every position equally often and, for an even number of tasks, every task directly follows every other once
(for an odd number the design needs 2n rows: the n rows and their mirror images)."""

from __future__ import annotations

from collections.abc import Sequence


def balanced_latin_square(n: int) -> list[list[int]]:
    """Rows of a Williams design over 0..n-1: n rows for even n, 2n for odd n (first n, then their reverses)."""
    if n < 1:
        raise ValueError(f"need at least one task, got {n}")
    # First row 0, 1, n-1, 2, n-2, ...; row r adds r (mod n).
    first, lo, hi = [0], 1, n - 1
    while len(first) < n:
        first.append(lo)
        lo += 1
        if len(first) < n:
            first.append(hi)
            hi -= 1
    rows = [[(x + r) % n for x in first] for r in range(n)]
    return rows if n % 2 == 0 else rows + [row[::-1] for row in rows]


def task_orders(tasks: Sequence[str], n_orders: int | None = None, spec: str = "latin") -> list[list[str]]:
    """``spec`` "given": only the given order; "latin": the first ``n_orders`` rows of the balanced Latin square
    (row 0 is a rotation-free relabelling, so the given order itself always comes first)."""
    tasks = list(tasks)
    if spec == "given":
        return [tasks]
    if spec != "latin":
        raise ValueError(f"unknown order scheme {spec!r}; use given or latin")
    square = balanced_latin_square(len(tasks))
    # Relabel so that row 0 is exactly the given order.
    label = {pos: tasks[k] for k, pos in enumerate(square[0])}
    rows = [[label[x] for x in row] for row in square]
    return rows[: n_orders or len(rows)]
