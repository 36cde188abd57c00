"""Task and sequence registry: versioned YAML definitions under ``tasks/definitions`` (plus any folder named by
``$MEMGEN_BENCH_TASKS``, so users add benchmarks without code) and named sequences under ``tasks/sequences``."""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import yaml

from tasks.base import DefinedTask, Task, TaskDefinition, TaskError, is_jinja

HERE = Path(__file__).parent


def _definition_dirs() -> list[Path]:
    dirs = [HERE / "definitions"]
    extra = os.environ.get("MEMGEN_BENCH_TASKS")
    if extra:
        dirs += [Path(p) for p in extra.split(os.pathsep) if p]
    return dirs


def parse_definition(path: Path) -> TaskDefinition:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise TaskError(f"{path}: malformed YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise TaskError(f"{path}: a task definition must be a YAML mapping")
    known = {f.name for f in dataclasses.fields(TaskDefinition)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise TaskError(f"{path}: unknown keys {unknown}; valid keys: {sorted(known)}")
    until = raw.get("until", [])
    if not isinstance(until, list) or not all(isinstance(u, str) and u for u in until):
        raise TaskError(f"{path}: until must be a list of non-empty stop strings, e.g. until: [\"Question:\"]")
    shots = raw.get("num_fewshot", 0)
    if not isinstance(shots, int) or isinstance(shots, bool) or shots < 0:
        raise TaskError(f"{path}: num_fewshot must be an integer >= 0, got {shots!r}")
    for key in ("instruction", "hub_revision", "prompt"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise TaskError(f"{path}: {key} must be a string, got {raw[key]!r}")
    if isinstance(raw.get("prompt"), str) and is_jinja(raw["prompt"]):
        import jinja2

        try:
            jinja2.Environment().parse(raw["prompt"])
        except jinja2.TemplateSyntaxError as exc:
            raise TaskError(f"{path}: bad Jinja2 prompt template (line {exc.lineno}: {exc.message})") from exc
    try:
        raw["version"] = str(raw["version"])
        return TaskDefinition(**raw)
    except (TypeError, KeyError) as exc:
        raise TaskError(f"{path}: incomplete task definition ({exc}); needs name, version, domain, prompt, "
                        f"filter, metric") from exc


@cache
def _definitions_cached(dirs: tuple[Path, ...]) -> dict[str, TaskDefinition]:
    defs: dict[str, TaskDefinition] = {}
    for d in dirs:
        for path in sorted(d.glob("*.yaml")):
            td = parse_definition(path)
            defs[td.name] = td
    return defs


def definitions() -> dict[str, TaskDefinition]:
    return _definitions_cached(tuple(_definition_dirs()))


def task_names() -> list[str]:
    return sorted(definitions())


def get_task(name: str, data_root: str | os.PathLike | None = None) -> Task:
    defs = definitions()
    if name not in defs:
        raise TaskError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(defs))}")
    d = defs[name]
    if d.implementation:
        module, _, attr = d.implementation.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        return cls(d, data_root)
    return DefinedTask(d, data_root)


@cache
def sequences() -> dict[str, dict]:
    out = {}
    for path in sorted((HERE / "sequences").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        out[raw["name"]] = raw
    return out


def resolve_sequence(spec: str) -> list[str]:
    """A named sequence (``quick``) or an inline list: ``arith,reverse`` or ``arith->reverse->choice``."""
    seqs = sequences()
    if spec in seqs:
        names = list(seqs[spec]["tasks"])
    else:
        names = [s.strip() for s in re.split(r"\s*(?:->|,|>)\s*", spec) if s.strip()]
        if len(names) == 1 and names[0] not in definitions():
            raise TaskError(f"unknown sequence or task {spec!r}; sequences: {', '.join(sorted(seqs))}; "
                            f"tasks: {', '.join(task_names())}")
    unknown = [n for n in names if n not in definitions()]
    if unknown:
        raise TaskError(f"unknown task(s) {unknown} in sequence {spec!r}; valid tasks: {', '.join(task_names())}")
    if len(set(names)) != len(names):
        raise TaskError(f"sequence {spec!r} repeats a task; each task may appear once")
    return names


def sequence_probes(spec: str) -> list[str]:
    """The ``probes`` a named sequence's YAML lists (tasks evaluated in every row, never trained); [] for an inline
    sequence or a sequence without probes."""
    raw = sequences().get(spec) or {}
    return [str(p) for p in raw.get("probes") or []]


def resolve_probes(sequence: str, probes: Sequence[str] | None) -> list[str]:
    """The probes of a run: ``probes`` as given (``()`` = none), or the named sequence's when None. A probe must be
    a known task, named once, and not a task the sequence trains on (a probe is never trained)."""
    names = sequence_probes(sequence) if probes is None else [str(p) for p in probes]
    unknown = [n for n in names if n not in definitions()]
    if unknown:
        raise TaskError(f"unknown probe task {unknown[0]!r}; valid tasks: {', '.join(task_names())}")
    if len(set(names)) != len(names):
        raise TaskError(f"probes {names} name a task twice; name each probe once")
    trained = resolve_sequence(sequence)
    clash = [n for n in names if n in trained]
    if clash:
        raise TaskError(f"probe {clash[0]!r} is also a trained task of sequence {sequence!r}; a probe is never "
                        f"trained on: drop it from the probes (--probes, probes:) or use another task")
    return names
