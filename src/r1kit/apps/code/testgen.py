"""Unit-test generation: the model writes candidate pytest files for a module, the sandbox runs them, and
only the test functions that pass are kept, in one file whose header states the line coverage they
reach and what was dropped and why.

Each candidate is run alone (:func:`r1kit.sandbox.run_pytest`); a candidate that does not parse,
imports something missing, hangs or fails is reported, never kept. The kept tests are run again
together (one test can break another through shared state), and any that fail then are dropped too.
Nothing here trusts the model's code: it runs only in the sandbox.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import sys
from pathlib import Path

from r1kit.errors import ConfigError
from r1kit.infer.sampling import SamplingParams
from r1kit.sandbox import PytestResult, SandboxLimits, run_pytest


@dataclasses.dataclass(frozen=True)
class TestgenConfig:
    """``n`` candidate files (the seed's three), each up to ``max_new_tokens``, sampled at ``temperature``;
    ``max_source_chars`` of the module go in the prompt (the signatures always do)."""

    __test__ = False  # a configuration, not a pytest test class

    n: int = 3
    max_new_tokens: int = 384
    temperature: float = 0.7
    top_p: float = 0.95
    max_source_chars: int = 6000
    timeout_s: float = 30.0
    seed: int | None = 0

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_new_tokens < 1:
            raise ConfigError("n and max_new_tokens must be at least 1", param="n")


@dataclasses.dataclass(frozen=True)
class Module:
    """The module under test, read and parsed."""

    path: Path
    name: str
    source: str
    signatures: tuple[str, ...]
    local_files: dict[str, str]


@dataclasses.dataclass
class CandidateReport:
    """What became of one candidate file: ``kept`` test names, ``dropped`` ``(test, reason)`` pairs, and
    ``problem`` when the candidate as a whole was unusable (did not parse, import error, hang)."""

    index: int
    kept: list[str] = dataclasses.field(default_factory=list)
    dropped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    problem: str | None = None


@dataclasses.dataclass
class TestgenResult:
    """The written test file's text, the coverage it reaches (percent of the module's lines), and one
    report per candidate."""

    __test__ = False

    text: str
    coverage: float | None
    tests: list[str]
    candidates: list[CandidateReport]


def read_module(path: str | Path) -> Module:
    """The module at ``path`` with its public signatures; a clear error when it is missing, not UTF-8
    or not Python that parses."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist or is not a file; give the path of a Python module", param="module")
    if path.suffix != ".py" or not path.stem.isidentifier():
        raise ConfigError(f"{path} is not an importable Python module name (NAME.py); testgen writes pytest tests for Python only", param="module")
    try:
        source = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not valid UTF-8 (byte {exc.start})", param="module") from None
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as exc:
        raise ConfigError(f"{path} does not parse as Python (line {exc.lineno}: {exc.msg}); fix it before generating tests", param="module") from None
    return Module(path=path, name=path.stem, source=source, signatures=tuple(_signatures(tree)),
                  local_files=_local_imports(tree, path))


def _signatures(tree: ast.Module):
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
            yield f"def {node.name}({ast.unparse(node.args)}){returns}"
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            yield f"class {node.name}"
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and (not item.name.startswith("_") or item.name == "__init__"):
                    yield f"    def {item.name}({ast.unparse(item.args)})"


def _local_imports(tree: ast.Module, path: Path) -> dict[str, str]:
    """Sibling modules the module imports by name, which the sandbox needs beside it (never the standard
    library's, which the sandbox's interpreter has)."""
    names = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module and not node.level}
    found = {}
    for name in sorted(names - set(sys.stdlib_module_names)):
        sibling = path.parent / f"{name}.py"
        if sibling.is_file() and sibling != path:
            found[sibling.name] = sibling.read_text(encoding="utf-8", errors="replace")
    return found


def build_test_prompt(module: Module, config: TestgenConfig) -> tuple[str, str]:
    """The prompt (module source, public signatures, the start of a test file) and the test file's
    opening, which each candidate continues."""
    source = module.source if len(module.source) <= config.max_source_chars else module.source[:config.max_source_chars] + "\n# ...\n"
    public = [line.split("(")[0].split()[-1] for line in module.signatures if not line.startswith("    ")]
    opening = f"import pytest\n\nimport {module.name}\n"
    if public:
        opening += f"from {module.name} import {', '.join(public)}\n"
    opening += "\n\ndef test_"
    prompt = (f"# file: {module.name}.py\n{source.rstrip()}\n\n"
              f"# Public API of {module.name}:\n" + "".join(f"#   {line}\n" for line in module.signatures)
              + f"\n\n# file: test_{module.name}.py\n# pytest tests for {module.name}: each test calls the API and asserts the exact result.\n"
              + opening)
    return prompt, opening


def generate_tests(llm, module: Module, config: TestgenConfig = TestgenConfig(), progress=None) -> TestgenResult:
    """Sample ``config.n`` candidate test files for ``module``, keep the passing tests, measure coverage."""
    prompt, opening = build_test_prompt(module, config)
    params = SamplingParams(n=config.n, temperature=config.temperature, top_p=config.top_p,
                            max_tokens=config.max_new_tokens, seed=config.seed)
    outputs = llm.generate([prompt], params)[0].outputs
    files = {f"{module.name}.py": module.source, **module.local_files}
    limits = SandboxLimits(timeout_s=config.timeout_s)
    reports, kept = [], {}  # kept: test function source -> (name, the candidate's import lines)
    for index, output in enumerate(outputs, 1):
        report, passing = _judge(index, opening + output.text, files, limits)
        reports.append(report)
        for name, (source, imports) in passing.items():
            if source not in kept:
                kept[source] = (name, imports)
        if progress is not None:
            progress.update(1)
    text, tests, coverage = _combine(module, kept, files, limits, reports)
    return TestgenResult(text=text, coverage=coverage, tests=tests, candidates=reports)


def _judge(index: int, text: str, files: dict[str, str], limits: SandboxLimits):
    """Run one candidate; the passing test functions as ``name -> (source, import lines)``."""
    report = CandidateReport(index)
    tree, trimmed = _parse_complete(text)
    if tree is None:
        report.problem = "does not parse"
        return report, {}
    tests = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test")}
    if trimmed:
        report.dropped.append((f"{trimmed} unfinished line(s) at the end", "cut off at the token limit"))
    if not tests:
        report.problem = "has no test functions"
        return report, {}
    result = run_pytest(ast.unparse(tree), files=files, limits=limits, test_name="test_candidate.py")
    problem = _whole_file_problem(result, [f"test_candidate.py::{name}" for name in tests])
    if problem:
        report.problem = problem
        return report, {}
    imports = [ast.unparse(node) for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    passing = {}
    for name, node in tests.items():
        outcome = result.outcomes.get(f"test_candidate.py::{name}", "not collected")
        if outcome == "passed":
            passing[name] = (ast.unparse(node), imports)
            report.kept.append(name)
        else:
            report.dropped.append((name, _failure_reason(result, name, outcome)))
    return report, passing


def _parse_complete(text: str) -> tuple[ast.Module | None, int]:
    """The candidate parsed, after dropping trailing lines the token limit cut off mid-statement."""
    lines = text.splitlines()
    for drop in range(len(lines)):
        try:
            return ast.parse("\n".join(lines[:len(lines) - drop])), drop
        except SyntaxError:
            continue
    return None, 0


def _whole_file_problem(result: PytestResult, names: list[str]) -> str | None:
    run = result.run
    if run.timed_out:
        return f"hangs (killed after {run.duration_s:.0f} s)"
    if run.memory_exceeded:
        return "runs out of memory"
    if any(name in result.outcomes for name in names):
        return None
    output = run.stdout + run.stderr
    for marker, reason in (("ModuleNotFoundError", "imports something missing"), ("ImportError", "imports something missing")):
        if marker in output:
            line = next((ln for ln in output.splitlines() if marker in ln), marker)
            return f"{reason}: {line.strip().removeprefix('E').strip()}"
    last = next((ln for ln in reversed(output.splitlines()) if ln.strip()), "no output")
    return f"could not be collected: {last.strip()}"


def _failure_reason(result: PytestResult, name: str, outcome: str) -> str:
    """A one-line reason: pytest's short summary line for the test, else its outcome."""
    for line in result.run.stdout.splitlines():
        if f"::{name} - " in line:
            return line.split(" - ", 1)[1].strip()[:160]
    return outcome


def _combine(module: Module, kept: dict, files: dict[str, str], limits: SandboxLimits, reports: list[CandidateReport]):
    """The kept tests in one file, run together (dropping any that fail there) with coverage measured."""
    entries = _unique_names(kept)
    coverage = None
    for _ in range(3):
        body = _test_file_body(module, entries)
        if not entries:
            break
        result = run_pytest(body, files=files, limits=limits, coverage_of=[f"{module.name}.py"], test_name="test_kept.py")
        failing = [name for name, _ in entries if result.outcomes.get(f"test_kept.py::{name}") != "passed"]
        coverage = result.coverage.get(f"{module.name}.py")
        if not failing:
            break
        for report in reports:
            report.dropped.extend((name, "passes alone, fails with the other kept tests") for name in failing if name in report.kept)
            report.kept = [name for name in report.kept if name not in failing]
        entries = [(name, source) for name, source in entries if name not in failing]
        coverage = None
    else:
        entries, body = [], _test_file_body(module, [])
    return body, [name for name, _ in entries], coverage


def _unique_names(kept: dict) -> list[tuple[str, str]]:
    """``(name, source)`` for each kept test, a second ``test_x`` from another candidate renamed ``test_x_2``."""
    seen: dict[str, int] = {}
    out = []
    for source, (name, imports) in kept.items():
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            tree = ast.parse(source)
            tree.body[0].name = f"{name}_{seen[name]}"
            name, source = tree.body[0].name, ast.unparse(tree)
        out.append((name, "\n".join([*imports, source])))
    return out


def _test_file_body(module: Module, entries: list[tuple[str, str]]) -> str:
    imports: list[str] = []
    bodies = []
    for _, source in entries:
        lines = source.split("\n")
        head = [ln for ln in lines if ln.startswith(("import ", "from "))]
        imports.extend(ln for ln in head if ln not in imports)
        bodies.append("\n".join(lines[len(head):]))
    return "\n".join(imports or [f"import {module.name}"]) + "\n\n\n" + "\n\n\n".join(bodies) + ("\n" if bodies else "")


def render(result: TestgenResult, module: Module, out: Path, model: str) -> str:
    """The file to write at ``out``: a header (coverage, what was kept and dropped and why), a line that
    puts the module's folder on ``sys.path`` (relative to the test file), then the tests."""
    coverage = "not measured (no test kept)" if result.coverage is None else f"{result.coverage:.1f}% of the lines of {module.path.name}"
    lines = [f"Tests for {module.path.name}, generated by `r1kit apps testgen` with {model}.",
             "Each test below passed in r1kit's sandbox, alone and together with the others.",
             f"Kept: {len(result.tests)} test(s) from {len(result.candidates)} candidate file(s). Line coverage: {coverage}."]
    dropped = [f"- candidate {r.index}: {r.problem}" for r in result.candidates if r.problem]
    dropped += [f"- candidate {r.index}, {name}: {reason}" for r in result.candidates for name, reason in r.dropped]
    lines += ["Dropped:", *dropped] if dropped else ["Dropped: nothing."]
    header = '"""' + "\n".join(line.replace('"""', "'''").replace("\\", "/") for line in lines) + '\n"""\n'
    relative = os.path.relpath(module.path.resolve().parent, out.resolve().parent)
    path_line = f"import sys\nfrom pathlib import Path\n\nsys.path.insert(0, str(Path(__file__).resolve().parent / {relative!r}))\n\n"
    return header + path_line + result.text


