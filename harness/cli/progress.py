"""The live view of a run: the runner's events as a rich progress bar (a terminal) or log lines (a file)."""

from __future__ import annotations

from typing import Any

from rich.progress import Progress


class _Progress:
    """Rich progress over the runner's events: one bar for the matrix cells, a status line for training."""

    def __init__(self, progress: Progress, n_cells: int, label: str):
        self.p = progress
        self.bar = progress.add_task(label, total=n_cells)

    def __call__(self, kind: str, info: dict[str, Any]) -> None:
        if kind == "eval_start":
            self.p.update(self.bar, description=f"{info['method']}: eval row {info['row']} on {info['task']}")
        elif kind == "eval_progress":  # inside a cell (harness/progress.py): a bar on a terminal, else a line
            line = f"  eval row {info['row']} {info['task']}: {info['text']}"
            if self.p.console.is_terminal:
                if getattr(self, "eval_bar", None) is None:
                    self.eval_bar = self.p.add_task(line, total=info["total"])
                self.p.update(self.eval_bar, completed=info["done"], description=line)
            elif info["line_due"]:
                self.p.console.print(f"  {info['method']:>10}{line}")
        elif kind == "eval_end":
            if getattr(self, "eval_bar", None) is not None:
                self.p.remove_task(self.eval_bar)
                self.eval_bar = None
            self.p.advance(self.bar)
            self.p.console.print(f"  {info['method']:>10} row {info['row']} {info['task']:<12} "
                                 f"acc {info['accuracy']:6.2f}%  (n={info['n']}, {info['seconds']:.1f}s)")
        elif kind == "train_start":
            self.p.update(self.bar, description=f"{info['method']}: training on {info['task']} ({info['n']} ex)")
            self.train_bar = self.p.add_task(f"  train {info['task']}", total=None)
        elif kind == "train_step" and getattr(self, "train_bar", None) is not None:
            what = f"{info['task']} {info.get('phase', '')}".strip()  # e.g. "arith trigger" (MemGen's phases)
            self.p.update(self.train_bar, completed=info["step"], total=info["total"],
                          description=f"  train {what} loss {info['loss']:.3f}")
            step, total = info["step"], info["total"] or 0
            if not self.p.console.is_terminal and (step == total or step % max(1, total // 10) == 0):
                # a log file (SLURM, nohup) gets no live bar: a line every tenth of the steps instead
                self.p.console.print(f"  {info['method']:>10} train {what} step {step}/{total} "
                                     f"loss {info['loss']:.4f}")
        elif kind == "train_end":
            if getattr(self, "train_bar", None) is not None:
                self.p.remove_task(self.train_bar)
                self.train_bar = None
            self.p.console.print(f"  {info['method']:>10} trained on {info['task']} in {info.get('seconds', 0):.1f}s")
        elif kind == "resume":
            self.p.console.print(f"  {info['method']}: resuming after stage {info['stage']}")
