"""The sandbox: verdicts, limits and every adversarial case of issue 6, run for real.

The destructive cases (fork bomb, kill, deleting files, ...) run only where the full containment is available
(root with namespaces: ``detect_isolation().mode == "namespaces"``); elsewhere they are skipped rather than run
unprotected. Every canary the tests attack is a file they create themselves.
"""

from __future__ import annotations

import importlib.util
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from harness.sandbox import Outcome, Program, Sandbox, SandboxLimits, SandboxUnavailable, detect_isolation

ISOLATED = detect_isolation().mode == "namespaces"
needs_isolation = pytest.mark.skipif(not ISOLATED, reason=f"no full sandbox here: {detect_isolation().reason}")

CHECK = "def check(candidate):\n    assert candidate(2) == 4\n"
GOOD = "def f(x):\n    return x * 2\n"
LIMITS = SandboxLimits(timeout_s=4.0, cpu_s=2, memory_mb=256, file_size_mb=2, max_processes=16, output_bytes=4096)
UID_BASE = 300_000 + (os.getpid() % 1000) * 64


@pytest.fixture(scope="module")
def sbx():
    with Sandbox(LIMITS, workers=2, uid_base=UID_BASE) as sb:
        yield sb


def run(sbx: Sandbox, solution: str, tests: str = CHECK, **kw) -> Outcome:
    return sbx.run(Program(solution=solution, tests=tests, entry_point=kw.pop("entry_point", "f"), **kw))


def sandbox_pids() -> list[int]:
    """Processes owned by this module's sandbox uids (there must be none between runs)."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                uid = p.stat().st_uid
            except FileNotFoundError:
                continue
            if UID_BASE <= uid < UID_BASE + 64:
                pids.append(int(p.name))
    return pids


def assert_healthy(sbx: Sandbox) -> None:
    """The harness still works after an attack, and the attack left no process behind."""
    assert run(sbx, GOOD).status == "passed"
    assert sandbox_pids() == []


# -- verdicts -------------------------------------------------------------------------------------------------


def test_pass_and_fail_verdicts(sbx):
    ok = run(sbx, GOOD)
    assert (ok.status, ok.passed, ok.total, ok.fraction) == ("passed", 1, 1, 1.0)
    bad = run(sbx, "def f(x):\n    return x + 1\n")
    assert bad.status == "failed" and "AssertionError" in bad.reason
    broken = run(sbx, "def f(x:\n")
    assert broken.status == "failed" and "SyntaxError" in broken.reason


def test_asserts_kind_counts_each_assert(sbx):
    tests = ["assert f(2) == 4", "assert f(0) == 0", "assert f(3) == 7"]
    out = run(sbx, GOOD, tests=tests, kind="asserts", setup="import math")
    assert (out.status, out.passed, out.total) == ("failed", 2, 3)
    assert out.fraction == pytest.approx(2 / 3)


def test_pytest_and_unittest_kinds(sbx):
    pyt = ("import pytest\nfrom solution import f\n\ndef test_a():\n    assert f(1) == 2\n\n"
           "@pytest.mark.parametrize('x,y', [(1, 2), (2, 4), (3, 7)])\ndef test_b(x, y):\n    assert f(x) == y\n")
    out = run(sbx, GOOD, tests=pyt, kind="pytest")
    assert (out.passed, out.total, out.status) == (3, 4, "failed")
    uni = ("import unittest\nclass TestCases(unittest.TestCase):\n    def test_a(self):\n        self.assertEqual(f(1), 2)\n"
           "    def test_b(self):\n        self.assertEqual(f(5), 10)\n")
    out = run(sbx, GOOD, tests=uni, kind="unittest")
    assert (out.status, out.passed, out.total) == ("passed", 2, 2)


KOD_TESTS = """import os
import pytest
import solution
from solution import f

@pytest.fixture
def two():
    return 2

def test_fixture(two):
    assert f(1) == two

def test_tmp_path(tmp_path):
    p = tmp_path / "x.txt"
    p.write_text(str(f(3)))
    assert p.read_text() == "6"

def test_capsys(capsys):
    print(f(4))
    assert capsys.readouterr().out == "8\\n"

def test_monkeypatch(monkeypatch):
    monkeypatch.setattr(solution, "SCALE", 3)
    monkeypatch.setenv("KOD", "1")
    assert f(1) == 3 and os.environ["KOD"] == "1"

@pytest.mark.parametrize("x", [1, 2])
def test_param(x):
    assert f(x) == 2 * x

@pytest.mark.xfail(reason="documented bug")
def test_xfail():
    assert f(1) == 3

@pytest.mark.skip(reason="not today")
def test_skip():
    assert False
"""
XPASS_STRICT = "\n@pytest.mark.xfail(strict=True)\ndef test_xpass_strict():\n    assert f(1) == 2\n"
KOD_SOLUTION = "SCALE = 2\ndef f(x):\n    return SCALE * x\n"


def _real_pytest_exit(tmp: Path, solution: str, tests: str) -> int:
    """pytest's own exit status on the same files, outside the sandbox: what KodCode's run_test.sh checks."""
    (tmp / "solution.py").write_text(solution)
    (tmp / "test_solution.py").write_text(tests)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp),
                           "test_solution.py"], cwd=tmp, capture_output=True).returncode


def test_pytest_kind_runs_real_pytest_with_fixtures_and_marks(sbx, tmp_path):
    # fixture, tmp_path, capsys, monkeypatch, 2 parametrized, xfailed, skipped: all count as passed (exit status 0)
    out = sbx.run(Program(solution=KOD_SOLUTION, tests=KOD_TESTS, kind="pytest"))
    assert (out.status, out.passed, out.total) == ("passed", 8, 8), out.failures or out.stdout
    assert _real_pytest_exit(tmp_path, KOD_SOLUTION, KOD_TESTS) == 0
    # a strict xfail that passes fails the run, in pytest as here
    out = sbx.run(Program(solution=KOD_SOLUTION, tests=KOD_TESTS + XPASS_STRICT, kind="pytest"))
    assert (out.status, out.passed, out.total) == ("failed", 8, 9)
    assert "test_xpass_strict" in out.failures[0] and "XPASS(strict)" in out.failures[0]
    assert _real_pytest_exit(tmp_path, KOD_SOLUTION, KOD_TESTS + XPASS_STRICT) == 1
    # a wrong solution: the xfailed test now passes unexpectedly (non-strict: still fine), the others fail
    wrong = "SCALE = 1\ndef f(x):\n    return x + 1\n"
    out = sbx.run(Program(solution=wrong, tests=KOD_TESTS, kind="pytest"))
    assert out.status == "failed" and out.total == 8 and 0 < out.passed < 8
    missing = sbx.run(Program(solution="def g():\n    return 1\n", tests=KOD_TESTS, kind="pytest"))
    assert missing.status == "failed" and "collection failed" in missing.reason


def test_pytest_kind_ignores_conftest_and_ini_the_solution_writes(sbx):
    forge = ("open('conftest.py', 'w').write('import pytest\\n@pytest.hookimpl(hookwrapper=True)\\n"
             "def pytest_runtest_makereport(item, call):\\n    o = yield\\n    o.get_result().outcome = \\'passed\\'\\n')\n"
             "open('pytest.ini', 'w').write('[pytest]\\naddopts = -p no:python\\n')\n"
             "open('test_solution.py', 'w').write('def test_ok():\\n    pass\\n')\n"
             "import os\nos.environ['PYTEST_ADDOPTS'] = '--collect-only'\n"
             "def f(x):\n    return -1\n")
    out = sbx.run(Program(solution=forge, tests=KOD_TESTS, kind="pytest"))
    assert out.status == "failed" and out.total == 8 and out.passed == 2  # only the xfail and the skip


def test_unittest_kind_counts_as_bigcodebench(sbx):
    tests = ("import unittest\nclass TestCases(unittest.TestCase):\n    @classmethod\n    def setUpClass(cls):\n"
             "        cls.k = 2\n    def test_class_fixture(self):\n        self.assertEqual(f(1), self.k)\n"
             "    @unittest.expectedFailure\n    def test_expected_failure(self):\n        self.assertEqual(f(5), 11)\n"
             "    @unittest.expectedFailure\n    def test_unexpected_success(self):\n        self.assertEqual(f(1), 2)\n"
             "    @unittest.skip('x')\n    def test_skipped(self):\n        self.fail()\n"
             "    def test_subtests(self):\n        for i in range(3):\n            with self.subTest(i=i):\n"
             "                self.assertEqual(f(i), 2 * i)\n")
    # a TestCase of the solution's own is never run (it would pad pass_fraction)
    sol = ("import unittest\ndef f(x):\n    return 2 * x\nclass Bonus(unittest.TestCase):\n"
           "    def test_free(self):\n        pass\n")
    out = run(sbx, sol, tests=tests, kind="unittest")
    assert (out.status, out.passed, out.total) == ("passed", 5, 5), out.failures
    half = run(sbx, "def f(x):\n    return 2 * x if x < 2 else 0\n", tests=tests, kind="unittest")
    assert (half.status, half.passed, half.total) == ("failed", 4, 5) and "test_subtests" in half.failures[0]


def test_outputs_and_environment_are_minimal(sbx):
    out = run(sbx, "import os, sys\nprint(sorted(os.environ), os.getcwd(), os.getuid() != 0)\n"
                   "print(sys.stdin.read() == '')\n" + GOOD)
    assert out.status == "passed"
    assert "'HOME'" in out.stdout and "True\nTrue" in out.stdout
    assert "MEMGEN" not in out.stdout and "HF_" not in out.stdout


def test_parallel_pool_keeps_order_and_survives_bad_programs(sbx):
    programs = [Program(solution=s, tests=CHECK, entry_point="f") for s in
                [GOOD, "while True:\n    pass\n", "def f(x):\n    return 0\n", "import time\ntime.sleep(60)\n", GOOD]]
    t0 = time.perf_counter()
    outs = sbx.run_many(programs)
    assert [o.status for o in outs] == ["passed", "timeout", "failed", "timeout", "passed"]
    assert time.perf_counter() - t0 < 3 * LIMITS.timeout_s + 5  # two workers, two 4 s timeouts


def test_fallback_mode_blocks_sockets_in_process():
    # Only harmless programs here: the fallback mode does not protect the file system or other processes.
    with Sandbox(LIMITS, workers=1, force_fallback=True) as fb:
        assert fb.isolation.mode == "fallback"
        ok = fb.run(Program(solution=GOOD, tests=CHECK, entry_point="f"))
        assert ok.status == "passed"
        net = fb.run(Program(solution="import socket\nsocket.create_connection(('127.0.0.1', 9))\n", tests=CHECK,
                             entry_point="f"))
        assert net.status == "failed" and "network access is blocked" in net.reason


REPO = Path(__file__).resolve().parents[1]
# What BigCodeBench's tasks import, as far as it is installed here (the check runs only what the host has).
BENCH_MODULES = ["numpy", "pandas", "scipy", "sklearn", "matplotlib", "PIL", "dateutil", "yaml", "regex", "networkx",
                 "sympy", "requests", "pytz", "seaborn", "nltk", "bs4", "statsmodels", "openpyxl"]


def _peek_program(data_dir: Path) -> str:
    """A solution that tries to read the gold answers and the repository, list them, and import the libraries."""
    targets = [str(data_dir / "humaneval" / "test.jsonl"), str(data_dir / "mbpp_sanitized" / "test.jsonl"),
               str(REPO / "README.md"), str(REPO / "harness" / "sandbox.py"), "/root/.bashrc", "/etc/shadow"]
    mods = [m for m in BENCH_MODULES if importlib.util.find_spec(m) is not None]
    return ("import os, importlib\nseen = {}\n"
            f"for p in {targets!r}:\n"
            "    try:\n        open(p).read(64)\n        seen[p] = 'READ'\n"
            "    except OSError as e:\n        seen[p] = type(e).__name__\n"
            f"for d in [{str(data_dir)!r}, {str(REPO)!r}]:\n"
            "    try:\n        os.listdir(d)\n        seen[d] = 'LISTED'\n"
            "    except OSError as e:\n        seen[d] = type(e).__name__\n"
            f"for m in {mods!r}:\n    importlib.import_module(m)\n"
            "import matplotlib.pyplot as plt, pandas as pd\nplt.plot([1, 2]); plt.savefig('fig.png')\n"
            "pd.DataFrame({'a': [1]}).to_csv('a.csv')\nprint(sorted(seen.items()))\n"
            "try:\n    print(sorted(os.listdir('/')))\nexcept OSError:\n    print([])\n"
            "def f(x):\n    assert all(v in ('FileNotFoundError', 'PermissionError') for v in seen.values()), seen\n"
            "    return 2 * x\n")


@needs_isolation
def test_minimal_root_hides_the_host_files_but_not_the_libraries(data_dir):
    assert (data_dir / "humaneval" / "test.jsonl").exists() and (REPO / "README.md").exists()
    with Sandbox(SandboxLimits(timeout_s=60, cpu_s=60, memory_mb=4096), workers=1, uid_base=UID_BASE + 48) as sb:
        out = sb.run(Program(solution=_peek_program(data_dir), tests=CHECK, entry_point="f"))
    assert out.status == "passed", (out.reason, out.stdout, out.stderr[-2000:])
    assert "FileNotFoundError" in out.stdout and "'READ'" not in out.stdout and "'LISTED'" not in out.stdout
    # the root holds the system's and the interpreter's folders and nothing else of the host
    top = set(eval(out.stdout.strip().splitlines()[-1]))  # noqa: S307 - our own program's printed list
    assert {"usr", "tmp", "dev", "proc", "etc"} <= top and not top & {"home", "var", "opt", "mnt", "srv"}
    if REPO.parts[1] != "tmp":  # a checkout under /tmp shares its top folder with the sandbox's own /tmp
        assert REPO.parts[1] not in top  # the venv inside the repository is bound elsewhere


def test_fallback_refuses_reads_outside_the_interpreter(data_dir):
    # The in-process audit hook stops a plain open()/listdir() of the data or the repository (not ctypes).
    with Sandbox(SandboxLimits(timeout_s=60, cpu_s=60, memory_mb=4096), workers=1, force_fallback=True) as fb:
        out = fb.run(Program(solution=_peek_program(data_dir), tests=CHECK, entry_point="f"))
    assert out.status == "passed", (out.reason, out.stdout, out.stderr[-2000:])
    assert "PermissionError" in out.stdout and "'READ'" not in out.stdout and "'LISTED'" not in out.stdout


def test_fallback_is_refused_when_isolation_is_required():
    if ISOLATED:
        Sandbox(LIMITS, workers=1, require_isolation=True).close()
    else:
        with pytest.raises(SandboxUnavailable):
            Sandbox(LIMITS, workers=1, require_isolation=True)


# -- adversarial programs -------------------------------------------------------------------------------------


def test_infinite_loop_times_out(sbx):
    t0 = time.perf_counter()
    out = run(sbx, "def f(x):\n    while True:\n        pass\n")
    assert out.status == "timeout" and ("CPU time" in out.reason or "wall-clock" in out.reason)
    assert time.perf_counter() - t0 < LIMITS.timeout_s + 3
    sleeper = run(sbx, "import time\ntime.sleep(100)\n")
    assert sleeper.status == "timeout" and "wall-clock" in sleeper.reason
    assert_healthy(sbx)


@needs_isolation
@pytest.mark.slow
def test_fork_bomb_is_contained(sbx):
    bomb = ("import os\nwhile True:\n    try:\n        if os.fork() == 0:\n            os.setsid()\n"
            "    except OSError:\n        pass\n")
    peak = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak.append(len(sandbox_pids()))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        out = run(sbx, bomb)
    finally:
        stop.set()
        watcher.join()
    assert out.status in ("timeout", "failed")
    # RLIMIT_NPROC on the sandbox's own uid holds the bomb (the runner and a few in-flight forks on top).
    assert max(peak) <= LIMITS.max_processes + 2
    assert max(peak) >= 2  # it did fork: the limit, not a crash, stopped it
    assert_healthy(sbx)


def test_memory_bomb_fails(sbx):
    out = run(sbx, "x = bytearray(8 * 1024 ** 3)\n" + GOOD)
    assert out.status == "failed" and "MemoryError" in out.reason
    grow = run(sbx, "def f(x):\n    keep = []\n    while True:\n        keep.append(bytearray(32 * 2 ** 20))\n")
    assert grow.status == "failed" and "MemoryError" in grow.reason
    assert_healthy(sbx)


@needs_isolation
def test_writes_outside_the_workdir_do_not_reach_the_host(sbx):
    tag = f"memgen-pwned-{os.getpid()}-{time.time_ns()}"
    targets = [f"/tmp/{tag}", f"/var/tmp/{tag}", f"/dev/shm/{tag}", f"/run/lock/{tag}",
               str(Path(__file__).resolve().parent / tag), f"/root/{tag}", f"/{tag}"]
    before = {p.name for p in Path(tempfile.gettempdir()).glob(f"memgen-sbx-{os.getpid()}-*")}
    code = "import os\nopen('here.txt', 'w').write('x')\n" + "".join(
        f"try:\n    open({t!r}, 'w').write('pwned')\nexcept OSError:\n    pass\n" for t in targets) + GOOD
    out = run(sbx, code)
    assert out.status == "passed"  # writing its own working directory is allowed
    for t in targets:
        assert not os.path.exists(t), f"sandboxed program wrote {t}"
    after = {p.name for p in Path(tempfile.gettempdir()).glob(f"memgen-sbx-{os.getpid()}-*")}  # this process only
    assert after <= before  # the staging folder is gone; the workdir tmpfs died with the namespace


@needs_isolation
def test_deleting_files_is_refused(sbx):
    base = Path("/var/lib") if os.access("/var/lib", os.W_OK) else Path("/opt")
    canary_dir = Path(tempfile.mkdtemp(prefix="memgen-canary-", dir=base))
    try:
        os.chmod(canary_dir, 0o755)
        canary = canary_dir / "keep.txt"
        canary.write_text("precious")
        code = (f"import os, shutil\nfor attempt in (lambda: os.remove({str(canary)!r}), "
                f"lambda: shutil.rmtree({str(canary_dir)!r}), lambda: os.rename({str(canary)!r}, 'stolen')):\n"
                "    try:\n        attempt()\n    except OSError:\n        pass\n"
                "def f(x):\n    return None\n")
        out = run(sbx, code)
        assert out.status == "failed"
        assert canary.read_text() == "precious"
    finally:
        canary.unlink(missing_ok=True)
        canary_dir.rmdir()


@needs_isolation
def test_environment_secrets_are_not_readable(sbx, monkeypatch):
    secret = f"s3cr3t-{time.time_ns()}"
    monkeypatch.setenv("MEMGEN_FAKE_API_KEY", secret)
    code = ("import os, glob\nprint(dict(os.environ))\n"
            f"for p in ['/proc/{os.getpid()}/environ', '/proc/1/environ'] + glob.glob('/proc/*/environ'):\n"
            "    try:\n        print(open(p, 'rb').read())\n    except OSError:\n        pass\n"
            "def f(x):\n    return os.environ.get('MEMGEN_FAKE_API_KEY')\n")
    out = run(sbx, code)
    assert out.status == "failed"
    assert secret not in out.stdout + out.stderr + out.reason


@needs_isolation
def test_network_is_unreachable(sbx):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        code = ("import socket\nreached = []\n"
                f"for host, port in [('127.0.0.1', {port}), ('1.1.1.1', 53), ('huggingface.co', 443)]:\n"
                "    try:\n        socket.create_connection((host, port), timeout=1).close()\n"
                "        reached.append(host)\n    except OSError:\n        pass\n"
                "def f(x):\n    assert not reached, reached\n    return x * 2\n")
        out = run(sbx, code)
        assert out.status == "passed", out.reason  # passes only if no connection succeeded
        readable, _, _ = select.select([server], [], [], 0)
        assert readable == []  # nothing knocked on the harness's port
    finally:
        server.close()


@needs_isolation
def test_killing_the_parent_is_contained(sbx):
    me = os.getpid()
    code = ("import os, signal\n"
            f"for pid in (os.getppid(), {me}, 1, -1):\n"
            "    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n"
            "try:\n    os.killpg(0, signal.SIGKILL)\nexcept OSError:\n    pass\n" + GOOD)
    out = run(sbx, code)
    assert out.status in ("failed", "timeout")  # killpg(0) takes the program itself down: no verdict
    assert os.getpid() == me  # still here
    assert_healthy(sbx)


def test_huge_stdout_is_bounded(sbx):
    t0 = time.perf_counter()
    out = run(sbx, "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n")
    # RLIMIT_FSIZE: Python ignores SIGXFSZ, so the write fails with EFBIG ("File too large").
    assert out.status == "failed" and "File too large" in out.reason
    assert len(out.stdout) <= LIMITS.output_bytes + 50
    assert time.perf_counter() - t0 < LIMITS.timeout_s + 3
    one = run(sbx, "print('y' * (8 * 2 ** 20))\n" + GOOD)
    assert one.status == "failed" and len(one.stdout) <= LIMITS.output_bytes + 50


@pytest.mark.parametrize("early_exit", ["import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n",
                                        "raise SystemExit(0)\n", "def f(x):\n    import sys\n    sys.exit(0)\n"])
def test_exiting_before_the_tests_is_not_a_pass(sbx, early_exit):
    out = run(sbx, early_exit)
    assert out.status == "failed"


def test_forged_verdicts_and_atexit_are_not_a_pass(sbx):
    forge = ("import atexit, json, os\nfake = json.dumps({'nonce': 'guess', 'passed': 1, 'total': 1, 'error': ''})\n"
             "def spray():\n    for fd in range(1, 64):\n        try:\n            os.write(fd, (fake + '\\n').encode())\n"
             "        except OSError:\n            pass\n"
             "spray()\natexit.register(spray)\nimport sys\nsys.exit(0)\n")
    assert run(sbx, forge).status == "failed"


def test_monkeypatching_the_harness_is_undone_or_refused(sbx):
    # unittest machinery: the runner restores the patched assertEqual before every test.
    uni = "import unittest\nclass T(unittest.TestCase):\n    def test_a(self):\n        self.assertEqual(f(2), 4)\n"
    patch_unittest = ("import unittest\ntry:\n    unittest.TestCase.assertEqual = lambda *a, **k: None\n"
                      "except RuntimeError:\n    pass\ndef f(x):\n    return -1\n")
    out = run(sbx, patch_unittest, tests=uni, kind="unittest")
    assert out.status == "failed" and out.passed == 0
    # builtins, os and the runner's own globals: the runner bound what it needs before the solution ran.
    patch_all = ("import builtins, os, json, __main__\n"
                 "builtins.AssertionError = type('X', (Exception,), {})\nbuiltins.len = lambda *a: 0\n"
                 "os._exit = lambda *a: None\nos.write = lambda *a: 0\njson.dumps = lambda *a, **k: '{}'\n"
                 "__main__.main = lambda: None\n"
                 "def f(x):\n    return -1\n")
    out = run(sbx, patch_all)
    assert out.status == "failed" and "AssertionError" in out.reason
    # redefining check() in the solution does not replace the tests' check.
    out = run(sbx, "def check(candidate):\n    pass\ndef f(x):\n    return -1\n")
    assert out.status == "failed"


@needs_isolation
def test_a_killed_harness_takes_its_sandboxes_along(tmp_path):
    """A harness killed mid-run leaves no sandboxed program behind (parent-death signal on the namespace)."""
    base = UID_BASE + 32  # a separate uid range, so sandbox_pids() of the module fixture is unaffected
    script = tmp_path / "driver.py"
    script.write_text(
        "from harness.sandbox import Sandbox, SandboxLimits, Program\n"
        f"sb = Sandbox(SandboxLimits(timeout_s=60, cpu_s=60), workers=1, uid_base={base})\n"
        "sb.run(Program(solution='import time\\ntime.sleep(60)\\n', tests='', entry_point='f'))\n")
    proc = subprocess.Popen([sys.executable, str(script)], cwd=Path(__file__).resolve().parent.parent)

    def mine() -> list[int]:
        return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _uid(p) == base]

    try:
        deadline = time.time() + 30
        while not mine() and time.time() < deadline:
            time.sleep(0.1)
        assert mine(), "the sandboxed program never started"
    finally:
        proc.kill()
        proc.wait()
    deadline = time.time() + 10
    while mine() and time.time() < deadline:
        time.sleep(0.1)
    assert mine() == []


def _uid(p: Path) -> int:
    try:
        return p.stat().st_uid
    except FileNotFoundError:
        return -1
