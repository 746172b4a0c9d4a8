"""Test generation's judging of candidate files, without a model: what does not parse, imports
something missing, hangs or fails is reported and never kept; what passes is kept."""

from __future__ import annotations

from r1kit.apps.code.testgen import _judge
from r1kit.sandbox import SandboxLimits

FILES = {"m.py": "def f():\n    return 1\n"}
LIMITS = SandboxLimits(timeout_s=30.0)  # a loaded machine can take seconds to start pytest


def test_candidates_are_kept_or_reported_with_the_reason():
    missing, _ = _judge(1, "import nosuchmod\nimport m\n\ndef test_a():\n    assert m.f() == 1\n", FILES, LIMITS)
    assert missing.problem == "imports something missing: ModuleNotFoundError: No module named 'nosuchmod'"
    mixed, passing = _judge(2, "import m\n\ndef test_a():\n    assert m.f() == 1\n\ndef test_b():\n    assert m.f() == 2\n\ndef test_c(", FILES, LIMITS)
    assert mixed.problem is None and mixed.kept == ["test_a"] and list(passing) == ["test_a"]
    assert ("test_b", "assert 1 == 2") in mixed.dropped
    assert ("1 unfinished line(s) at the end", "cut off at the token limit") in mixed.dropped
    hang, _ = _judge(3, "import m\n\ndef test_hang():\n    while True:\n        pass\n", FILES, SandboxLimits(timeout_s=3.0))
    assert hang.problem.startswith("hangs")
    broken, _ = _judge(4, "def test_(:\n", FILES, LIMITS)
    assert broken.problem == "does not parse" and not broken.kept
