"""Row adapters: raw dataset rows -> ``Example``. ``fields`` covers plain column mappings (no code needed for a
new benchmark); the others handle the few datasets whose gold answer must be derived from a rationale."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from tasks.base import Example, TaskDefinition, render_template
from tasks.scoring import extract_boxed


def _id(row: dict[str, Any], d: TaskDefinition) -> str:
    for key in ("id", "unique_id", "task_id"):
        if key in row:
            return str(row[key])
    return f"{d.name}-{row.get('_line', 0)}"


def _column(row: dict[str, Any], spec: str, d: TaskDefinition) -> str:
    """A column of the row, or a template over its columns when ``spec`` holds braces (``"{Body} {Question}"``)."""
    if "{" in spec:
        return render_template(spec, {k: v for k, v in row.items() if k != "_line"}, f"task {d.name}")
    return str(row[spec])


def fields(row: dict[str, Any], d: TaskDefinition) -> Example:
    f = {"question": "question", "answer": "answer", **d.fields}
    answer = _column(row, f["answer"], d)
    target = _column(row, f["target"], d) if "target" in f else answer
    return Example(id=_id(row, d), question=_column(row, f["question"], d), answer=answer, target=target)


def gsm8k(row: dict[str, Any], d: TaskDefinition) -> Example:
    rationale, _, final = str(row["answer"]).rpartition("####")
    if not _:
        raise ValueError("answer has no '####' line")
    final = final.strip().replace(",", "")
    # Drop the <<48/2=24>> calculator annotations: they are not part of natural reasoning.
    steps = re.sub(r"<<[^>]*>>", "", rationale).strip()
    target = f"{steps}\nThe final answer is \\boxed{{{final}}}."
    return Example(id=_id(row, d), question=str(row["question"]), answer=final, target=target)


def gsm8k_paper(row: dict[str, Any], d: TaskDefinition) -> Example:
    """GSM8K as the MemGen public code trains it: the rationale with its <<48/2=24>> calculator annotations kept,
    then the boxed final answer."""
    rationale, _, final = str(row["answer"]).rpartition("####")
    if not _:
        raise ValueError("answer has no '####' line")
    final = final.strip().replace(",", "")
    target = f"{rationale.strip()}\nThe final answer is \\boxed{{{final}}}."
    return Example(id=_id(row, d), question=str(row["question"]), answer=final, target=target)


def math(row: dict[str, Any], d: TaskDefinition) -> Example:
    solution = str(row["solution"])
    answer = str(row["answer"]) if row.get("answer") is not None else extract_boxed(solution)
    if answer is None:
        raise ValueError("solution has no \\boxed{} answer")
    meta = {k: row[k] for k in ("level", "type", "subject") if k in row}
    return Example(id=_id(row, d), question=str(row["problem"]), answer=answer, target=solution, meta=meta)


def aqua(row: dict[str, Any], d: TaskDefinition) -> Example:
    options = row["options"]
    if not isinstance(options, list) or not options:
        raise ValueError("options must be a non-empty list")
    question = str(row["question"]).strip() + "\nOptions:\n" + "\n".join(str(o) for o in options)
    letter = str(row["correct"]).strip().upper()
    if letter not in "ABCDE" or len(letter) != 1:
        raise ValueError(f"correct must be a letter A-E, got {row['correct']!r}")
    target = f"{str(row.get('rationale', '')).strip()}\nThe answer is \\boxed{{{letter}}}."
    return Example(id=_id(row, d), question=question, answer=letter, target=target.strip())


ADAPTERS: dict[str, Callable[[dict[str, Any], TaskDefinition], Example]] = {
    "fields": fields,
    "gsm8k": gsm8k,
    "gsm8k_paper": gsm8k_paper,
    "math": math,
    "aqua": aqua,
}
