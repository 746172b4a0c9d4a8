"""Cold-start chats: worked solutions of a task's training problems in R1's format, for ``r1kit sft``.

DeepSeek-R1 did not start reinforcement learning from the bare base model: a few thousand long
chains of thought in a readable format ("cold start" data) were fine-tuned in first, so that RL
began from a policy that already wrote ``<think> reasoning </think> answer``. A small model that
never writes ``</think>`` earns no reward under ``require_think`` and GRPO has nothing to push on.

Here the traces are written by a program: for ``arithmetic`` the expression evaluated one operation
at a time (products first, then left to right), for ``countdown`` a search over orders and
operations that states each partial result and checks the target. Each chat is the task's own prompt
(:meth:`~r1kit.reason.tasks.Task.messages`) and an assistant turn
``<think>\\n…\\n</think>\\n\\n\\boxed{answer}``, kept only when the task's verifier scores it correct
and well formatted (R1 kept its cold-start samples by the same kind of check). Problems come from the
training split, never the held-out one. Other tasks have no trace writer: bring chats of your own.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Callable, Iterator
from pathlib import Path

from r1kit.config import write_text_atomic
from r1kit.errors import ConfigError
from r1kit.reason.tasks import Problem, Task, TaskConfig

_PRECEDENCE = {"+": 1, "-": 1, "*": 2}


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def arithmetic_steps(expression: str) -> list[str]:
    """The lines ``a op b = c`` that evaluate a generated expression (integers and + - * separated by
    spaces): every product first, left to right, then the sums and differences, left to right."""
    tokens = expression.split()
    values, ops = [int(t) for t in tokens[::2]], tokens[1::2]
    if len(values) != len(ops) + 1 or any(op not in _PRECEDENCE for op in ops):
        raise ValueError(f"not a generated arithmetic expression: {expression!r}")
    steps = []
    for level in (2, 1):
        i = 0
        while i < len(ops):
            if _PRECEDENCE[ops[i]] == level:
                result = _apply(values[i], ops[i], values[i + 1])
                steps.append(f"{values[i]} {ops[i]} {values[i + 1]} = {result}")
                values[i : i + 2], ops[i : i + 1] = [result], []
            else:
                i += 1
    return steps


def countdown_steps(numbers: tuple[int, ...], target: int, operations: tuple[str, ...]) -> tuple[list[str], str] | None:
    """(trace lines, expression) of the first chain ``((a op b) op c) …`` over an order of ``numbers``
    that reaches ``target`` (the generator builds its puzzles as such chains), or None. The trace
    states the attempts that missed (up to three) and then the steps of the one that hits."""
    missed: list[str] = []
    for order in itertools.permutations(numbers):
        for ops in itertools.product(operations, repeat=len(numbers) - 1):
            value, expression, steps = order[0], str(order[0]), []
            for op, n in zip(ops, order[1:]):
                result = _apply(value, op, n)
                steps.append(f"{value} {op} {n} = {result}")
                value, expression = result, f"({expression} {op} {n})"
            if value == target:
                tried = [f"Try {m}: not {target}." for m in missed]
                return [*tried, *steps, f"{value} = {target}, and each number is used once."], expression.removeprefix("(").removesuffix(")")
            if len(missed) < 3:
                missed.append(f"{expression.removeprefix('(').removesuffix(')')} = {value}")
    return None


def worked_solution(problem: Problem) -> str | None:
    """The assistant turn solving ``problem`` (reasoning in ``<think>``, answer in ``\\boxed{}``), or
    None where no trace can be written for it (not a generated arithmetic or countdown problem)."""
    if problem.kind == "countdown":
        found = countdown_steps(problem.numbers, int(problem.answer), ("+", "-", "*"))
        if found is None:
            return None
        lines, answer = found
    elif problem.kind == "numeric" and problem.prompt.startswith("What is ") and problem.prompt.endswith("?"):
        try:
            lines = arithmetic_steps(problem.prompt[len("What is ") : -1])
        except ValueError:
            return None
        answer = problem.answer
    else:
        return None
    return "<think>\n" + "\n".join(lines) + "\n</think>\n\n\\boxed{" + answer + "}"


def cold_start_chats(config: TaskConfig, count: int) -> Iterator[dict]:
    """``count`` chats (``{"messages": [...]}``) on training problems 0, 1, … of ``config``'s task,
    each with a worked solution the task's verifier scores correct and well formatted."""
    if config.name not in ("arithmetic", "countdown"):
        raise ConfigError(f"cold-start traces are written for the arithmetic and countdown tasks, not {config.name!r}: "
                          "write chats of your own ({\"messages\": [...]} per line) for r1kit sft", param="task")  # fmt: skip
    task = Task(dataclasses.replace(config, require_think=True))  # cold-start data teaches the format, whatever the task requires
    made, index = 0, 0
    while made < count:
        if index >= 100 * count + 1000:
            raise ConfigError(f"task {config.name!r}: found only {made} of {count} problems with a checkable trace", param="task")
        problem = task.train(index)
        index += 1
        solution = worked_solution(problem)
        if solution is None:
            continue
        messages = task.messages(problem)
        _, correct, formatted = task.score(problem, solution, "\n".join(m["content"] for m in messages))
        if correct == 1.0 and formatted == 1.0:
            made += 1
            yield {"messages": [*messages, {"role": "assistant", "content": solution}]}


def write_chats(config: TaskConfig, count: int, out: str | Path, progress: Callable[[Iterator], Iterator] = lambda it: it) -> Path:
    """:func:`cold_start_chats` written to ``out`` as JSONL (atomically: the file appears whole or not at all)."""
    if count < 1:
        raise ConfigError(f"--count={count} must be at least 1", param="count")
    lines = [json.dumps(chat, ensure_ascii=False) for chat in progress(cold_start_chats(config, count))]
    return write_text_atomic(out, "\n".join(lines) + "\n")

