"""Rewards a program can check: the reasoning format, and answers read from a completion and compared
with the known one (exact text, numbers, countdown equations, code run against unit tests).

A completion is read as R1 writes one: reasoning, ``</think>``, then the answer (the opening
``<think>`` may sit in the prompt, as R1's template puts it there). The answer is looked for only
after ``</think>``, so an answer that appears inside the reasoning earns nothing; lines of the
prompt that hold a ``\\boxed{}`` are cut out of the completion first, so a prompt echoed back
cannot answer for the model. Every function is pure except :func:`code_reward`, which runs the
code in :mod:`r1kit.sandbox` (a subprocess with time and memory limits), never in this process.
"""

from __future__ import annotations

import ast
import math
import re
from collections import Counter
from fractions import Fraction

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_FRAC = re.compile(r"\\d?frac\{(-?\d+)\}\{(\d+)\}")
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
_CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def split_reasoning(completion: str) -> tuple[str, str | None]:
    """(reasoning, answer): the text before and after the one ``</think>``; answer None when there is
    no ``</think>``, more than one, or a ``<think>`` after it (the format is broken)."""
    if completion.count(THINK_CLOSE) != 1:
        return completion, None
    reasoning, answer = completion.split(THINK_CLOSE)
    if THINK_OPEN in answer or reasoning.count(THINK_OPEN) > 1 or (THINK_OPEN in reasoning and not reasoning.lstrip().startswith(THINK_OPEN)):
        return completion, None
    return reasoning.removeprefix(THINK_OPEN).strip(), answer.strip()


def format_reward(completion: str) -> float:
    """1 for ``[<think>] reasoning </think> answer`` with a non-empty reasoning and answer, else 0."""
    reasoning, answer = split_reasoning(completion)
    return float(answer is not None and bool(reasoning) and bool(answer))


def answer_text(completion: str, prompt: str = "", require_think: bool = True) -> str | None:
    """The part of ``completion`` that holds the answer: after ``</think>`` (None when the format is
    broken), or the whole completion when ``require_think`` is off; the prompt's ``\\boxed{}`` lines
    that the completion echoes are removed first."""
    for line in prompt.splitlines():
        if "\\boxed" in line and line.strip():
            completion = completion.replace(line.strip(), "")
    if not require_think:
        return completion.split(THINK_CLOSE)[-1].strip()
    return split_reasoning(completion)[1]


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in ``text`` (nested braces kept), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j].strip()
    return None


def final_answer(text: str) -> str | None:
    """The answer a text states: its last ``\\boxed{}``, else its last non-empty line."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else None


def parse_number(text: str) -> Fraction | None:
    """The last number in ``text`` (``-12``, ``1,024``, ``3.5``, ``7/4``, ``\\frac{7}{4}``) as an exact fraction, or None."""
    found = _NUMBER.findall(_FRAC.sub(r"\1/\2", text.replace("$", "")))
    if not found:
        return None
    raw = found[-1].replace(",", "")
    try:
        return Fraction(raw)
    except (ValueError, ZeroDivisionError):
        return None


def numeric_reward(completion: str, answer: str | float, prompt: str = "", require_think: bool = True, rel_tol: float = 1e-6) -> float:
    """1 when the number the completion states equals ``answer`` (relative tolerance ``rel_tol``)."""
    text = answer_text(completion, prompt, require_think)
    stated = final_answer(text) if text else None
    value = parse_number(stated) if stated else None
    expected = parse_number(str(answer))
    if value is None or expected is None:
        return 0.0
    return float(math.isclose(float(value), float(expected), rel_tol=rel_tol, abs_tol=rel_tol))


def exact_reward(completion: str, answer: str, prompt: str = "", require_think: bool = True) -> float:
    """1 when the stated answer equals ``answer`` up to case and surrounding whitespace."""
    text = answer_text(completion, prompt, require_think)
    stated = final_answer(text) if text else None
    return float(stated is not None and " ".join(stated.split()).casefold() == " ".join(str(answer).split()).casefold())


_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}


def evaluate_expression(expression: str, used: list[int] | None = None) -> Fraction:
    """The exact value of an expression of integers, + - * / and parentheses (ValueError or
    SyntaxError for anything else); the integers it uses are appended to ``used``."""
    return _evaluate(ast.parse(expression, mode="eval"), [] if used is None else used)


def is_number(text: str) -> bool:
    """Whether ``text`` is one number as :func:`parse_number` reads them."""
    return _NUMBER.fullmatch(text.strip()) is not None


def _evaluate(node: ast.AST, used: list[int]) -> Fraction:
    """Exact value of an expression of integers, + - * / and parentheses; anything else raises ValueError."""
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, used)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _evaluate(node.left, used), _evaluate(node.right, used)
        if isinstance(node.op, ast.Div) and right == 0:
            raise ValueError("division by zero")
        return _BINOPS[type(node.op)](left, right)
    raise ValueError(f"{type(node).__name__} is not allowed in a countdown equation")


def countdown_reward(completion: str, numbers: list[int], target: int, prompt: str = "", require_think: bool = True) -> float:
    """1 when the stated expression uses each of ``numbers`` exactly once (with + - * / and
    parentheses only) and equals ``target``. ``= target`` after the expression is allowed."""
    text = answer_text(completion, prompt, require_think)
    stated = final_answer(text) if text else None
    if not stated:
        return 0.0
    expression = stated.split("=")[0].strip()
    if not expression or len(expression) > 200 or not re.fullmatch(r"[\d\s+\-*/()]+", expression):
        return 0.0
    used: list[int] = []
    try:
        value = evaluate_expression(expression, used)
    except (SyntaxError, ValueError, RecursionError):
        return 0.0
    return float(value == target and Counter(used) == Counter(numbers))


def extract_code(text: str) -> str | None:
    """The last fenced code block of ``text`` (```python ... ```), or None."""
    blocks = _CODE_BLOCK.findall(text)
    return blocks[-1] if blocks else None


# Runs the candidate and then the tests in one fresh namespace, and prints a secret read from stdin
# only once both are done: code that ends the process early (``sys.exit(0)``, ``os._exit(0)``) exits
# cleanly but never prints it. The secret is read before the candidate runs, so it is not on stdin.
_HARNESS = """import sys
secret = sys.stdin.readline().strip()
namespace = {"__name__": "solution"}
exec(compile(open("solution.py", encoding="utf-8").read(), "solution.py", "exec"), namespace)
exec(compile(open("tests.py", encoding="utf-8").read(), "tests.py", "exec"), namespace)
print(secret)
"""


def code_reward(completion: str, tests: str, prompt: str = "", require_think: bool = True, timeout_s: float = 5.0, memory_mb: int = 256) -> float:
    """1 when the completion's last code block, followed by ``tests`` (asserts), runs to the end in
    the sandbox within its time and memory limits; 0 otherwise (no code, a failed assert, a timeout,
    a process that exits before the tests have run)."""
    import secrets

    from r1kit.sandbox import SandboxLimits, run_python

    text = answer_text(completion, prompt, require_think)
    code = extract_code(text) if text else None
    if code is None:
        return 0.0
    secret = secrets.token_hex(16)
    result = run_python(_HARNESS, files={"solution.py": code, "tests.py": tests}, stdin=secret + "\n",
                        limits=SandboxLimits(timeout_s=timeout_s, memory_mb=memory_mb))
    lines = result.stdout.strip().splitlines()
    return float(result.ok and bool(lines) and lines[-1].strip() == secret)
