"""Symbolic equivalence of two MATH answers with ``math-verify`` (the checker behind TRL's ``accuracy_reward``),
bounded in time wherever it is called.

math-verify parses both answers to SymPy and compares them (numbers, fractions, roots, sets, intervals, tuples,
equations, matrices). SymPy can take arbitrarily long on a hostile answer (``9^{9^{9^{9}}}``), and math-verify's own
timeout is ``signal.alarm``, which Python only allows in the main thread (TRL switches the timeout off elsewhere,
leaving the call unbounded). So:

- in the main thread the whole check (two parses and the comparison) runs in-process under one math-verify
  ``timeout`` of ``timeout_s`` seconds (rounded up to whole seconds: ``signal.alarm`` counts whole seconds);
- in any other thread it runs in a child interpreter (``python -m tasks.math_equivalence``) that is killed when it
  does not answer within ``timeout_s`` seconds, and restarted on the next call. That bound holds even inside a C
  call that never returns to the interpreter, which no in-thread timeout can interrupt.

A timeout counts as "not equivalent" (score 0), as in math-verify and TRL. Importing math-verify and building its
parsers (seconds, once per process) happens outside the bound. Results are cached: RL groups score the same few
answers many times.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import select
import subprocess
import sys
import threading
from functools import lru_cache
from pathlib import Path

DEFAULT_TIMEOUT_S = 5.0
"""Wall-clock bound on one equivalence check (parse gold, parse prediction, compare)."""

_ROOT = Path(__file__).resolve().parent.parent  # the folder that holds the ``tasks`` package
_START_TIMEOUT_S = 120.0  # the child imports sympy once (seconds on a busy machine); not part of an answer's bound


def _quiet() -> None:
    # math-verify logs a warning per timeout and "timeout disabled" once; the score already says it all.
    for name in ("math_verify", "math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _wrap(answer: str) -> str:
    r"""An extracted answer as math-verify expects a LaTeX answer to appear: in a ``\boxed{}`` (tried first)."""
    return f"\\boxed{{{answer}}}"


def _check(pred: str, gold: str) -> bool:
    """The unbounded check (callers bound it): ``verify(parse(gold), parse(pred))``; the order matters to
    math-verify (gold first: an assignment ``x = 3`` in the prediction matches a gold ``3``)."""
    from math_verify import parse, verify

    _quiet()
    g = parse(_wrap(gold), parsing_timeout=None)
    if not g:
        return False
    p = parse(_wrap(pred), parsing_timeout=None)
    return bool(p) and bool(verify(g, p, timeout_seconds=None))


@lru_cache(maxsize=1)
def _warm() -> None:
    """Import math-verify and build its parsers (seconds, once) outside any answer's time bound."""
    _check(r"\frac{1}{2}", "0.5")


def _check_in_process(pred: str, gold: str, timeout_s: float) -> bool:
    from math_verify.errors import TimeoutException
    from math_verify.utils import timeout

    _warm()
    try:
        return timeout(timeout_seconds=max(1, math.ceil(timeout_s)))(_check)(pred, gold)
    except TimeoutException:
        return False
    except Exception:  # noqa: BLE001 - SymPy raises many kinds of errors on malformed answers: not equivalent
        return False


class _Worker:
    """One child interpreter that answers ``pred\\tgold`` lines (escaped) with ``1``/``0``, serialised by a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None
        self._pid = 0  # the parent that started it (a forked child must start its own)

    def _start(self) -> subprocess.Popen[str]:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(_ROOT), os.environ.get("PYTHONPATH")) if p))
        proc = subprocess.Popen([sys.executable, "-m", "tasks.math_equivalence"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env=env, bufsize=1)
        if self._readline(proc, _START_TIMEOUT_S) != "ready":
            proc.kill()
            proc.wait()
            raise RuntimeError("the math-verify worker (python -m tasks.math_equivalence) did not start; "
                               "check that math-verify is installed (pip install math-verify)")
        return proc

    @staticmethod
    def _readline(proc: subprocess.Popen[str], timeout_s: float) -> str | None:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
        return proc.stdout.readline().strip() if ready else None

    def stop(self) -> None:
        if self._proc is not None and self._pid == os.getpid():
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def check(self, pred: str, gold: str, timeout_s: float) -> bool:
        with self._lock:
            if self._proc is None or self._pid != os.getpid() or self._proc.poll() is not None:
                self._proc, self._pid = self._start(), os.getpid()
            assert self._proc.stdin is not None
            self._proc.stdin.write(f"{_escape(pred)}\t{_escape(gold)}\n")
            self._proc.stdin.flush()
            reply = self._readline(self._proc, timeout_s)
            if reply is None:  # over the bound: kill it; the next call starts a fresh one
                self.stop()
                return False
            return reply == "1"


def _escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


def _unescape(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 1 < len(s):
            out.append({"t": "\t", "n": "\n"}.get(s[i + 1], s[i + 1]))
            i += 2
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


_WORKER = _Worker()
atexit.register(_WORKER.stop)


@lru_cache(maxsize=65536)
def _cached(pred: str, gold: str, timeout_s: float, main: bool) -> bool:
    return _check_in_process(pred, gold, timeout_s) if main else _WORKER.check(pred, gold, timeout_s)


def equivalent(pred: str, gold: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """True when math-verify finds ``pred`` equal to ``gold``; False when not, on a parse failure or past
    ``timeout_s`` seconds (any thread)."""
    if not pred.strip() or not gold.strip():
        return False
    return _cached(pred, gold, float(timeout_s), threading.current_thread() is threading.main_thread())


def _serve() -> None:
    """The child's loop: one ``pred\\tgold`` line in, ``1``/``0`` out, until stdin closes."""
    # Replies go to a private copy of stdout; anything a library prints goes to stderr and cannot shift them.
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    _warm()  # before saying ready, so that answers are timed alone
    print("ready", file=replies, flush=True)
    for line in sys.stdin:
        pred, _, gold = line.rstrip("\n").partition("\t")
        try:
            ok = _check(_unescape(pred), _unescape(gold))
        except Exception:  # noqa: BLE001 - as in _check_in_process
            ok = False
        print("1" if ok else "0", file=replies, flush=True)


if __name__ == "__main__":
    _serve()
