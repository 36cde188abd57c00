"""Optional installs: which extra of ``pip install memgen-bench[...]`` a method or task needs, checked up front.

The core install covers ``vanilla``, ``sft``, ``memgen`` (and ``reinforce_pp``, which needs only torch) on the
text tasks. A method or task whose extra is missing fails before anything runs, with one line naming the extra.
Modules are looked up with ``importlib.util.find_spec`` (nothing is imported, so the check costs milliseconds).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from harness.config import ConfigError

# extra -> the import names it provides (pyproject.toml [project.optional-dependencies])
EXTRAS: dict[str, tuple[str, ...]] = {
    "rl": ("trl",),
    "retrieval": ("sentence_transformers", "bm25s", "faiss"),
    "agents": ("textworld_express",),
    "code": ("pytest",),
    "tracking": ("tensorboard", "wandb"),
    "deepspeed": ("deepspeed",),
}
# method -> extra (methods not named need only the core install)
METHOD_EXTRAS: dict[str, str] = {"grpo": "rl", "expel": "retrieval", "awm": "retrieval"}
# task implementation module -> extra
TASK_EXTRAS: dict[str, str] = {"tasks.envs.textworld_express": "agents", "tasks.qa:OpenQATask": "retrieval",
                               "tasks.code": "code"}


class ExtraMissingError(ConfigError):
    """A method, task or option needs an optional install that is missing."""


def available(module: str) -> bool:
    """Whether ``module`` can be imported (a ``None`` in ``sys.modules`` blocks an import, as Python documents)."""
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(extra: str, modules: Sequence[str] | None, what: str) -> None:
    """Raise ``ExtraMissingError`` naming ``extra`` when one of ``modules`` (default: the extra's) is missing."""
    missing = [m for m in (modules or EXTRAS[extra]) if not available(m)]
    if missing:
        raise ExtraMissingError(f"{what} needs the [{extra}] extra (module {missing[0]} is missing): "
                                f"pip install 'memgen-bench[{extra}]'")


def task_extra(implementation: str | None) -> str | None:
    if not implementation:
        return None
    for key, extra in TASK_EXTRAS.items():
        if implementation == key or implementation.split(":")[0] == key:
            return extra
    return None


def check_extras(methods: Iterable[str], tasks: Iterable[Any], method_options: dict[str, dict[str, Any]],
                 report_to: str = "none") -> None:
    """Every extra the run needs is installed: its methods', its tasks', MemGen's retrieval and the tracker's."""
    for m in methods:
        if m in METHOD_EXTRAS:
            require(METHOD_EXTRAS[m], None, f"method {m}")
    if "memgen" in methods and (method_options.get("memgen", {}) or {}).get("retrieval_k"):
        require("retrieval", ("sentence_transformers", "bm25s"), "method_options.memgen.retrieval_k")
    for t in tasks:
        d = getattr(t, "definition", None)
        extra = task_extra(getattr(d, "implementation", None))
        if extra == "retrieval" and not (getattr(d, "options", {}) or {}).get("corpus"):
            extra = None  # open QA is closed-book without a search corpus: no BM25
        if extra is not None:
            require(extra, None, f"task {t.name}")
    if report_to != "none":
        require("tracking", (report_to,), f"--report-to {report_to}")
