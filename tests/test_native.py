"""The C build helper: a library is rebuilt when its source or a shared header changes, and found in
the cache otherwise."""

import ctypes
import shutil

import pytest

from r1kit import native

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="no C compiler")


def test_a_changed_header_is_a_new_build(tmp_path, monkeypatch):
    include, cache = tmp_path / "include", tmp_path / "cache"
    include.mkdir()
    monkeypatch.setattr(native, "INCLUDE", include)
    source = tmp_path / "answer.c"
    source.write_text('#include "answer.h"\nint answer(void) { return ANSWER; }\n')
    (include / "answer.h").write_text("#define ANSWER 41\n")
    first = native.build(source, cache)
    assert native.build(source, cache) == first  # cached: the same library
    (include / "answer.h").write_text("#define ANSWER 42\n")
    second = native.build(source, cache)
    assert second != first and ctypes.CDLL(str(first)).answer() == 41 and ctypes.CDLL(str(second)).answer() == 42


def test_no_compiler_is_no_library_and_a_warning_that_says_what_runs_instead(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("R1KIT_KERNEL_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "answer.c"
    source.write_text("int answer(void) { return 42; }\n")
    with caplog.at_level("WARNING"):
        assert native.load(source, "PyTorch's path runs") is None
    assert "answer.c unavailable, PyTorch's path runs" in caplog.text
