"""Code-generation tasks judged by running the tests in ``harness.sandbox``: HumanEval, MBPP, KodCode, BigCodeBench.

A ``CodeTask`` is a ``DefinedTask`` (versioned YAML, local JSONL or Hub rows) whose rows become ``Example``s with
the test program in ``meta`` and whose score runs the extracted code against those tests in the sandbox:
``metric: pass`` gives 1/0 (its mean over a test set is pass@1 with greedy decoding), ``metric: pass_fraction`` the
share of tests passed (a dense RL reward). ``pass_at_k`` is the unbiased estimator for n samples per problem.

Task options (``options:`` in the YAML): ``timeout_s``, ``memory_mb`` (sandbox limits), ``resplit`` (fractions of
train/validation/test cut from one Hub split with ``split_seed``: KodCode-Light-RL-10K ships only ``train``, and
MemGen splits it 70/10/20), ``rename_first_def`` (MemGen's KodCode scorer renames the first ``def`` to the expected
name when the completion names it differently).

``filter: evalplus`` (instead of ``code``) scores HumanEval/MBPP completions after evalplus's ``sanitize`` (the
code block, then only the imports and the definitions the entry point reaches), for numbers comparable with
published EvalPlus ones; put a copy of the task's YAML with that line (and its own ``name``) in
``$MEMGEN_BENCH_TASKS``.
"""

from __future__ import annotations

import ast
import os
import random
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from harness.sandbox import Outcome, Program, Sandbox, SandboxLimits, default_sandbox
from tasks.base import DefinedTask, Example, TaskDefinition, TaskError

# --- extraction (pure) ----------------------------------------------------------------------------------------

_FENCE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_CODE_START = re.compile(r"^(?:def |async def |class |import |from \S+ import |@\w)")


def defines(code: str, name: str) -> bool:
    """Whether ``code`` defines a top-level-looking function or class called ``name``."""
    return bool(name) and re.search(rf"^\s*(?:async\s+)?(?:def|class)\s+{re.escape(name)}\s*[(:]", code, re.M) is not None


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return True


def _bare_code(text: str) -> str | None:
    """Code without fences: from the first line that starts like code to the longest prefix that parses (trailing
    prose dropped); None when no line looks like code."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if _CODE_START.match(line)), None)
    if start is None:
        return None
    body = lines[start:]
    for end in range(len(body), 0, -1):
        chunk = "\n".join(body[:end]).rstrip()
        if _parses(chunk):
            return chunk + "\n"
    return "\n".join(body).rstrip() + "\n"


def extract_code(text: str, entry_point: str | None = None) -> str:
    """The code in a completion: the fenced block that defines ``entry_point`` (else the first Python or untagged
    block, else the first block; an unclosed last fence runs to the end, as a truncated completion does), else bare
    code, else the completion itself (a function body continuing the prompt)."""
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(text)]
    if blocks:
        if entry_point:
            for _, code in blocks:
                if defines(code, entry_point):
                    return code
        for lang, code in blocks:
            if lang in ("python", "py", "python3", ""):
                return code
        return blocks[0][1]
    bare = _bare_code(text)
    return bare if bare is not None else text


def rename_first_def(code: str, name: str) -> str:
    """MemGen's KodCode rule: when ``name`` is not defined, the first top-level ``def`` is renamed to it."""
    if not name or defines(code, name):
        return code
    return re.sub(r"^def\s+(\w+)\s*\(", f"def {name}(", code, count=1, flags=re.M)


def import_lines(code: str) -> str:
    """The top-level import statements of ``code`` (BigCodeBench's code prompt holds the allowed imports)."""
    return "".join(line + "\n" for line in code.splitlines() if re.match(r"^(?:import |from \S+ import )", line))


# --- evalplus's sanitiser (pure) -------------------------------------------------------------------------------
# evalplus.sanitize (v0.3.1, tree-sitter) ported to ``ast`` by hand: the evalplus package pulls in openai,
# anthropic, google-generativeai and tree-sitter, far too much for one 100-line function. Its quirks are kept so
# numbers stay comparable: the code is the contiguous run of >= 2 lines that parses with the most non-blank
# lines; only top-level imports, classes, functions that contain a ``return`` and assignments survive, the first
# definition of a name wins, decorated definitions are dropped, and with an entry point only the definitions it
# reaches by name are kept.


def code_extract(text: str) -> str:
    """evalplus's ``code_extract``: the span lines[i..j] (j > i) that parses and holds the most non-blank lines
    (the first such span; lines[0] when none parses)."""
    lines = text.split("\n")
    count = [0]  # count[k]: non-blank lines among lines[:k]
    for line in lines:
        count.append(count[-1] + bool(line.strip()))
    best, best_len = (0, 0), 0
    for i in range(len(lines)):
        if count[-1] - count[i] <= best_len:
            break  # no span starting here can be longer
        for j in range(len(lines) - 1, i, -1):  # longest first: the first that parses is this start's best
            if count[j + 1] - count[i] <= best_len:
                break
            if _parses("\n".join(lines[i:j + 1])):
                best, best_len = (i, j), count[j + 1] - count[i]
                break
    return "\n".join(lines[best[0]:best[1] + 1])


def _identifiers(node: ast.AST) -> set[str]:
    """Every identifier in a subtree (names, attributes, parameters, keywords): tree-sitter's identifier nodes."""
    out: set[str] = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            out.add(n.id)
        elif isinstance(n, ast.Attribute):
            out.add(n.attr)
        elif isinstance(n, ast.arg):
            out.add(n.arg)
        elif isinstance(n, ast.keyword) and n.arg:
            out.add(n.arg)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(n.name)
        elif isinstance(n, ast.alias):
            out.update(n.name.split(".") + ([n.asname] if n.asname else []))
        elif isinstance(n, (ast.Global, ast.Nonlocal)):
            out.update(n.names)
    return out


def sanitize(text: str, entry_point: str | None = None) -> str:
    """evalplus's ``sanitize``: imports, then the definitions reachable from ``entry_point`` (all of them without
    one), from the longest parsing span of ``text``; that span itself when nothing survives."""
    code = code_extract(text)
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return code
    imports: list[ast.stmt] = []
    defs: list[tuple[str | None, ast.stmt]] = []
    seen: set[str | None] = set()
    for node in tree.body:
        name: str | None
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imports.append(node)
            continue
        if isinstance(node, ast.ClassDef) and not node.decorator_list:
            name = node.name
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.decorator_list:
            if not any(isinstance(n, ast.Return) for n in ast.walk(node)):
                continue
            name = node.name
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            target = node.targets[0] if isinstance(node, ast.Assign) else node.target
            name = target.id if isinstance(target, ast.Name) else None
        else:
            continue
        if name not in seen:
            seen.add(name)
            defs.append((name, node))
    keep: set[str | None] | None = None
    if entry_point:
        deps = {n: _identifiers(node) for n, node in defs}
        keep, todo = {entry_point}, [entry_point]
        while todo:
            for dep in deps.get(todo.pop(), ()):
                if dep not in keep:
                    keep.add(dep)
                    todo.append(dep)
    parts = [ast.get_source_segment(code, n) or "" for n in imports]
    parts += [ast.get_source_segment(code, n) or "" for name, n in defs if keep is None or name in keep]
    out = "\n".join(parts).strip()
    return out if out else code


# --- pass@k (pure) --------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` pass (Chen et al. 2021): 1 - C(n-c, k) / C(n, k),
    as a product so large ``n`` does not overflow."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """Mean pass@k over problems given (n samples, c correct) per problem."""
    if not counts:
        raise ValueError("mean_pass_at_k needs at least one problem")
    return float(np.mean([pass_at_k(n, c, k) for n, c in counts]))


# --- row adapters: raw rows in each dataset's real column layout -> Example ------------------------------------


def _fence(code: str) -> str:
    return f"```python\n{code.rstrip()}\n```"


def humaneval_row(row: dict[str, Any], d: TaskDefinition) -> Example:
    prompt, entry = str(row["prompt"]), str(row["entry_point"])
    gold = prompt + str(row["canonical_solution"])
    meta = {"kind": "check", "tests": str(row["test"]), "entry_point": entry, "prefix": prompt}
    return Example(id=str(row["task_id"]), question=prompt, answer=gold, target=_fence(gold), meta=meta)


def mbpp_row(row: dict[str, Any], d: TaskDefinition) -> Example:
    tests = [str(t) for t in row["test_list"]]
    if not tests:
        raise ValueError("test_list is empty")
    m = re.search(r"assert\s+(?:not\s+)?\(?\s*(?:set\(|math\.isclose\()?\s*(\w+)\s*\(", tests[0])
    entry = m.group(1) if m else ""
    question = str(row["prompt"]).strip() + " Your code should pass these tests:\n\n" + "\n".join(tests)
    meta = {"kind": "asserts", "tests": tests, "setup": "\n".join(row.get("test_imports") or []),
            "entry_point": entry}
    code = str(row["code"])
    return Example(id=f"mbpp/{row['task_id']}", question=question, answer=code, target=_fence(code), meta=meta)


def kodcode_row(row: dict[str, Any], d: TaskDefinition) -> Example:
    info = row.get("test_info") or []
    entry = str(info[0]["function_name"]) if info and info[0].get("function_name") else ""
    code = str(row["solution"])
    meta = {"kind": "pytest", "tests": str(row["test"]), "entry_point": entry}
    return Example(id=str(row["question_id"]), question=str(row["question"]), answer=code, target=_fence(code),
                   meta=meta)


def bigcodebench_row(row: dict[str, Any], d: TaskDefinition) -> Example:
    code_prompt = str(row["code_prompt"])
    gold = code_prompt + str(row["canonical_solution"])
    meta = {"kind": "unittest", "tests": str(row["test"]), "entry_point": str(row.get("entry_point") or "task_func"),
            "prefix": code_prompt}
    return Example(id=str(row["task_id"]), question=str(row["instruct_prompt"]), answer=gold, target=_fence(gold),
                   meta=meta)


CODE_ADAPTERS: dict[str, Callable[[dict[str, Any], TaskDefinition], Example]] = {
    "humaneval": humaneval_row,
    "mbpp": mbpp_row,
    "kodcode": kodcode_row,
    "bigcodebench": bigcodebench_row,
}


CODE_FILTERS = ("code", "evalplus")
"""``filter:`` of a code task: ``code`` (``extract_code``, completed by the task's context) or ``evalplus``
(evalplus's ``sanitize``, judged as evalplus judges it: the sanitised code alone)."""


def build_program(completion: str, example: Example, rename: bool = False, code_filter: str = "code") -> Program:
    """The sandbox program for a completion: extracted code completed by the task's context (HumanEval's prompt,
    BigCodeBench's imports) where the completion relies on it; with ``code_filter="evalplus"`` the sanitised code
    (of the prompt plus a completion that does not define the entry point itself, as evalplus forms it)."""
    meta = example.meta
    entry = meta.get("entry_point", "")
    kind = meta["kind"]
    prefix = meta.get("prefix", "")
    if code_filter == "evalplus":
        text = rename_first_def(completion, entry) if rename else completion
        if kind == "check" and not defines(text, entry):
            text = prefix + "\n" + text
        code = sanitize(text, entry or None)
        if kind == "check":
            return Program(solution=code, tests=meta["tests"], kind=kind, entry_point=entry)
    else:
        code = extract_code(completion, entry)
        if rename:
            code = rename_first_def(code, entry)
    if kind == "check":
        # A whole function overrides the prompt's docstring-only stub; a bare body continues the prompt.
        solution = prefix + "\n" + code if defines(code, entry) else prefix + code
    elif kind == "unittest":
        solution = import_lines(prefix) + code if defines(code, entry) else prefix + code
    else:
        solution = code
    return Program(solution=solution, tests=meta["tests"], kind=kind, entry_point=entry, setup=meta.get("setup", ""))


def resplit(rows: list[dict[str, Any]], split: str, fractions: dict[str, float], seed: int) -> list[dict[str, Any]]:
    """Cut one list of rows into named parts by ``fractions`` after a fixed-seed shuffle (disjoint, deterministic)."""
    if split not in fractions:
        raise TaskError(f"no split {split!r}; the resplit defines {sorted(fractions)}")
    total = sum(fractions.values())
    if abs(total - 1.0) > 1e-6:
        raise TaskError(f"resplit fractions must sum to 1, got {total} ({fractions})")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    start = 0.0
    for name, frac in fractions.items():
        lo, hi = round(start * len(rows)), round((start + frac) * len(rows))
        if name == split:
            return [rows[i] for i in sorted(order[lo:hi])]
        start += frac
    raise AssertionError("unreachable")


class CodeTask(DefinedTask):
    """A ``Task`` whose score executes the completion's code against the example's tests in the sandbox."""

    METRICS = ("pass", "pass_fraction")

    def __init__(self, definition: TaskDefinition, data_root: str | os.PathLike | None = None,
                 sandbox: Sandbox | None = None):
        # Not DefinedTask.__init__: code tasks use their own extractor and metrics, not tasks.scoring's registries.
        if definition.adapter not in CODE_ADAPTERS:
            raise TaskError(f"task {definition.name}: unknown code adapter {definition.adapter!r}; "
                            f"valid: {sorted(CODE_ADAPTERS)}")
        if definition.filter not in CODE_FILTERS:
            raise TaskError(f"task {definition.name}: unknown code filter {definition.filter!r}; "
                            f"valid: {list(CODE_FILTERS)}")
        if definition.metric not in self.METRICS:
            raise TaskError(f"task {definition.name}: unknown code metric {definition.metric!r}; "
                            f"valid: {list(self.METRICS)}")
        self.definition = definition
        self.name, self.version, self.domain = definition.name, definition.version, definition.domain
        self.max_new_tokens = definition.max_new_tokens
        self._data_root = data_root
        self.options: dict[str, Any] = dict(getattr(definition, "options", None) or {})
        unknown = sorted(set(self.options) - {"timeout_s", "memory_mb", "resplit", "split_seed", "rename_first_def"})
        if unknown:
            raise TaskError(f"task {definition.name}: unknown options {unknown}; valid: timeout_s, memory_mb, "
                            f"resplit, split_seed, rename_first_def")
        base = SandboxLimits()
        self.limits = SandboxLimits(timeout_s=float(self.options.get("timeout_s", base.timeout_s)),
                                    cpu_s=int(self.options.get("timeout_s", base.cpu_s)),
                                    memory_mb=int(self.options.get("memory_mb", base.memory_mb)))
        self._sandbox = sandbox
        self.last_outcomes: list[Outcome] = []

    @property
    def sandbox(self) -> Sandbox:
        if self._sandbox is None:
            self._sandbox = default_sandbox()
        return self._sandbox

    def load(self, split: str, limit: int | None = None, seed: int = 0) -> list[Example]:
        from tasks.base import subsample

        d = self.definition
        rows, origin = self.raw_rows(split)
        if "resplit" in self.options:
            rows = resplit(rows, split, dict(self.options["resplit"]), int(self.options.get("split_seed", 0)))
        adapt = CODE_ADAPTERS[d.adapter]
        examples = []
        for row in subsample(rows, limit, seed):
            try:
                examples.append(adapt(row, d))
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                raise TaskError(f"{origin}:{row.get('_line', '?')}: malformed row for task {d.name} "
                                f"({type(exc).__name__}: {exc}); see tasks/code.py:{d.adapter}_row for the columns"
                                ) from exc
        return examples

    def extract(self, completion: str) -> str | None:
        code = sanitize(completion) if self.definition.filter == "evalplus" else extract_code(completion)
        return code if code.strip() else None

    def program(self, completion: str, example: Example) -> Program:
        return build_program(completion, example, rename=bool(self.options.get("rename_first_def", False)),
                             code_filter=self.definition.filter)

    def outcomes(self, completions: Sequence[str], examples: Sequence[Example]) -> list[Outcome]:
        """Run every completion's program (in parallel on the sandbox's worker pool)."""
        if len(completions) != len(examples):
            raise ValueError(f"{len(completions)} completions for {len(examples)} examples")
        programs = [self.program(c, e) for c, e in zip(completions, examples, strict=True)]
        self.last_outcomes = self.sandbox.run_many(programs, self.limits)
        return self.last_outcomes

    def _value(self, outcome: Outcome) -> float:
        if self.definition.metric == "pass_fraction":
            return outcome.fraction
        return 1.0 if outcome.status == "passed" else 0.0

    def score(self, completion: str, example: Example) -> float:
        return self._value(self.outcomes([completion], [example])[0])

    def score_many(self, completions: Sequence[str], examples: Sequence[Example]) -> list[float]:
        """Scores of many completions at once, run in parallel (the runner scores one at a time)."""
        return [self._value(o) for o in self.outcomes(completions, examples)]

    def pass_at_k(self, samples: Sequence[Sequence[str]], examples: Sequence[Example],
                  ks: Sequence[int] = (1,)) -> dict[str, float]:
        """Mean unbiased pass@k over problems from ``samples[i]``, the n completions sampled for ``examples[i]``."""
        if len(samples) != len(examples):
            raise ValueError(f"{len(samples)} sample lists for {len(examples)} examples")
        flat = [(c, e) for cs, e in zip(samples, examples, strict=True) for c in cs]
        outs = iter(self.outcomes([c for c, _ in flat], [e for _, e in flat]))
        counts = [(len(cs), sum(next(outs).status == "passed" for _ in cs)) for cs in samples]
        return {f"pass@{k}": mean_pass_at_k(counts, k) for k in ks}

    def pass_fraction(self, completion: str, example: Example) -> float:
        """Share of the example's tests the completion passes: the dense reward, whatever ``metric`` says."""
        return self.outcomes([completion], [example])[0].fraction
