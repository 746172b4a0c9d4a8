"""Run untrusted Python (model-written code, generated tests) in a child process that cannot hurt the host.

The contract, for ``run_python`` and ``run_pytest``: the code runs as ``main.py`` (or pytest) in a fresh
temporary folder that is removed afterwards; it is killed, with every process it started in its
process group, at the wall-clock limit; its memory (address space), CPU time, file sizes and output
are bounded; it has no network and writes nothing outside its folder. It must never import the rest
of r1kit: it is ground, used by the code assistant and by reasoning training's code rewards alike.

How each guarantee is made, strongest layer first (the child sets this up itself, single-threaded,
before the user's first line):

- **Operating system** (Linux, where the kernel lets this process create namespaces; ``isolation()``
  says whether it does): a new network namespace with only a down loopback, and a new mount
  namespace in which every mount is re-mounted read-only except the folder. Then the child sets
  no-new-privileges and drops every capability, so neither root nor a setuid program can undo it.
  Unprivileged users get the same through a user namespace.
- **Resource limits**: ``RLIMIT_AS`` (memory), ``RLIMIT_CPU``, ``RLIMIT_FSIZE``, ``RLIMIT_CORE=0``;
  a new session, so one ``killpg`` reaches every descendant that did not leave the group itself.
- **Interpreter audit hook** (always, and the only network/write guard where namespaces are not
  allowed): refuses non-Unix sockets, opening files for writing, renaming, removing or creating
  entries outside the folder, and starting programs (``subprocess``, ``os.system``, ``os.exec*``,
  which would run without the hook). An audit hook is not a security boundary on its own: code that
  loads C through ``ctypes`` can step around it. Where ``isolation()`` is ``"namespaces"`` the
  operating system holds the line even then.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from pathlib import Path

from r1kit.errors import ConfigError

# Exit status the child reports when the user's code ran out of memory (a MemoryError it did not
# catch); chosen outside the range Python and pytest use themselves.
MEMORY_EXIT = 117
_GUARD = "from r1kit.sandbox import _guard_main; _guard_main()"
_JUNIT = ".r1kit_junit.xml"
_COVERAGE = ".r1kit_coverage.json"


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """What one run may use. ``network=True`` lifts only the network guard."""

    timeout_s: float = 10.0
    memory_mb: int = 512
    max_output_bytes: int = 1 << 20
    network: bool = False
    max_file_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ConfigError(f"timeout_s must be > 0 seconds, got {self.timeout_s}", param="timeout_s")
        if self.memory_mb < 64:
            raise ConfigError(f"memory_mb must be at least 64 (Python alone needs that), got {self.memory_mb}", param="memory_mb")
        if self.max_output_bytes < 1 or self.max_file_bytes < 1:
            raise ConfigError("max_output_bytes and max_file_bytes must be positive", param="max_output_bytes")


@dataclasses.dataclass
class SandboxResult:
    """What a run did. ``returncode`` is negative for a signal (``-9``: killed), None if it never started."""

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    memory_exceeded: bool
    duration_s: float
    files: dict[str, bytes] = dataclasses.field(default_factory=dict)
    output_truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.memory_exceeded


@dataclasses.dataclass
class PytestResult:
    """One pytest run: the outcome of each test by node id (``passed``/``failed``/``error``/``skipped``),
    line coverage in percent of each module named in ``coverage_of`` (absent when not asked for or
    when the run produced none), and the raw run."""

    outcomes: dict[str, str]
    coverage: dict[str, float]
    run: SandboxResult

    @property
    def passed(self) -> list[str]:
        return [name for name, outcome in self.outcomes.items() if outcome == "passed"]


def run_python(
    code: str,
    *,
    files: Mapping[str, str | bytes] | None = None,
    args: Sequence[str] = (),
    stdin: str | None = None,
    limits: SandboxLimits = SandboxLimits(),
    keep_files: bool = False,
) -> SandboxResult:
    """Run ``code`` as ``main.py`` beside ``files`` (relative paths) with ``args``; ``keep_files`` returns
    every file the run left in its folder (up to ``max_output_bytes`` in all)."""
    return _execute({**(files or {}), "main.py": code}, ["main.py", *args], stdin, limits, keep_files)[0]


# A module under test may share its name with one the interpreter or pytest imported before the tests
# (a standard-library name such as fnmatch): the tests must run, and coverage measure, the file given.
_SHADOW_CONFTEST = """import importlib.util
import sys
from pathlib import Path

for _name in {modules!r}:
    _path = Path(__file__).with_name(_name + ".py")
    _loaded = sys.modules.get(_name)
    if _loaded is not None and Path(getattr(_loaded, "__file__", None) or "").resolve() != _path.resolve():
        _spec = importlib.util.spec_from_file_location(_name, _path)
        _module = importlib.util.module_from_spec(_spec)
        sys.modules[_name] = _module
        _spec.loader.exec_module(_module)
"""


def run_pytest(
    test_code: str,
    *,
    files: Mapping[str, str | bytes] | None = None,
    limits: SandboxLimits = SandboxLimits(timeout_s=60.0),
    coverage_of: Sequence[str] = (),
    test_name: str = "test_main.py",
) -> PytestResult:
    """Run ``test_code`` (saved as ``test_name``) under pytest beside ``files``; with ``coverage_of``
    (module file names among ``files``), measure their line coverage with ``coverage``."""
    if coverage_of:
        missing = [name for name in coverage_of if name not in (files or {})]
        if missing:
            raise ConfigError(f"coverage_of names {missing}, which are not among the files given", param="coverage_of")
    pytest_argv = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "junit_family=xunit1", f"--junitxml={_JUNIT}", test_name]
    files = dict(files or {})
    modules = [name[:-3] for name in files if name.endswith(".py") and "/" not in name and not name.startswith(("test_", "conftest"))]
    if modules and "conftest.py" not in files:
        files["conftest.py"] = _SHADOW_CONFTEST.format(modules=modules)
    if coverage_of:
        # coverage runs pytest in the same process, so the guard and the limits cover both
        pytest_argv = ["-m", "coverage", "run", "--data-file=.r1kit_coverage", "--include=" + ",".join(coverage_of), *pytest_argv]
    run, found = _execute({**files, test_name: test_code}, pytest_argv, None, limits, False,
                          fetch=[_JUNIT], report_coverage=bool(coverage_of))
    coverage = _read_coverage(found.get(_COVERAGE), coverage_of)
    return PytestResult(outcomes=_read_junit(found.get(_JUNIT)), coverage=coverage, run=run)


@functools.cache
def isolation() -> str:
    """``"namespaces"`` when a sandboxed child here gets network and mount namespaces of its own, else
    ``"audit-hook"`` (the in-interpreter guard alone). Probed once per process by a real run, whose
    namespaces are compared with this process's."""
    probe = run_python("import os; print(os.readlink('/proc/self/ns/net'), os.readlink('/proc/self/ns/mnt'))",
                       limits=SandboxLimits(timeout_s=30.0))
    ours = f"{os.readlink('/proc/self/ns/net')} {os.readlink('/proc/self/ns/mnt')}"
    theirs = probe.stdout.split()
    return "namespaces" if probe.ok and len(theirs) == 2 and not set(theirs) & set(ours.split()) else "audit-hook"


def _execute(files, target, stdin, limits, keep_files, fetch=(), report_coverage=False):
    root = Path(tempfile.mkdtemp(prefix="r1kit-sandbox-")).resolve()
    try:
        for name, content in files.items():
            path = _inside(root, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content.encode("utf-8") if isinstance(content, str) else bytes(content))
        (root / "tmp").mkdir(exist_ok=True)
        spec = {"root": str(root), "network": limits.network, "memory_mb": limits.memory_mb,
                "cpu_s": math.ceil(limits.timeout_s) + 1, "file_bytes": limits.max_file_bytes}
        env = {"PATH": "/usr/bin:/bin", "HOME": str(root), "TMPDIR": str(root / "tmp"), "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0",
               # only pytest's own plugins: the host's (hypothesis, anyio, ...) cost seconds to import
               "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
        run = _spawn([sys.executable, "-I", "-c", _GUARD, json.dumps(spec), *target], root, env, stdin, limits)
        if report_coverage and run.returncode is not None and not run.timed_out:
            # a second short run in the same folder turns the data file into JSON, under the same guard
            _spawn([sys.executable, "-I", "-c", _GUARD, json.dumps(spec), "-m", "coverage", "json",
                    "--data-file=.r1kit_coverage", "-o", _COVERAGE, "-q"], root, env, None, limits)
            fetch = [*fetch, _COVERAGE]
        found = {name: (root / name).read_bytes() for name in fetch if (root / name).is_file()}
        if keep_files:
            run.files = _collect(root, limits.max_output_bytes)
        return run, found
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _inside(root: Path, name: str) -> Path:
    path = (root / name).resolve()
    if Path(name).is_absolute() or not path.is_relative_to(root.resolve()) or path == root.resolve():
        raise ConfigError(f"sandbox file name {name!r} must be a relative path inside the run's folder", param="files")
    return path


def _collect(root: Path, budget: int) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink() and path.stat().st_size <= budget:
            budget -= path.stat().st_size
            out[str(path.relative_to(root))] = path.read_bytes()
    return out


def _spawn(argv, root, env, stdin, limits) -> SandboxResult:
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=root, env=env, start_new_session=True, close_fds=True,
                            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    readers = [_Capped(proc.stdout, limits.max_output_bytes), _Capped(proc.stderr, limits.max_output_bytes)]
    if stdin is not None:
        threading.Thread(target=_feed, args=(proc.stdin, stdin.encode("utf-8")), daemon=True).start()
    timed_out = False
    try:
        proc.wait(timeout=limits.timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    # the whole group goes, also when the main process exited and left children behind
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    duration = time.perf_counter() - start
    out, err = (reader.join() for reader in readers)
    code = proc.returncode
    timed_out = timed_out or code == -signal.SIGXCPU
    return SandboxResult(returncode=code, stdout=out[0], stderr=err[0], timed_out=timed_out,
                         memory_exceeded=code == MEMORY_EXIT, duration_s=duration,
                         output_truncated=out[1] or err[1])


class _Capped:
    """Drains a pipe on its own thread (so a chatty child never blocks on a full pipe) and keeps the first ``cap`` bytes."""

    def __init__(self, pipe, cap: int) -> None:
        self.chunks: list[bytes] = []
        self.kept = 0
        self.dropped = 0
        self.cap = cap
        self.thread = threading.Thread(target=self._drain, args=(pipe,), daemon=True)
        self.thread.start()

    def _drain(self, pipe) -> None:
        with pipe:
            while chunk := pipe.read1(1 << 16):
                room = self.cap - self.kept
                self.chunks.append(chunk[:room])
                self.kept += min(room, len(chunk))
                self.dropped += max(0, len(chunk) - room)

    def join(self) -> tuple[str, bool]:
        self.thread.join()
        text = b"".join(self.chunks).decode("utf-8", errors="replace")
        if self.dropped:
            text += f"\n[r1kit sandbox: {self.dropped} more bytes of output dropped]\n"
        return text, bool(self.dropped)


def _feed(pipe, data: bytes) -> None:
    with contextlib.suppress(BrokenPipeError, OSError), pipe:
        pipe.write(data)


def _read_junit(xml: bytes | None) -> dict[str, str]:
    if not xml:
        return {}
    outcomes: dict[str, str] = {}
    for case in ET.fromstring(xml).iter("testcase"):
        name = f"{case.get('file') or case.get('classname', '')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        outcome = "error" if "error" in kinds else "failed" if "failure" in kinds else "skipped" if "skipped" in kinds else "passed"
        outcomes[name] = outcome
    return outcomes


def _read_coverage(report: bytes | None, modules: Sequence[str]) -> dict[str, float]:
    if not report:
        return {}
    files = json.loads(report)["files"]
    return {name: float(files[name]["summary"]["percent_covered"]) for name in modules if name in files}


# ----- the child side: runs first in the sandboxed interpreter, before any of the user's code -----

_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_NOATIME, _MS_NODIRATIME, _MS_RELATIME = 1024, 2048, 1 << 21
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_PR_SET_NO_NEW_PRIVS = 38
# mount options a user namespace may not drop when it re-mounts read-only; kept as they are
_KEPT_FLAGS = {"nosuid": _MS_NOSUID, "nodev": _MS_NODEV, "noexec": _MS_NOEXEC, "noatime": _MS_NOATIME,
               "nodiratime": _MS_NODIRATIME, "relatime": _MS_RELATIME}
_EXEC_EVENTS = {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork_exec", "pty.spawn"}
_PATH_EVENTS = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.chmod",
                "os.chown", "os.truncate", "os.utime", "os.mkfifo", "os.mknod"}


def _guard_main() -> None:
    """Entry point of the child: ``python -I -c _GUARD SPEC_JSON (main.py ARGS | -m MODULE ARGS)``."""
    import runpy

    spec = json.loads(sys.argv[1])
    root = spec["root"]
    target = sys.argv[2:]
    _isolate(root, spec["network"])
    # the working directory was entered before the folder's own mount existed: enter it again, or
    # relative paths would still resolve on the read-only mount beneath
    os.chdir(root)
    _limit(spec)
    sys.addaudithook(_audit_hook(os.path.realpath(root), spec["network"]))
    sys.path.insert(0, root)
    try:
        if target[0] == "-m":
            sys.argv = [target[1], *target[2:]]
            runpy.run_module(target[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = target
            runpy.run_path(target[0], run_name="__main__")
    except MemoryError:
        sys.stderr.write("MemoryError: the sandbox's memory limit was reached\n")
        sys.stderr.flush()
        os._exit(MEMORY_EXIT)


def _isolate(root: str, network: bool) -> bool:
    """New mount (and network) namespaces with everything but ``root`` read-only, then no privileges
    left to undo it. False where the kernel refuses: the audit hook is then the only guard."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    flags = _CLONE_NEWNS | (0 if network else _CLONE_NEWNET) | (0 if uid == 0 else _CLONE_NEWUSER)
    if libc.unshare(flags) != 0:
        return False
    if uid != 0:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    mount = libc.mount
    mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    ok = mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None) == 0
    ok = ok and mount(root.encode(), root.encode(), None, _MS_BIND | _MS_REC, None) == 0
    root_real = os.path.realpath(root)
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    for fields in mounts:
        point = fields[4].encode().decode("unicode_escape")
        if point == root_real or point.startswith(root_real + "/"):
            continue
        kept = sum(flag for name, flag in _KEPT_FLAGS.items() if name in fields[5].split(","))
        done = mount(None, point.encode(), None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | kept, None) == 0
        # pseudo-filesystems that refuse (some /proc, /sys entries) hold no files the code could alter
        ok = ok and (done or fields[fields.index("-") + 1] in ("proc", "sysfs", "cgroup", "cgroup2", "mqueue"))
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    _drop_capabilities(libc)
    return ok


def _drop_capabilities(libc) -> None:
    import ctypes

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3: two 32-bit words
    libc.capset(ctypes.byref(header), data)


def _limit(spec: dict) -> None:
    memory = spec["memory_mb"] << 20
    for which, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, spec["cpu_s"]),
                         (resource.RLIMIT_FSIZE, spec["file_bytes"]), (resource.RLIMIT_CORE, 0)):
        hard = resource.getrlimit(which)[1]
        limit = value if hard == resource.RLIM_INFINITY else min(value, hard)
        # CPU: the soft limit sends SIGXCPU, the hard one a second later SIGKILL
        resource.setrlimit(which, (limit, limit + 1 if which == resource.RLIMIT_CPU and hard == resource.RLIM_INFINITY else limit))


def _audit_hook(root: str, network: bool):
    import socket

    allowed = {os.devnull}

    def outside(path) -> bool:
        if isinstance(path, int) or path is None:
            return False
        real = os.path.realpath(os.fsdecode(path))
        return not (real == root or real.startswith(root + os.sep) or real in allowed)

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND))
            if writing and outside(path):
                raise PermissionError(f"r1kit sandbox: writing outside the run's folder is not allowed: {path!r}")
        elif event in _PATH_EVENTS:
            for arg in args:
                if isinstance(arg, (str, bytes, os.PathLike)) and outside(arg):
                    raise PermissionError(f"r1kit sandbox: {event} outside the run's folder is not allowed: {arg!r}")
        elif event in _EXEC_EVENTS:
            raise PermissionError(f"r1kit sandbox: starting programs ({event}) is not allowed")
        elif event == "socket.__new__" and not network and args[1] != socket.AF_UNIX:
            raise PermissionError("r1kit sandbox: network access is not allowed")

    return hook
