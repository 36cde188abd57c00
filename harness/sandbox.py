"""An execution sandbox for untrusted, model-written Python: every program runs contained and gets a verdict.

Containment of one run (``Sandbox.run``), when the harness runs as root and ``unshare``/``setpriv`` work (checked
once by ``detect_isolation``; mode ``namespaces``):
- new network, mount, PID, IPC and UTS namespaces (``unshare``): no network at all (not even the host's loopback);
  the PID namespace means every process the program forks dies with it, whatever process group it moves to;
- a fresh size-limited tmpfs mounted over ``/tmp`` is the working directory (deleted with the namespace), and
  fresh tmpfs mounts hide the host's other world-writable folders (``/var/tmp``, ``/dev/shm``, ``/run/lock``);
- the program runs as an unprivileged uid of its own (``setpriv``; one uid per worker slot), so it can neither
  write the repository nor signal or read (``/proc/PID/environ``) any other process, and ``RLIMIT_NPROC``, which
  root ignores, really bounds a fork bomb; ``no_new_privs`` is set;
- rlimits on CPU time, address space, file size, open files, processes; no core files;
- a wall-clock timeout on the whole process group (then SIGKILL), the namespace killed if the harness dies
  (parent-death signal), stdin on /dev/null, a minimal environment, and stdout/stderr written to files capped by
  ``RLIMIT_FSIZE`` and read back truncated to ``output_bytes``.
Otherwise (mode ``fallback``: not root, or no namespaces) the program runs with the rlimits, its own session, a
temporary directory and an audit hook that blocks sockets, but it can write wherever the harness user can;
``SandboxUnavailable`` tells callers, and the destructive adversarial tests are skipped there.

What an in-process verdict cannot guarantee: the tests run in the same interpreter as the solution, so a program
written to *forge* a verdict (reading the nonce out of memory via ``gc``/frames or ``ctypes``, objects whose
``__eq__`` is always true, patches made while a test is calling the solution) can fake a pass. Exits, ``atexit``
hooks, forged verdict lines, and builtins, ``unittest`` classes or module globals patched when the solution is
loaded cannot (the runner restores builtins and ``unittest`` before every test and binds what it uses early).
The sandbox's job is containment.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

RUNNER = Path(__file__).with_name("sandbox_runner.py")
STATUSES = ("passed", "failed", "timeout", "error")
# Fresh tmpfs mounts hide these world-writable host folders inside the namespace (``/tmp`` becomes the workdir).
HIDDEN_WRITABLE = ("/var/tmp", "/dev/shm", "/run/lock")


class SandboxUnavailable(RuntimeError):
    """The namespaces/uid containment is not available here (see ``detect_isolation``)."""


@dataclass(frozen=True)
class SandboxLimits:
    """Resource bounds of one program run."""

    timeout_s: float = 10.0
    """Wall-clock limit of the whole run (interpreter start included); then the process group is SIGKILLed."""
    cpu_s: int = 10
    """RLIMIT_CPU in seconds (SIGXCPU, then SIGKILL one second later)."""
    memory_mb: int = 1024
    """RLIMIT_AS (address space) in MiB; a memory bomb gets MemoryError."""
    file_size_mb: int = 16
    """RLIMIT_FSIZE in MiB: the largest file, captured stdout/stderr included (a flood gets SIGXFSZ/EFBIG)."""
    max_processes: int = 32
    """RLIMIT_NPROC for the sandbox uid (enforced only in the namespaces mode, where that uid is not root)."""
    max_open_files: int = 128
    """RLIMIT_NOFILE."""
    output_bytes: int = 16_384
    """How much of stdout and of stderr is kept in the outcome (the rest is dropped)."""
    workdir_mb: int = 64
    """Size of the tmpfs working directory (namespaces mode)."""

    def rlimits(self) -> dict[str, int]:
        mib = 1 << 20
        return {"RLIMIT_CPU": self.cpu_s, "RLIMIT_AS": self.memory_mb * mib, "RLIMIT_FSIZE": self.file_size_mb * mib,
                "RLIMIT_NPROC": self.max_processes, "RLIMIT_NOFILE": self.max_open_files, "RLIMIT_CORE": 0}


@dataclass(frozen=True)
class Program:
    """One solution and the tests that judge it (see ``harness/sandbox_runner.py`` for the test kinds)."""

    solution: str
    """Untrusted code, executed as module ``solution``."""
    tests: str | list[str]
    """Trusted test code (a list of assert statements for kind ``asserts``)."""
    kind: str = "check"
    """``check`` (HumanEval), ``asserts`` (MBPP), ``pytest`` (KodCode) or ``unittest`` (BigCodeBench)."""
    entry_point: str = ""
    """Function handed to ``check`` (kind ``check``)."""
    setup: str = ""
    """Trusted code run before the asserts (kind ``asserts``: MBPP's test imports)."""


@dataclass
class Outcome:
    """The recorded result of one run."""

    status: str  # passed / failed / timeout / error
    reason: str
    passed: int = 0
    total: int = 0
    returncode: int | None = None
    seconds: float = 0.0
    stdout: str = ""
    stderr: str = ""
    failures: list[str] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        """Share of tests passed (the dense reward); 0 when no verdict came back."""
        return self.passed / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Isolation:
    mode: str  # "namespaces" or "fallback"
    reason: str


@cache
def detect_isolation() -> Isolation:
    """Whether the full containment works here: root, ``unshare``, ``setpriv`` and a trial namespace with mounts."""
    if os.name != "posix" or os.geteuid() != 0:
        return Isolation("fallback", "not running as root: no namespaces or uid switch; sockets blocked in-process")
    tools = {t: shutil.which(t) for t in ("unshare", "setpriv", "mount")}
    missing = [t for t, p in tools.items() if p is None]
    if missing:
        return Isolation("fallback", f"missing {', '.join(missing)} (util-linux); sockets blocked in-process")
    probe = [tools["setpriv"], "--pdeathsig", "KILL", "--", tools["unshare"], "--net", "--mount", "--pid", "--ipc",
             "--uts", "--fork", "--kill-child", "--",
             "/bin/sh", "-c", "mount -t tmpfs -o size=1m tmpfs /var/tmp && setpriv --reuid=65534 --regid=65534 "
             "--clear-groups --no-new-privs true"]
    try:
        r = subprocess.run(probe, capture_output=True, timeout=20, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Isolation("fallback", f"unshare probe failed ({exc}); sockets blocked in-process")
    if r.returncode != 0:
        err = r.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["?"]
        return Isolation("fallback", f"unshare probe failed ({err[0]}); sockets blocked in-process")
    return Isolation("namespaces", "network/mount/pid namespaces, tmpfs workdir, unprivileged uid")


# The namespace's init (PID 1, root): mount a fresh tmpfs with the staged files over /tmp, hide the other
# world-writable folders, bind the interpreter's prefix read-only at /tmp/.python (it may live under a home
# folder the sandbox uid cannot enter, e.g. pyenv under /root; the venv's site-packages go on sys.path instead,
# without its .pth hooks, so the harness itself is not importable), then run the runner as the sandbox uid as a
# child, not by exec (a namespace's PID 1 ignores signals such as SIGXCPU that should keep their default
# meaning), and exit with its status.
_SETUP = r"""
set -e
mount -t tmpfs -o "size=${WORKDIR_MB}m,mode=0700" tmpfs /var/tmp
cp "$STAGE/runner.py" "$STAGE/spec.json" /var/tmp/
chown -R "$SBX_UID:$SBX_UID" /var/tmp
mkdir /var/tmp/.python
mount --bind "$PY_PREFIX" /var/tmp/.python
mount -o remount,bind,ro /var/tmp/.python
i=0
for d in $SITE_DIRS; do
  mkdir "/var/tmp/.site$i"; mount --bind "$d" "/var/tmp/.site$i"; mount -o remount,bind,ro "/var/tmp/.site$i"
  i=$((i + 1))
done
mount --move /var/tmp /tmp
for d in $HIDE; do if [ -d "$d" ]; then mount -t tmpfs -o size=1m,mode=0755 tmpfs "$d"; fi; done
cd /tmp
set +e
setpriv --reuid="$SBX_UID" --regid="$SBX_UID" --clear-groups --no-new-privs -- \
  env -i PATH=/usr/bin:/bin HOME=/tmp LANG=C.UTF-8 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MPLBACKEND=Agg \
  "/tmp/.python/$PY_BIN" -I -B runner.py
exit $?
"""
# The real interpreter as (prefix, path of the binary inside it): the sandbox runs it without the venv's symlink.
_PY = (os.path.realpath(sys.base_prefix),
       os.path.relpath(os.path.realpath(sys.executable), os.path.realpath(sys.base_prefix)))
def _site_dirs() -> list[str]:
    """The interpreter's existing site-packages folders (real paths, no spaces: they travel in a shell list)."""
    dirs = [os.path.realpath(d) for d in site.getsitepackages() if os.path.isdir(d)]
    return [d for d in dict.fromkeys(dirs) if " " not in d]


_MIN_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


def _remove_stale_stages() -> None:
    """Staging folders left by harnesses that were killed mid-run (their pid is gone); a few KB each."""
    for d in Path(tempfile.gettempdir()).glob("memgen-sbx-*-*"):
        pid = d.name.split("-")[2]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(d, ignore_errors=True)


def _read_capped(path: Path, limit: int) -> str:
    try:
        with path.open("rb") as fh:
            data = fh.read(limit + 1)
    except OSError:
        return ""
    text = data[:limit].decode("utf-8", errors="replace")
    return text + ("\n[... truncated]" if len(data) > limit else "")


def _signal_reason(rc: int) -> tuple[str, str]:
    """(status, reason) for a run that ended without a verdict; ``rc`` as the shell reports it (128 + signal)."""
    sig = -rc if rc < 0 else rc - 128 if rc > 128 else 0
    if sig == signal.SIGXCPU:
        return "timeout", "CPU time limit (SIGXCPU)"
    if sig == signal.SIGKILL:
        return "failed", "killed by SIGKILL (out of memory, or the program killed itself)"
    if sig == signal.SIGXFSZ:
        return "failed", "output/file size limit exceeded (SIGXFSZ)"
    if sig > 0:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return "failed", f"killed by signal {name}"
    return "failed", f"exited with status {rc} before reporting a verdict"


class Sandbox:
    """Runs ``Program``s contained, up to ``workers`` at a time; thread-safe, never raises for a program's sake."""

    def __init__(self, limits: SandboxLimits | None = None, workers: int = 2, uid_base: int | None = None,
                 require_isolation: bool = False, force_fallback: bool = False):
        if workers < 1:
            raise ValueError(f"sandbox workers must be >= 1, got {workers}")
        self.limits = limits or SandboxLimits()
        self.workers = workers
        self.isolation = detect_isolation()
        if force_fallback:  # for tests of the fallback path on a machine that has the full containment
            self.isolation = Isolation("fallback", "forced by the caller; sockets blocked in-process")
        if require_isolation and self.isolation.mode != "namespaces":
            raise SandboxUnavailable(f"sandbox isolation unavailable: {self.isolation.reason}")
        # One uid per worker slot, so RLIMIT_NPROC counts one program's processes only; a per-process base keeps
        # two harnesses on one machine apart (a shared uid would only share that count: PID namespaces separate
        # them otherwise).
        base = uid_base if uid_base is not None else 200_000 + (os.getpid() % 50_000) * 64
        self._slots: queue.Queue[int] = queue.Queue()
        for i in range(max(workers, 64)):
            self._slots.put(base + i)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox")
        _remove_stale_stages()
        self._lock = threading.Lock()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public API ---------------------------------------------------------------------------------------------
    def run(self, program: Program, limits: SandboxLimits | None = None) -> Outcome:
        """Run one program now (in the calling thread) and return its outcome."""
        uid = self._slots.get()
        try:
            return self._run(program, limits or self.limits, uid)
        except Exception as exc:  # noqa: BLE001 - a harness-side failure is recorded, never raised into the caller
            return Outcome("error", f"sandbox error: {type(exc).__name__}: {exc}")
        finally:
            self._slots.put(uid)

    def run_many(self, programs: Sequence[Program], limits: SandboxLimits | None = None) -> list[Outcome]:
        """Run programs on the bounded worker pool; outcomes in input order."""
        futures = [self._pool.submit(self.run, p, limits) for p in programs]
        return [f.result() for f in futures]

    # -- one run ------------------------------------------------------------------------------------------------
    def _run(self, program: Program, limits: SandboxLimits, uid: int) -> Outcome:
        namespaced = self.isolation.mode == "namespaces"
        nonce = secrets.token_hex(16)
        stage = Path(tempfile.mkdtemp(prefix=f"memgen-sbx-{os.getpid()}-"))
        try:
            os.chmod(stage, 0o700)
            spec = {"solution": program.solution, "tests": program.tests, "kind": program.kind,
                    "entry_point": program.entry_point, "setup": program.setup, "rlimits": limits.rlimits(),
                    "block_sockets": not namespaced,
                    # site-packages are bound read-only at /tmp/.site<i> inside the namespace: they may live under
                    # /tmp themselves (a venv in a /tmp checkout), which the workdir tmpfs would otherwise hide.
                    "sys_path": [f"/tmp/.site{i}" for i in range(len(_site_dirs()))] if namespaced else []}
            if not namespaced:
                spec["rlimits"].pop("RLIMIT_NPROC")  # per real uid: it would count the harness user's processes
            shutil.copyfile(RUNNER, stage / "runner.py")
            out_f = open(stage / "stdout", "wb")  # noqa: SIM115 - closed in finally
            err_f = open(stage / "stderr", "wb")  # noqa: SIM115
            res_f = open(stage / "result", "wb")  # noqa: SIM115
            # The verdict channel: an fd inherited through unshare/sh/setpriv; its number travels in the spec.
            spec["result_fd"] = res_f.fileno()
            (stage / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
            try:
                if namespaced:
                    # pdeathsig: if the harness dies (killed, crashed), the whole namespace goes with it.
                    cmd = [shutil.which("setpriv") or "setpriv", "--pdeathsig", "KILL", "--",
                           shutil.which("unshare") or "unshare", "--net", "--mount", "--pid", "--ipc", "--uts",
                           "--fork", "--kill-child", "--", "/bin/sh", "-c", _SETUP]
                    env = {**_MIN_ENV, "STAGE": str(stage), "SBX_UID": str(uid), "PY_PREFIX": _PY[0], "PY_BIN": _PY[1],
                           "SITE_DIRS": " ".join(_site_dirs()),
                           "WORKDIR_MB": str(limits.workdir_mb), "HIDE": " ".join(HIDDEN_WRITABLE)}
                    cwd = "/"
                else:
                    cmd = [sys.executable, "-I", "-B", "runner.py"]
                    env, cwd = dict(_MIN_ENV, HOME=str(stage)), str(stage)
                t0 = time.perf_counter()
                proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out_f, stderr=err_f,
                                        pass_fds=(res_f.fileno(),), cwd=cwd, env=env, start_new_session=True)
                try:
                    assert proc.stdin is not None
                    proc.stdin.write((nonce + "\n").encode())
                    proc.stdin.close()
                except (BrokenPipeError, OSError):
                    pass
                timed_out = False
                try:
                    rc = proc.wait(timeout=limits.timeout_s)
                except subprocess.TimeoutExpired:
                    timed_out = True
                    self._kill(proc)
                    rc = proc.wait()
                if not namespaced:
                    # Stragglers the program left in its session; in the namespaces mode the PID namespace died
                    # with its init, taking every one of them along.
                    self._kill(proc)
                seconds = time.perf_counter() - t0
            finally:
                for f in (out_f, err_f, res_f):
                    f.close()
            stdout = _read_capped(stage / "stdout", limits.output_bytes)
            stderr = _read_capped(stage / "stderr", limits.output_bytes)
            verdict = self._verdict(stage / "result", nonce)
            common = {"returncode": rc, "seconds": seconds, "stdout": stdout, "stderr": stderr}
            if timed_out:
                return Outcome("timeout", f"wall-clock limit of {limits.timeout_s:g}s", **common)
            if verdict is None:
                status, reason = _signal_reason(rc)
                if rc == 0:
                    reason = "exited before the tests reported (sys.exit/os._exit in the solution?)"
                return Outcome(status, reason, **common)
            passed, total = int(verdict.get("passed", 0)), int(verdict.get("total", 0))
            fails = [str(f) for f in verdict.get("failures", [])]
            if verdict.get("error"):
                return Outcome("failed", str(verdict["error"]), passed, total, failures=fails, **common)
            if rc != 0:
                return Outcome("failed", f"exit status {rc} after the tests", passed, total, failures=fails,
                               **common)
            if total == 0:
                return Outcome("error", "no tests were found", 0, 0, **common)
            if passed == total:
                return Outcome("passed", f"{passed}/{total} tests passed", passed, total, **common)
            return Outcome("failed", f"{passed}/{total} tests passed; first failure: {fails[0] if fails else '?'}",
                           passed, total, failures=fails, **common)
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    @staticmethod
    def _verdict(path: Path, nonce: str) -> dict[str, Any] | None:
        """The runner's JSON line carrying the right nonce, or None (lines without it are the program's)."""
        try:
            raw = path.read_bytes()[:65_536].decode("utf-8", errors="replace")
        except OSError:
            return None
        for line in raw.splitlines():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict) and obj.get("nonce") == nonce:
                return obj
        return None


_DEFAULT: Sandbox | None = None
_DEFAULT_LOCK = threading.Lock()


def default_sandbox() -> Sandbox:
    """A process-wide sandbox with default limits and 2 workers (the code tasks share it)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = Sandbox(workers=int(os.environ.get("MEMGEN_SANDBOX_WORKERS", "2")))
        return _DEFAULT
