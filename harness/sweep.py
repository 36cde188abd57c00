"""Sweeps: a grid of methods x task orders x seeds, one run directory per cell.

The grid comes from a YAML file (or CLI options)::

    base: {model: smollm2-135m, limit: 32, train: {max_steps: 48}}   # RunConfig fields shared by every cell
    sequence: quick            # the task list whose orders are swept
    orders: latin              # "given", "latin" (balanced Latin square rows) or an explicit list of lists
    n_orders: 2                # how many Latin-square rows (default: all)
    methods: [vanilla, sft]
    seeds: [0, 1]

Cell directories are ``<out>/<order a-b-c>/seed<S>/<method>``: ``memgen-bench report <out>`` finds them all. A cell
whose summary says ``complete`` is skipped; an unfinished one resumes. Cells can run here one after another, or be
emitted as one ``accelerate launch`` command line each plus a SLURM array script.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.config import ConfigError, RunConfig, from_dict, to_dict
from harness.methods import check_methods
from harness.store import atomic_write_text, read_json
from tasks.registry import resolve_sequence, sequence_probes


@dataclass(frozen=True)
class SweepCell:
    order: tuple[str, ...]
    seed: int
    method: str
    run_dir: Path

    @property
    def sequence(self) -> str:
        return ",".join(self.order)

    def complete(self) -> bool:
        p = self.run_dir / "summary.json"
        return p.exists() and bool(read_json(p).get("complete"))


@dataclass(frozen=True)
class SweepSpec:
    """A grid of runs."""

    base: dict[str, Any] = field(default_factory=dict)
    """RunConfig fields shared by every cell (sequence, methods, seed and out are set per cell)."""
    sequence: str = "quick"
    """Named sequence or inline task list whose orders are swept."""
    orders: Any = "given"
    """"given", "latin", or an explicit list of task lists."""
    n_orders: int | None = None
    """Number of Latin-square rows to use (None = all)."""
    methods: tuple[str, ...] = ("vanilla", "sft")
    """Methods run in every (order, seed)."""
    seeds: tuple[int, ...] = (0,)
    """Master seeds."""


def parse_seeds(value: Any) -> tuple[int, ...]:
    """``"0,1,2"`` or ``[0, 1, 2]`` -> (0, 1, 2); a one-line error names anything that is not an integer."""
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, list | tuple) else [value]
    out = []
    for s in items:
        try:
            if isinstance(s, bool) or isinstance(s, float) and not s.is_integer():
                raise ValueError
            out.append(int(str(s).strip()) if isinstance(s, str) else int(s))
        except (TypeError, ValueError):
            raise ConfigError(f"bad seed {s!r} in seeds {value!r}: use comma-separated integers, e.g. 0,1,2") from None
    if not out:
        raise ConfigError(f"no seeds in {value!r}: use comma-separated integers, e.g. 0,1,2")
    return tuple(out)


def load_spec(path: str | Path | None, overrides: dict[str, Any]) -> SweepSpec:
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"sweep file not found: {p}")
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: a sweep file must be a YAML mapping")
    data.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(data) - set(SweepSpec.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"unknown sweep key(s) {unknown}; valid: {sorted(SweepSpec.__dataclass_fields__)}")
    if isinstance(data.get("methods"), str):
        data["methods"] = data["methods"].split(",")
    spec = SweepSpec(**{**data, "methods": tuple(data.get("methods", SweepSpec.methods)),
                        "seeds": parse_seeds(data.get("seeds", SweepSpec.seeds))})
    check_methods(spec.methods)
    for key in ("sequence", "methods", "seed", "out"):
        if key in spec.base:
            raise ConfigError(f"sweep base sets {key!r}, which the sweep sets per cell; remove it from base")
    from_dict(RunConfig, spec.base)  # validate the shared part up front, with clear errors
    return spec


def orders_of(spec: SweepSpec) -> list[list[str]]:
    from harness.analysis.orders import task_orders

    if isinstance(spec.orders, list):
        return [resolve_sequence(",".join(o) if isinstance(o, list) else str(o)) for o in spec.orders]
    return task_orders(resolve_sequence(spec.sequence), spec.n_orders, spec.orders)


def cells(spec: SweepSpec, out: Path) -> list[SweepCell]:
    return [
        SweepCell(tuple(order), seed, method, out / "-".join(order) / f"seed{seed}" / method)
        for order in orders_of(spec)
        for seed in spec.seeds
        for method in spec.methods
    ]


def shared_base(spec: SweepSpec, out: Path) -> dict[str, Any]:
    """The base config with one evaluation cache for every cell (row 0 is then computed once per seed, whatever the
    order or method), unless the base names its own ``eval.cache_dir``."""
    ev = dict(spec.base.get("eval") or {})
    ev.setdefault("cache_dir", str(out / "eval-cache"))
    base = {**spec.base, "eval": ev}
    if base.get("probes") is None:  # the cells run inline orders, which name no probes: keep the sequence's own
        base["probes"] = sequence_probes(spec.sequence)
    return base


def cell_config(spec: SweepSpec, cell: SweepCell) -> RunConfig:
    return from_dict(RunConfig, {**shared_base(spec, cell.run_dir.parents[2]), "sequence": cell.sequence,
                                 "methods": [cell.method], "seed": cell.seed, "out": str(cell.run_dir.parent)})


def write_base_config(spec: SweepSpec, out: Path) -> Path:
    path = out / "sweep_base.yaml"
    base = {k: v for k, v in to_dict(from_dict(RunConfig, shared_base(spec, out))).items()
            if k not in ("sequence", "methods", "seed", "out")}
    atomic_write_text(path, yaml.safe_dump(base, sort_keys=False))
    return path


def launch_commands(spec: SweepSpec, out: Path, num_processes: int, config_file: str | None = None) -> list[str]:
    """One ``accelerate launch`` line per unfinished cell."""
    base = write_base_config(spec, out)
    launcher = ["accelerate", "launch", "--num_processes", str(num_processes)]
    if config_file:
        launcher += ["--config_file", config_file]
    elif num_processes > 1:
        # torchrun-style data parallelism (one process per GPU; on CPU prefix ACCELERATE_USE_CPU=true, since
        # accelerate's --cpu launcher starts a single process) and a free port, so array tasks sharing a node
        # do not collide.
        launcher += ["--multi_gpu", "--main_process_port", "0"]
    lines = []
    for c in cells(spec, out):
        if c.complete():
            continue
        cmd = [*launcher, "-m", "harness.cli", "run", "--config", str(base), "--sequence", c.sequence,
               "--methods", c.method, "--seed", str(c.seed), "--out", str(c.run_dir.parent)]
        lines.append(shlex.join(cmd))
    return lines


def slurm_script(commands_file: Path, n: int, gpus: int) -> str:
    return f"""#!/bin/bash
#SBATCH --job-name=memgen-bench-sweep
#SBATCH --array=0-{max(n - 1, 0)}
#SBATCH --gpus-per-task={gpus}
#SBATCH --output=slurm-%A_%a.out
# One array task per sweep cell; each line of {commands_file.name} is one `accelerate launch` command.
set -euo pipefail
cmd=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(str(commands_file))})
echo "$cmd"
eval "$cmd"
"""
