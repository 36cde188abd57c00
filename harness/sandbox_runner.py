"""The trusted stub that runs *inside* the sandbox: load the untrusted solution, run the tests, report a verdict.

``harness.sandbox`` copies this file into the sandbox's fresh working directory and starts it as
``python -I -B runner.py`` under the unprivileged sandbox uid. It reads the nonce from stdin (then stdin is
replaced by /dev/null), reads ``spec.json``, lowers its own rlimits (and, without a network namespace, installs an
audit hook refusing sockets) and only then executes untrusted code. The verdict is one JSON line on the
inherited fd ``spec["result_fd"]`` carrying the nonce; the harness accepts a pass only with the right nonce, a
zero exit status and ``passed == total > 0``, so ``sys.exit(0)``, ``os._exit(0)``, an ``atexit`` hook or a crash
before the tests ran can never look like a pass.

Stdlib only (it runs before anything else is trusted). Everything the verdict depends on is bound to local
variables before untrusted code runs, so replacing module attributes (``os.write``, this module's globals,
``sys.exit``) cannot change it; builtins and the ``unittest`` classes are restored before every test. Limits of
what an in-process check can guarantee are listed in harness/sandbox.py.

Test kinds (``spec["kind"]``):
- ``check``: HumanEval; the test code defines ``check(candidate)``; one test, ``check(<entry point>)``.
- ``asserts``: MBPP; every string in ``spec["tests"]`` is one assert statement, one test each.
- ``pytest``: KodCode; pytest-style ``test_*`` functions (and ``Test*`` classes) in a module that may
  ``from solution import ...``; ``pytest.mark.parametrize`` is expanded; fixtures are not supported.
- ``unittest``: BigCodeBench; ``unittest.TestCase`` subclasses defined by the test code, one test per method.
"""

from __future__ import annotations

import builtins
import json
import os
import resource
import sys
import types
import unittest

# Classes whose attributes are restored before every test: the test machinery of the ``unittest`` kind.
_PROTECTED = (unittest.TestCase, unittest.TestResult, unittest.TestSuite, unittest.TestLoader,
              unittest.TextTestRunner, unittest.FunctionTestCase)


def _set_limits(limits: dict) -> None:
    for name, value in limits.items():
        res = getattr(resource, name)
        soft, hard = resource.getrlimit(res)
        # CPU: the soft limit sends SIGXCPU (reported as a timeout); the hard limit one second later SIGKILLs a
        # program that ignores it. Equal limits would SIGKILL at once, indistinguishable from an OOM kill.
        target = value + 1 if name == "RLIMIT_CPU" else value
        # Lower only: an unprivileged process may not raise a hard limit.
        hard = target if hard == resource.RLIM_INFINITY else min(hard, target)
        resource.setrlimit(res, (min(value, hard), hard))


def _socket_blocker(event: str, args: tuple) -> None:
    """Audit hook for the fallback mode (no network namespace): refuse to create or use sockets."""
    if event in ("socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo"):
        raise PermissionError("sandbox: network access is blocked")


def _snapshot(classes: tuple) -> list[tuple[type, dict]]:
    return [(cls, dict(vars(cls))) for cls in classes]


def _restore(snap: list[tuple[type, dict]], builtins_dict: dict, saved_builtins: dict) -> None:
    """Undo changes to the protected classes and to builtins (the audit hooks of 3.11 do not see type setattr)."""
    for cls, attrs in snap:
        current = dict(vars(cls))
        for name in current.keys() - attrs.keys():
            delattr(cls, name)
        for name, value in attrs.items():
            if current.get(name) is not value:
                setattr(cls, name, value)
    if builtins_dict != saved_builtins:
        builtins_dict.clear()
        builtins_dict.update(saved_builtins)


def _parametrize(fn) -> list[tuple[str, dict]]:
    """pytest's ``parametrize`` marks as (id, kwargs) pairs; the cross product when stacked."""
    cases: list[tuple[str, dict]] = [("", {})]
    for mark in getattr(fn, "pytestmark", []) or []:
        if getattr(mark, "name", "") != "parametrize":
            continue
        names, values = mark.args[0], mark.args[1]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        new = []
        for cid, kw in cases:
            for i, v in enumerate(values):
                v = getattr(v, "values", v)  # pytest.param(...)
                vals = (v,) if len(names) == 1 else tuple(v)
                new.append((f"{cid}[{i}]", {**kw, **dict(zip(names, vals, strict=True))}))
        cases = new
    return cases


def main() -> None:
    # Bind everything the verdict needs before any untrusted code runs.
    write, exit_now, dumps, getpid = os.write, os._exit, json.dumps, os.getpid
    base_exc, str_ = BaseException, str
    loader_cls, result_cls, case_cls = unittest.TestLoader, unittest.TestResult, unittest.TestCase
    parametrize, restore, snap = _parametrize, _restore, _snapshot(_PROTECTED)
    nonce = sys.stdin.readline().strip()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    with open("spec.json", encoding="utf-8") as fh:
        spec = json.load(fh)
    os.unlink("spec.json")
    result_fd = int(spec["result_fd"])
    sys.path.extend(p for p in spec.get("sys_path", []) if p not in sys.path)  # the harness venv's site-packages
    _set_limits({k: int(v) for k, v in spec["rlimits"].items()})
    me = getpid()
    streams = (sys.stdout, sys.stderr)
    results: list[tuple[str, bool, str]] = []

    def report(error: str = "") -> None:
        if getpid() != me:  # a forked child of the solution never reports
            exit_now(1)
        for stream in (*streams, sys.stdout, sys.stderr):  # os._exit skips the flush at exit
            try:
                stream.flush()
            except base_exc:  # noqa: BLE001, S110 - a broken stream is the solution's doing
                pass
        passed = sum(1 for _, ok, _ in results if ok)
        fails = [f"{name}: {why}" for name, ok, why in results if not ok][:5]
        line = dumps({"nonce": nonce, "passed": passed, "total": len(results), "error": error, "failures": fails})
        write(result_fd, (line + "\n").encode())
        exit_now(0)

    def describe(exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}"
        return text[:300]

    if spec.get("block_sockets"):
        sys.addaudithook(_socket_blocker)
    builtins_dict, saved_builtins = builtins.__dict__, dict(builtins.__dict__)

    def reset() -> None:
        restore(snap, builtins_dict, saved_builtins)
    solution = types.ModuleType("solution")
    solution.__file__ = os.path.abspath("solution.py")
    sys.modules["solution"] = solution
    try:
        exec(compile(spec["solution"], "solution.py", "exec"), solution.__dict__)
    except base_exc as exc:  # noqa: BLE001 - anything, SystemExit included, is the solution's failure
        report(f"solution raised {describe(exc)}")
    # Undo whatever the solution did to builtins and to unittest before the (trusted) tests run, and again before
    # every test. What the solution changes while a test is calling it stays changed for that test.
    reset()
    kind = spec["kind"]
    try:
        if kind == "check":
            exec(compile(spec["tests"], "tests.py", "exec"), solution.__dict__)
            check, candidate = solution.__dict__["check"], solution.__dict__[spec["entry_point"]]
            try:
                reset()
                check(candidate)
                results.append(("check", True, ""))
            except base_exc as exc:  # noqa: BLE001
                results.append(("check", False, describe(exc)))
        elif kind == "asserts":
            exec(compile(spec.get("setup", ""), "setup.py", "exec"), solution.__dict__)
            for i, stmt in enumerate(spec["tests"]):
                try:
                    reset()
                    exec(compile(stmt, f"test_{i}.py", "exec"), solution.__dict__)
                    results.append((f"assert_{i}", True, ""))
                except base_exc as exc:  # noqa: BLE001
                    results.append((f"assert_{i}", False, describe(exc)))
        elif kind == "pytest":
            mod = types.ModuleType("test_solution")
            sys.modules["test_solution"] = mod
            exec(compile(spec["tests"], "test_solution.py", "exec"), mod.__dict__)
            tests = []
            for name, obj in list(mod.__dict__.items()):
                if name.startswith("test") and callable(obj) and not isinstance(obj, type):
                    tests.append((name, obj))
                elif name.startswith("Test") and isinstance(obj, type):
                    for m in sorted(vars(obj)):
                        if m.startswith("test"):
                            tests.append((f"{name}.{m}", getattr(obj(), m)))
            for name, fn in tests:
                for cid, kwargs in parametrize(fn):
                    try:
                        reset()
                        fn(**kwargs)
                        results.append((name + cid, True, ""))
                    except base_exc as exc:  # noqa: BLE001
                        results.append((name + cid, False, describe(exc)))
        elif kind == "unittest":
            exec(compile(spec["tests"], "tests.py", "exec"), solution.__dict__)
            loader = loader_cls()
            for obj in list(solution.__dict__.values()):
                if isinstance(obj, type) and issubclass(obj, case_cls) and obj is not case_cls:
                    for case in loader.loadTestsFromTestCase(obj):
                        reset()
                        res = result_cls()
                        case.run(res)
                        bad = res.failures + res.errors + [(c, "unexpected success") for c in
                                                           res.unexpectedSuccesses]
                        why = str_(bad[0][1]).strip().splitlines()[-1][:300] if bad else ""
                        results.append((case.id(), not bad and res.testsRun == 1, why))
        else:
            report(f"unknown test kind {kind!r}")
    except base_exc as exc:  # noqa: BLE001 - broken tests or a solution that breaks them: a failure
        report(f"tests raised {describe(exc)}")
    report()


if __name__ == "__main__":
    main()
