"""The sandbox's contract: limits hold, the network and the rest of the disk are out of reach, the whole
process group dies, and pytest outcomes and coverage come back right."""

from __future__ import annotations

import os
import time

import pytest

from r1kit.errors import ConfigError
from r1kit.sandbox import SandboxLimits, isolation, run_pytest, run_python


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except FileNotFoundError:
        return False


def test_good_code_runs_with_args_stdin_and_files():
    result = run_python("import sys, helper\nprint(helper.twice(sys.stdin.read().strip()), *sys.argv[1:])",
                        files={"helper.py": "def twice(s):\n    return s * 2\n"}, args=["a", "b"], stdin="xy\n")
    assert result.ok, result.stderr
    assert result.stdout == "xyxy a b\n"


def test_infinite_loop_is_killed_at_the_wall_clock_limit():
    start = time.perf_counter()
    result = run_python("while True:\n    pass\n", limits=SandboxLimits(timeout_s=1.0))
    assert result.timed_out and not result.ok
    assert result.returncode is not None and result.returncode < 0
    assert 0.9 <= time.perf_counter() - start < 5.0


def test_allocating_too_much_is_stopped():
    result = run_python("blob = bytearray(2 << 30)\nprint('allocated')", limits=SandboxLimits(memory_mb=256))
    assert result.memory_exceeded and not result.ok
    assert "allocated" not in result.stdout


def test_opening_a_socket_fails():
    result = run_python("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=2)")
    assert not result.ok
    assert "network access is not allowed" in result.stderr


def test_writing_outside_the_folder_fails(tmp_path):
    target = tmp_path / "escaped.txt"
    result = run_python(f"open({str(target)!r}, 'w').write('x')")
    assert not result.ok and "outside the run's folder" in result.stderr
    assert not target.exists()
    inside = run_python("import os\nos.makedirs('a/b')\nopen('a/b/c.txt', 'w').write('kept')", keep_files=True)
    assert inside.ok, inside.stderr
    assert inside.files["a/b/c.txt"] == b"kept"


@pytest.mark.skipif(isolation() != "namespaces", reason="this kernel gives the sandbox no namespaces")
def test_the_operating_system_holds_when_the_audit_hook_is_bypassed(tmp_path):
    # libc calls go around the interpreter's audit hook: only the namespaces stop these
    target = tmp_path / "escaped.txt"
    code = f"""
import ctypes, os, socket
libc = ctypes.CDLL(None, use_errno=True)
print(libc.open({str(target).encode()!r}, os.O_WRONLY | os.O_CREAT, 0o644), ctypes.get_errno())
addr = (ctypes.c_ubyte * 16)(2, 0, 0, 80, 1, 1, 1, 1)  # AF_INET, port 80, 1.1.1.1
fd = libc.socket(2, 1, 0)
print(libc.connect(fd, addr, 16), ctypes.get_errno())
print(libc.mount(None, b"/", None, 32 | 4096, None))  # MS_REMOUNT|MS_BIND without MS_RDONLY: make / writable again
"""
    result = run_python(code)
    assert result.ok, result.stderr
    opened, connected, remounted = (line.split() for line in result.stdout.splitlines())
    assert opened == ["-1", "30"]  # EROFS
    assert connected == ["-1", "101"]  # ENETUNREACH: the namespace has no route anywhere
    assert remounted == ["-1"]
    assert not target.exists()


def test_output_is_truncated_at_the_limit():
    result = run_python("import sys\nsys.stdout.write('x' * 100_000)", limits=SandboxLimits(max_output_bytes=1000))
    assert result.ok and result.output_truncated
    assert result.stdout.split("\n")[0] == "x" * 1000
    assert "99000 more bytes" in result.stdout


def test_children_die_with_the_run():
    code = """
import os, sys, time
pid = os.fork()
if pid == 0:
    time.sleep(600)
    os._exit(0)
print(pid, flush=True)
{tail}
"""
    for tail, limits in (("", SandboxLimits()), ("time.sleep(600)", SandboxLimits(timeout_s=1.0))):
        result = run_python(code.format(tail=tail), limits=limits)
        child = int(result.stdout.split()[0])
        assert result.timed_out == bool(tail)
        deadline = time.monotonic() + 5
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child)


def test_starting_programs_is_refused():
    result = run_python("import subprocess\nsubprocess.run(['true'])")
    assert not result.ok and "starting programs" in result.stderr


def test_file_names_must_stay_inside_the_folder():
    with pytest.raises(ConfigError, match="relative path inside"):
        run_python("pass", files={"../up.py": "x = 1"})
    with pytest.raises(ConfigError, match="timeout_s"):
        SandboxLimits(timeout_s=0)


def test_pytest_outcomes_and_coverage():
    # mod.f has four executable lines (def, if, two returns); the tests reach three: 75%
    module = "def f(x):\n    if x > 5:\n        return 0\n    return x * 2\n"
    tests = "import mod\n\ndef test_good():\n    assert mod.f(2) == 4\n\ndef test_bad():\n    assert mod.f(1) == 3\n\ndef test_broken():\n    raise KeyError\n"
    result = run_pytest(tests, files={"mod.py": module}, coverage_of=["mod.py"])
    assert result.outcomes == {"test_main.py::test_good": "passed", "test_main.py::test_bad": "failed",
                               "test_main.py::test_broken": "failed"}
    assert result.passed == ["test_main.py::test_good"]
    assert result.coverage == {"mod.py": 75.0}
    assert not os.path.exists(".r1kit_coverage")


def test_a_module_named_like_one_pytest_already_imported_is_the_file_under_test():
    """fnmatch is imported by pytest itself before any test: the tests must still run, and coverage
    measure, the fnmatch.py given (a standard-library module under testgen is this case)."""
    module = "def under_test():\n    return 'the copy'\n"
    result = run_pytest("import fnmatch\n\ndef test_copy():\n    assert fnmatch.under_test() == 'the copy'\n",
                        files={"fnmatch.py": module}, coverage_of=["fnmatch.py"])
    assert result.passed == ["test_main.py::test_copy"]
    assert result.coverage == {"fnmatch.py": 100.0}


def test_pytest_on_code_that_does_not_parse_reports_no_outcomes():
    result = run_pytest("def test_x(:\n    pass\n")
    assert result.passed == [] and not result.run.ok
