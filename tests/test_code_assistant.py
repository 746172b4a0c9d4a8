"""The code assistant end to end with the real SmolLM2-135M-Instruct: completion through the CLI, and
test generation whose written file runs under pytest with every kept test passing."""

from __future__ import annotations

import argparse
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from r1kit.apps.code.testgen import (
    TestgenConfig,
    generate_tests,
    read_module,
    render,
)
from r1kit.cli import apps_complete, apps_testgen
from r1kit.config import write_text_atomic
from r1kit.errors import ConfigError

MODULE = '''"""Small helpers."""


def add(a, b):
    """Return a + b."""
    return a + b


def clamp(x, low, high):
    """Clamp x into [low, high]."""
    if x < low:
        return low
    if x > high:
        return high
    return x
'''


def _args(module, argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


def test_complete_through_the_cli(smollm2_dir, tmp_path, capsys):
    source = tmp_path / "area.py"
    source.write_text("def area(width, height):\n    \"\"\"The area of a rectangle.\"\"\"\n    return\n\n\nprint(area(2, 3))\n")
    code = apps_complete.run(_args(apps_complete, [str(source), "--line", "3", "--model", str(smollm2_dir), "-n", "2",
                                                   "--max-new-tokens", "8", "--single-line", "--json"]))
    assert code == 0
    import json

    report = json.loads(capsys.readouterr().out)
    assert report["language"] == "python" and report["fim"] is None  # SmolLM2 has no FIM tokens: prefix only
    scores = [c["mean_logprob"] for c in report["candidates"]]
    assert scores and scores == sorted(scores, reverse=True) and all(s <= 0 for s in scores)
    assert all("\n" not in c["text"] for c in report["candidates"])  # single-line mode


def test_bad_input_is_refused_before_the_model_loads(tmp_path):
    missing = tmp_path / "nope.py"
    binary = tmp_path / "bin.py"
    binary.write_bytes(b"x = '\xff\xfe'\n")
    unknown = tmp_path / "notes.xyz"
    unknown.write_text("hello\n")
    for path, message in ((missing, "does not exist"), (binary, "not valid UTF-8"), (unknown, "no known language")):
        with pytest.raises(ConfigError, match=message):
            apps_complete.run(_args(apps_complete, [str(path), "--line", "1", "--model", "/nonexistent"]))
    with pytest.raises(ConfigError, match="does not parse"):
        (tmp_path / "broken.py").write_text("def f(:\n")
        apps_testgen.run(_args(apps_testgen, [str(tmp_path / "broken.py"), "--out", str(tmp_path / "t.py")]))


@pytest.fixture(scope="module")
def smollm2_llm(smollm2_dir):
    from r1kit.infer.llm import LLM

    return LLM(smollm2_dir)


def test_testgen_keeps_only_passing_tests_and_the_file_runs(smollm2_llm, tmp_path):
    (tmp_path / "pkg").mkdir()
    path = tmp_path / "pkg" / "helpers.py"
    path.write_text(MODULE)
    module = read_module(path)
    assert module.signatures == ("def add(a, b)", "def clamp(x, low, high)")
    result = generate_tests(smollm2_llm, module, TestgenConfig(n=3, max_new_tokens=64))
    assert [r.index for r in result.candidates] == [1, 2, 3]  # every candidate was run and reported
    for report in result.candidates:
        assert report.problem or report.kept or report.dropped
    out = tmp_path / "tests" / "test_helpers.py"
    write_text_atomic(out, render(result, module, out, "smollm2"))
    text = out.read_text()
    assert f"Kept: {len(result.tests)} test(s) from 3 candidate file(s)" in text
    # an independent run of the written file: plain pytest, outside the sandbox
    junit = tmp_path / "junit.xml"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", str(out),
                          f"--junitxml={junit}"], check=False, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    cases = list(ET.parse(junit).getroot().iter("testcase"))
    assert sorted(case.get("name") for case in cases) == sorted(result.tests)
    assert all(len(case) == 0 for case in cases), run.stdout  # no failure, error or skip element
    assert run.returncode == (0 if result.tests else 5), run.stdout  # 5: pytest collected no test
    if result.tests:
        assert result.coverage is not None and 0 < result.coverage <= 100
