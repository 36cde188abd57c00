"""An execution sandbox for untrusted, model-written Python: every program runs contained and gets a verdict.

Containment of one run (``Sandbox.run``), when the harness runs as root and ``unshare``/``setpriv`` work (checked
once by ``detect_isolation``; mode ``namespaces``):
- new network, mount, PID, IPC and UTS namespaces (``unshare``): no network at all (not even the host's loopback);
  the PID namespace means every process the program forks dies with it, whatever process group it moves to;
- a minimal read-only root instead of the host's file system (``pivot_root`` into a fresh tmpfs, the host's root
  detached): the system's ``/usr/bin``, ``/usr/lib*``, ``/lib*`` and time zones, the real interpreter binary, its
  stdlib/libpython folder and the site-packages, each bound read-only at its real path; ``/etc`` holds only
  ``ld.so.cache``, ``localtime``, ``nsswitch.conf``, ``mime.types`` and a passwd/group/hosts of its own;
  ``/dev`` only null/zero/full/random/urandom and a private ``/dev/shm``; ``/proc`` is the PID namespace's own.
  The repository, the data directory (with the gold answers), home folders and every other host file are absent
  ("No such file or directory");
- a fresh size-limited tmpfs at ``/tmp`` is the working directory (deleted with the namespace);
- the program runs as an unprivileged uid of its own (``setpriv``; one uid per worker slot), so it can neither
  write the repository nor signal or read (``/proc/PID/environ``) any other process, and ``RLIMIT_NPROC``, which
  root ignores, really bounds a fork bomb; ``no_new_privs`` is set;
- rlimits on CPU time, address space, file size, open files, processes; no core files;
- a wall-clock timeout on the whole process group (then SIGKILL), the namespace killed if the harness dies
  (parent-death signal), stdin on /dev/null, a minimal environment, and stdout/stderr written to files capped by
  ``RLIMIT_FSIZE`` and read back truncated to ``output_bytes``.
Otherwise (mode ``fallback``: not root, or no namespaces) the program runs as the harness user with the
rlimits, its own session, a temporary working directory (also ``TMPDIR`` and ``HOME``) and audit hooks that block
sockets and refuse to open or list any path outside the folders the minimal root would hold (plus the venv) and
other processes' ``/proc`` entries ("Permission denied"). That stops a plain ``open()`` of the data or the
repository, but not ``ctypes`` or a child process (``cat``), and the program can write wherever the harness user
can; ``SandboxUnavailable`` tells callers, and the destructive adversarial tests are skipped there.

What an in-process verdict cannot guarantee: the tests run in the same interpreter as the solution, so a program
written to *forge* a verdict (reading the nonce out of memory via ``gc``/frames or ``ctypes``, objects whose
``__eq__`` is always true, patches made while a test is calling the solution) can fake a pass. Exits, ``atexit``
hooks, forged verdict lines, and builtins, ``unittest`` classes or module globals patched when the solution is
loaded cannot (the runner restores builtins and ``unittest`` before every test and binds what it uses early).
As in KodCode and BigCodeBench themselves, a skipped test is not a failure, so a solution that raises
``unittest.SkipTest`` or calls ``pytest.skip()`` is not caught either. The sandbox's job is containment.
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
import sysconfig
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
    """Whether the full containment works here: root, util-linux, and a trial namespace that builds the minimal
    root, pivots into it and switches to an unprivileged uid (the very script every run uses)."""
    if os.name != "posix" or os.geteuid() != 0:
        return Isolation("fallback", f"not running as root: no namespaces or uid switch; {_FALLBACK}")
    tools = {t: shutil.which(t, path=_ROOT_PATH) for t in ("unshare", "setpriv", "mount", "pivot_root")}
    missing = [t for t, p in tools.items() if p is None]
    if missing:
        return Isolation("fallback", f"missing {', '.join(missing)} (util-linux); {_FALLBACK}")
    stage = Path(tempfile.mkdtemp(prefix=f"memgen-sbx-{os.getpid()}-probe-"))
    try:
        for name in ("runner.py", "spec.json"):
            (stage / name).write_text("")
        r = subprocess.run(_namespace_cmd(), capture_output=True, timeout=20, stdin=subprocess.DEVNULL,
                           env=_setup_env(stage, 65534, 1) | {"RUN": "/usr/bin/true"}, cwd="/")
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Isolation("fallback", f"namespace probe failed ({exc}); {_FALLBACK}")
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if r.returncode != 0:
        err = r.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["?"]
        return Isolation("fallback", f"namespace probe failed ({err[0]}); {_FALLBACK}")
    return Isolation("namespaces", "network/mount/pid namespaces, minimal read-only root, tmpfs workdir, "
                                   "unprivileged uid")


_FALLBACK = "sockets and reads outside the interpreter's folders blocked in-process"
_ROOT_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
# The namespace's init (PID 1, root) builds the minimal root in a fresh tmpfs (mounted over /var/tmp, which only
# serves as a mount point): the size-limited tmpfs workdir at /tmp with the staged files, the system and
# interpreter folders bound read-only at their real paths (an interpreter under /root, e.g. pyenv, works: the
# folders above a bind are the new root's own, mode 0755; the venv's site-packages at /site-packages<i>), a few
# /etc files, /dev nodes, a private /dev/shm and the PID namespace's own /proc. Then pivot_root into it, detach
# the host's root, make the new root read-only, drop the setup's variables from the environment, and run the
# runner as the sandbox uid as a child, not by exec (a namespace's PID 1 ignores signals such as SIGXCPU that
# should keep their default meaning), and exit with its status. Lists travel newline-separated.
_SETUP = r"""
set -e
IFS='
'
R=/var/tmp
mount -t tmpfs -o size=4m,mode=0755 tmpfs "$R"
mkdir "$R/tmp"
mount -t tmpfs -o "size=${WORKDIR_MB}m,mode=0700,nosuid,nodev" tmpfs "$R/tmp"
mkdir -p $DIRS
cp "$STAGE/runner.py" "$STAGE/spec.json" "$R/tmp/"
chown -R "$SBX_UID:$SBX_UID" "$R/tmp"
for p in $LINKS; do ln -s "${p#*|}" "$R${p%%|*}"; done
for p in $RO_PATHS; do
  src=${p%%|*}; dst=$R${p#*|}
  [ -d "$src" ] || : > "$dst"
  mount -o bind,ro,nosuid,nodev "$src" "$dst"
done
[ -z "$ETC_FILES" ] || cp -L $ETC_FILES "$R/etc/"
echo "sandbox:x:$SBX_UID:$SBX_UID:sandbox:/tmp:/bin/sh" > "$R/etc/passwd"
echo "sandbox:x:$SBX_UID:" > "$R/etc/group"
echo "127.0.0.1 localhost" > "$R/etc/hosts"
for n in null zero full random urandom; do : > "$R/dev/$n"; mount -o bind "/dev/$n" "$R/dev/$n"; done
ln -s /proc/self/fd "$R/dev/fd"; ln -s fd/0 "$R/dev/stdin"; ln -s fd/1 "$R/dev/stdout"; ln -s fd/2 "$R/dev/stderr"
mount -t tmpfs -o size=16m,mode=1777,nosuid,nodev tmpfs "$R/dev/shm"
mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
cd "$R"
pivot_root . .old
umount -l /.old
mount -o remount,bind,ro /
cd /tmp
set +e
run=$RUN uid=$SBX_UID
unset STAGE SBX_UID WORKDIR_MB DIRS LINKS RO_PATHS ETC_FILES RUN R p src dst n PWD OLDPWD
export PATH=/usr/bin:/bin HOME=/tmp LANG=C.UTF-8 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MPLBACKEND=Agg
setpriv --reuid="$uid" --regid="$uid" --clear-groups --no-new-privs -- $run
exit $?
"""
# System folders the interpreter and the benchmarks' libraries need (C libraries, locales, time zones, the
# commands some BigCodeBench tasks run); a top-level one that is a symlink (merged /usr) is recreated as one.
_SYSTEM = ("/usr/bin", "/usr/lib", "/usr/lib64", "/usr/lib32", "/usr/libx32", "/usr/share/zoneinfo",
           "/bin", "/lib", "/lib64", "/lib32", "/libx32")
_ETC = ("/etc/ld.so.cache", "/etc/localtime", "/etc/nsswitch.conf", "/etc/mime.types")


def _site_dirs() -> list[str]:
    """The interpreter's existing site-packages folders (real paths)."""
    dirs = [os.path.realpath(d) for d in site.getsitepackages() if os.path.isdir(d)]
    return list(dict.fromkeys(dirs))


def _covered(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


@cache
def _root_layout() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """(symlinks to recreate, (host path, path in the root) to bind read-only) of the minimal root: the system
    folders, then the real interpreter binary (not the venv's symlink), its stdlib and libpython folders, each
    left out when a folder already bound holds it, all at their real paths; other site-packages (the venv's,
    inside the repository) at ``/site-packages<i>``, so no folder of the repository appears. They go on
    ``sys.path`` without their .pth hooks, so the harness itself (an editable install) is not importable."""
    links = tuple(p for p in _SYSTEM if os.path.islink(p) and "/" not in p[1:])
    binds: list[tuple[str, str]] = [(p, p) for p in _SYSTEM if os.path.isdir(p) and not os.path.islink(p)]
    py = [os.path.realpath(sys.executable), os.path.realpath(str(sysconfig.get_config_var("LIBDIR") or "")),
          os.path.realpath(sysconfig.get_path("stdlib"))]
    for p in sorted(dict.fromkeys(p for p in py if p and os.path.exists(p)), key=len):
        if not _covered(p, [h for h, _ in binds]):
            binds.append((p, p))
    for i, p in enumerate(d for d in _site_dirs() if not _covered(d, [h for h, _ in binds])):
        binds.append((p, f"/site-packages{i}"))
    return links, tuple((h, r) for h, r in binds if "\n" not in h and "|" not in h)


def _sys_path() -> list[str]:
    """The site-packages folders as the sandboxed interpreter sees them."""
    inside = dict(_root_layout()[1])
    return [inside.get(d, d) for d in _site_dirs()]


def _namespace_cmd() -> list[str]:
    # pdeathsig: if the harness dies (killed, crashed), the whole namespace goes with it.
    return [shutil.which("setpriv", path=_ROOT_PATH) or "setpriv", "--pdeathsig", "KILL", "--",
            shutil.which("unshare", path=_ROOT_PATH) or "unshare", "--net", "--mount", "--pid", "--ipc", "--uts",
            "--fork", "--kill-child", "--", "/bin/sh", "-c", _SETUP]


@cache
def _layout_env() -> dict[str, str]:
    """The root's layout as the setup script's variables, worked out once here rather than with a dozen
    mkdir/readlink/dirname processes per run (each process start costs a millisecond or more)."""
    links, binds = _root_layout()
    dirs = ["/dev/shm", "/proc", "/etc", "/.old"]
    dirs += [r if os.path.isdir(h) else os.path.dirname(r) for h, r in binds]
    return {"DIRS": "\n".join("/var/tmp" + d for d in dict.fromkeys(dirs)),
            "LINKS": "\n".join(f"{p}|{os.readlink(p)}" for p in links),
            "RO_PATHS": "\n".join(f"{h}|{r}" for h, r in binds),
            "ETC_FILES": "\n".join(f for f in _ETC if os.path.isfile(f)),
            "RUN": f"{os.path.realpath(sys.executable)}\n-I\n-B\nrunner.py"}


def _setup_env(stage: Path, uid: int, workdir_mb: int) -> dict[str, str]:
    return {"PATH": _ROOT_PATH, "STAGE": str(stage), "SBX_UID": str(uid), "WORKDIR_MB": str(workdir_mb),
            **_layout_env()}


def _fallback_readable(stage: Path) -> list[str]:
    """What the fallback's audit hook lets a program open or list: its workdir, the interpreter's folders, the
    system folders and /etc files of the minimal root, /dev and /proc (other processes' entries refused)."""
    _, binds = _root_layout()
    return [str(stage), *(h for h, _ in binds), os.path.realpath(sys.prefix), *_ETC, "/dev", "/proc", "/sys"]


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
                    # The site-packages as bound in the minimal root; the fallback's interpreter finds its own,
                    # and its audit hook refuses reads outside these folders.
                    "sys_path": _sys_path() if namespaced else [],
                    "readable": [] if namespaced else _fallback_readable(stage)}
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
                    cmd, env, cwd = _namespace_cmd(), _setup_env(stage, uid, limits.workdir_mb), "/"
                else:
                    cmd = [sys.executable, "-I", "-B", "runner.py"]
                    env, cwd = dict(_MIN_ENV, HOME=str(stage), TMPDIR=str(stage)), str(stage)
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
