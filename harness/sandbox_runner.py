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
- ``pytest``: KodCode; the test code is written to ``test_solution.py`` (it may ``from solution import ...``) and
  run by real ``pytest`` in-process (fixtures, marks, parametrize, assertion rewriting), without conftest files,
  ini files or third-party plugins. As KodCode's ``run_test.sh`` (pass = pytest's exit status 0), a test counts
  as passed unless it failed or errored in any phase: skipped, xfailed and non-strict xpassed tests pass; a
  collection error fails the program.
- ``unittest``: BigCodeBench; the test code runs in the solution's namespace and its ``TestCases`` class (else
  every ``TestCase`` subclass the test code itself defines) is run as one suite (``setUpClass`` included) into
  a ``unittest.TestResult``; as in BigCodeBench's ``unsafe_execute``, only failures and errors count against a
  solution (skips, expected failures and unexpected successes do not).
"""

from __future__ import annotations

import ast
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


def _read_blocker(readable: list[str], me: int):
    """Audit hook for the fallback mode (no minimal root): refuse to open or list paths outside ``readable``
    (the workdir, the interpreter's and the system's folders) and other processes' /proc entries. Python-level
    only: ctypes or a child process gets past it, which only the namespaces mode prevents."""
    roots = tuple(r.rstrip("/") for r in readable)
    realpath, fsdecode, isdigit = os.path.realpath, os.fsdecode, str.isdigit

    def hook(event: str, args: tuple) -> None:
        if event not in ("open", "os.listdir", "os.scandir") or not args or isinstance(args[0], int):
            return
        path = realpath(fsdecode(args[0] if args[0] is not None else "."))
        parts = path.split("/")
        if len(parts) > 2 and parts[1] == "proc" and isdigit(parts[2]) and parts[2] != str(me):
            raise PermissionError(f"sandbox: {path} is outside the sandbox's view")
        if not any(path == r or path.startswith(r + "/") for r in roots):
            raise PermissionError(f"sandbox: {path} is outside the sandbox's view")
    return hook


def _defined_classes(source: str) -> list[str]:
    """Names of the classes the test code defines at top level (a solution's own TestCase is never run)."""
    try:
        return [n.name for n in ast.parse(source).body if isinstance(n, ast.ClassDef)]
    except (SyntaxError, ValueError):
        return []


class _PytestVerdict:
    """pytest plugin: one (nodeid, ok, why) per test item, ok unless some phase failed (KodCode's exit-0 rule),
    and the first collection error."""

    def __init__(self, results: list, reset) -> None:
        self.results, self.reset, self.index, self.collect_error = results, reset, {}, ""

    def pytest_runtest_setup(self, item) -> None:
        self.reset()  # builtins as they were before the solution ran, for every test

    def pytest_runtest_logreport(self, report) -> None:
        if report.nodeid not in self.index:
            self.index[report.nodeid] = len(self.results)
            self.results.append((report.nodeid, True, ""))
        if report.failed and self.results[self.index[report.nodeid]][1]:
            crash = getattr(getattr(report.longrepr, "reprcrash", None), "message", None)
            lines = str(crash or report.longrepr).strip().splitlines() or ["?"]
            why = f"{report.when}: {lines[0] if crash else lines[-1]}"[:300]
            self.results[self.index[report.nodeid]] = (report.nodeid, False, why)

    def pytest_collectreport(self, report) -> None:
        if report.failed and not self.collect_error:
            lines = str(report.longrepr).strip().splitlines() or ["?"]
            self.collect_error = f"collection failed: {lines[-1][:300]}"


class _Recorder(unittest.TestResult):
    """A ``unittest.TestResult`` that also records (test id, ok, why) per test: ok unless a failure or error (of
    the test or one of its subtests) was added, BigCodeBench's rule; a class fixture's error is one failed entry."""

    def __init__(self, results: list, reset) -> None:
        super().__init__()
        self._results, self._reset = results, reset

    def startTest(self, test) -> None:  # noqa: N802 - unittest's API
        self._reset()
        super().startTest(test)
        self._results.append((test.id(), True, ""))

    def _bad(self, test, err) -> None:
        why = f"{getattr(err[0], '__name__', err[0])}: {err[1]}"[:300]
        if self._results and self._results[-1][0] == test.id():
            if self._results[-1][1]:
                self._results[-1] = (test.id(), False, why)
        else:
            self._results.append((test.id(), False, why))

    def addError(self, test, err) -> None:  # noqa: N802
        super().addError(test, err)
        self._bad(test, err)

    def addFailure(self, test, err) -> None:  # noqa: N802
        super().addFailure(test, err)
        self._bad(test, err)

    def addSubTest(self, test, subtest, err) -> None:  # noqa: N802
        super().addSubTest(test, subtest, err)
        if err is not None:
            self._bad(test, err)


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


def main() -> None:
    # Bind everything the verdict needs before any untrusted code runs.
    write, exit_now, dumps, getpid = os.write, os._exit, json.dumps, os.getpid
    base_exc = BaseException
    loader_cls, suite_cls, case_cls, recorder_cls = unittest.TestLoader, unittest.TestSuite, unittest.TestCase, _Recorder
    restore, snap = _restore, _snapshot(_PROTECTED + (_Recorder, _PytestVerdict))
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

    kind = spec["kind"]
    if kind == "pytest":
        # Imported, and its plugin made, before any untrusted code runs; third-party plugins stay out.
        os.environ["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
        import pytest
        pytest_main, environ = pytest.main, os.environ
    if spec.get("block_sockets"):
        sys.addaudithook(_socket_blocker)
    if spec.get("readable"):
        sys.addaudithook(_read_blocker(list(spec["readable"]), me))
    builtins_dict, saved_builtins = builtins.__dict__, dict(builtins.__dict__)

    def reset() -> None:
        restore(snap, builtins_dict, saved_builtins)
    solution = types.ModuleType("solution")
    solution.__file__ = os.path.abspath("solution.py")
    if kind == "unittest":  # BigCodeBench's module globals
        solution.__dict__.update({"sys": sys, "os": os, "environ": os.environ})
    sys.modules["solution"] = solution
    try:
        exec(compile(spec["solution"], "solution.py", "exec"), solution.__dict__)
    except base_exc as exc:  # noqa: BLE001 - anything, SystemExit included, is the solution's failure
        report(f"solution raised {describe(exc)}")
    # Undo whatever the solution did to builtins and to unittest before the (trusted) tests run, and again before
    # every test. What the solution changes while a test is calling it stays changed for that test.
    reset()
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
            # Written now, after the solution ran, so nothing it wrote replaces the tests or the (empty) ini file.
            with open("test_solution.py", "w", encoding="utf-8") as fh:
                fh.write(spec["tests"])
            with open("sandbox-pytest.ini", "w", encoding="utf-8") as fh:
                fh.write("[pytest]\n")
            for name in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS"):
                environ.pop(name, None)
            plugin = _PytestVerdict(results, reset)
            pytest_main(["-q", "--no-header", "-p", "no:cacheprovider", "--noconftest", "-c", "sandbox-pytest.ini",
                         "--rootdir", os.getcwd(), "test_solution.py"], plugins=[plugin])
            if plugin.collect_error:
                report(plugin.collect_error)
        elif kind == "unittest":
            exec(compile(spec["tests"], "tests.py", "exec"), solution.__dict__)
            names = ["TestCases"] if isinstance(solution.__dict__.get("TestCases"), type) else \
                _defined_classes(spec["tests"])
            suite = suite_cls()
            for name in names:
                obj = solution.__dict__.get(name)
                if isinstance(obj, type) and issubclass(obj, case_cls):
                    suite.addTests(loader_cls().loadTestsFromTestCase(obj))
            res = recorder_cls(results, reset)
            suite.run(res)
        else:
            report(f"unknown test kind {kind!r}")
    except base_exc as exc:  # noqa: BLE001 - broken tests or a solution that breaks them: a failure
        report(f"tests raised {describe(exc)}")
    report()


if __name__ == "__main__":
    main()
