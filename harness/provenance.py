"""Provenance checks across runs: ``memgen-bench report`` warns when the runs it aggregates differ in what their
meta.json and cells record (model commit and dtype, chat template and special tokens, each task's data source,
generation settings per task, GPU/CUDA/driver), so a table never silently mixes incomparable runs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# (label, path of keys into meta.json)
META_FIELDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("model commit", ("model", "commit")),
    ("model dtype", ("model", "dtype")),
    ("model_args", ("model", "model_args")),
    ("chat template", ("chat_template", "sha256")),
    ("special tokens", ("chat_template", "special_tokens")),
    ("data sources", ("data",)),
    ("GPU", ("hardware", "nvidia_gpu_models")),
    ("CUDA", ("hardware", "cuda_runtime_version")),
    ("driver", ("hardware", "nvidia_driver_version")),
    ("torch", ("hardware", "torch_version")),
)


def _get(d: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _generation(run: Path) -> dict[str, Any]:
    """task -> the generation settings of its cells (the first cell that records them)."""
    out: dict[str, Any] = {}
    for cell in sorted((run / "cells").glob("r*_*.json")):
        d = json.loads(cell.read_text())
        if "generation" in d and d.get("task") not in out:
            out[d["task"]] = d["generation"]
    return out


def provenance_warnings(runs: Sequence[Path]) -> list[str]:
    """One line per recorded field in which the runs differ (runs that do not record a field are left out of
    that comparison), naming a run for each value."""
    if len(runs) < 2:
        return []
    metas = {r: json.loads((r / "meta.json").read_text()) if (r / "meta.json").exists() else {} for r in runs}
    fields: list[tuple[str, dict[Path, Any]]] = [
        (label, {r: _get(m, path) for r, m in metas.items()}) for label, path in META_FIELDS]
    fields.append(("generation settings", {r: _generation(r) or None for r in runs}))
    lines = []
    for label, values in fields:
        seen: dict[str, Path] = {}
        for run, value in values.items():
            if value is not None:
                seen.setdefault(json.dumps(value, sort_keys=True), run)
        if len(seen) > 1:
            examples = "; ".join(f"{str(v)[:60]} in {r}" for v, r in list(seen.items())[:3])
            lines.append(f"warning: the runs differ in {label} ({len(seen)} values: {examples})")
    return lines
