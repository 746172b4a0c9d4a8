"""Problems with checkable answers: arithmetic and countdown puzzles generated from a seed, or the
user's own (a Python function ``module:function`` or a JSONL file), each with a held-out split.

Problem ``i`` of a split is a pure function of (seed, split, i), so a resumed run draws the same
problems again and never needs to store a data position. Generated training problems skip every
prompt of the held-out set, which therefore measures problems the policy has not trained on.
:meth:`Task.score` turns a completion into (reward, correct, well-formatted) with
:mod:`r1kit.reason.verifiers`; this module never samples or trains.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from r1kit.errors import ConfigError
from r1kit.reason import verifiers

KINDS = ("numeric", "exact", "countdown", "code")
BUILTIN = ("arithmetic", "countdown")
OPERATIONS = ("+", "-", "*")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem: the user's message, the expected answer and how it is checked (``kind``);
    ``numbers`` for a countdown puzzle (``answer`` is then its target), ``tests`` for code."""

    prompt: str
    answer: str
    kind: str = "numeric"
    numbers: tuple[int, ...] = ()
    tests: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"problem kind {self.kind!r} is not one of {KINDS}")
        if self.kind == "code" and not self.tests.strip():
            raise ConfigError(f"a code problem needs `tests` (asserts run after the answer's code): {self.prompt[:60]!r}")
        if self.kind == "countdown" and not self.numbers:
            raise ConfigError(f"a countdown problem needs `numbers`: {self.prompt[:60]!r}")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """Which problems, how hard, and how completions are rewarded.

    ``name``: ``arithmetic``, ``countdown``, ``package.module:function`` (called with a
    ``random.Random``, returns a problem as a dict of :class:`Problem` fields) or a ``.jsonl`` file of
    such dicts. ``operands``/``max_value``/``operations``: the arithmetic problems' size (countdown
    uses ``operands`` numbers up to ``max_value``); ``heldout``: how many problems are held out
    (a JSONL file's last ones). Reward = ``accuracy_weight``·correct + ``format_weight``·well-formatted;
    with ``require_think`` the answer counts only after ``</think>``."""

    name: str = "arithmetic"
    operands: int = 2
    min_value: int = 0
    max_value: int = 9
    operations: tuple[str, ...] = ("+",)
    heldout: int = 64
    instruction: str = "Think step by step inside <think> </think>, then give only the final answer."
    require_think: bool = True
    accuracy_weight: float = 1.0
    format_weight: float = 0.2
    system: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "operations", tuple(self.operations))
        if self.name in BUILTIN and self.operands < 2:
            raise ConfigError(f"task.operands={self.operands} must be at least 2", param="task.operands")
        if not 0 <= self.min_value <= self.max_value:
            raise ConfigError(f"task.min_value={self.min_value} and max_value={self.max_value} must satisfy 0 <= min <= max", param="task.max_value")
        bad = [op for op in self.operations if op not in OPERATIONS]
        if bad or not self.operations:
            raise ConfigError(f"task.operations={list(self.operations)} must be a non-empty list of {OPERATIONS}", param="task.operations")
        if self.heldout < 1:
            raise ConfigError(f"task.heldout={self.heldout} must be at least 1 (the held-out set measures the run)", param="task.heldout")
        if self.accuracy_weight < 0 or self.format_weight < 0:
            raise ConfigError("task.accuracy_weight and task.format_weight must be >= 0", param="task.format_weight")


class Task:
    """The problems of a :class:`TaskConfig`: ``train(i)``, ``heldout_problems()`` and ``score``."""

    def __init__(self, config: TaskConfig) -> None:
        self.config = config
        self._records: list[Problem] | None = None
        self._generate: Callable[[random.Random], Problem]
        if config.name == "arithmetic":
            self._generate = self._arithmetic
        elif config.name == "countdown":
            self._generate = self._countdown
        elif config.name.endswith(".jsonl"):
            self._records = load_problems(config.name)
            if len(self._records) <= config.heldout:
                raise ConfigError(f"{config.name} has {len(self._records)} problems; task.heldout={config.heldout} leaves none to train on", param="task.heldout")
        elif ":" in config.name:
            self._generate = _user_function(config.name)
        else:
            raise ConfigError(f"task {config.name!r}: give arithmetic, countdown, a module:function or a .jsonl file of problems", param="task")
        self._heldout = self._make_heldout()
        self._heldout_prompts = {p.prompt for p in self._heldout}

    # -- problems ---------------------------------------------------------------------------------
    def heldout_problems(self) -> list[Problem]:
        return list(self._heldout)

    def train(self, index: int) -> Problem:
        """Training problem ``index`` (a pure function of the seed and the index)."""
        if self._records is not None:
            pool = self._records[: len(self._records) - self.config.heldout]
            epoch, i = divmod(index, len(pool))
            order = list(range(len(pool)))
            random.Random(f"{self.config.seed}:epoch:{epoch}").shuffle(order)
            return pool[order[i]]
        rng = random.Random(f"{self.config.seed}:train:{index}")
        for _ in range(1000):
            problem = self._generate(rng)
            if problem.prompt not in self._heldout_prompts:
                return problem
        raise ConfigError(f"task {self.config.name!r} keeps generating held-out problems: widen its range (task.max_value) or lower task.heldout")

    def _make_heldout(self) -> list[Problem]:
        if self._records is not None:
            return self._records[len(self._records) - self.config.heldout :]
        found: dict[str, Problem] = {}
        rng = random.Random(f"{self.config.seed}:heldout")
        for _ in range(self.config.heldout * 20):
            problem = self._generate(rng)
            found.setdefault(problem.prompt, problem)
            if len(found) == self.config.heldout:
                return list(found.values())
        raise ConfigError(f"task {self.config.name!r} has fewer than task.heldout={self.config.heldout} distinct problems: widen task.max_value or lower task.heldout")

    def messages(self, problem: Problem) -> list[dict[str, str]]:
        """The chat a problem is posed as: an optional system message, then the user's."""
        text = f"{problem.prompt}\n{self.config.instruction}".strip() if self.config.instruction else problem.prompt
        system = [{"role": "system", "content": self.config.system}] if self.config.system else []
        return system + [{"role": "user", "content": text}]

    def _arithmetic(self, rng: random.Random) -> Problem:
        c = self.config
        numbers = [rng.randint(c.min_value, c.max_value) for _ in range(c.operands)]
        ops = [rng.choice(c.operations) for _ in range(c.operands - 1)]
        expression = " ".join(str(n) + (f" {op}" if i < len(ops) else "") for i, (n, op) in enumerate(zip(numbers, ops + [""])))
        return Problem(prompt=f"What is {expression}?", answer=str(eval_expression(expression)), kind="numeric")

    def _countdown(self, rng: random.Random) -> Problem:
        c = self.config
        for _ in range(100):
            numbers = [rng.randint(max(1, c.min_value), max(1, c.max_value)) for _ in range(c.operands)]
            order = rng.sample(numbers, len(numbers))
            expression = str(order[0])
            for n in order[1:]:
                expression = f"({expression} {rng.choice(c.operations)} {n})"
            target = eval_expression(expression)
            if target > 0:
                listed = ", ".join(map(str, numbers))
                prompt = (f"Using the numbers [{listed}], each exactly once, and only + - * / and parentheses, "
                          f"write an expression that equals {target}.")  # fmt: skip
                return Problem(prompt=prompt, answer=str(target), kind="countdown", numbers=tuple(numbers))
        raise ConfigError("countdown: no positive target found; allow + among task.operations")

    # -- rewards ----------------------------------------------------------------------------------
    def score(self, problem: Problem, completion: str, prompt_text: str = "") -> tuple[float, float, float]:
        """(reward, correct, well-formatted) of ``completion`` for ``problem``; ``prompt_text``: the
        rendered prompt, whose ``\\boxed{}`` lines an echo cannot use."""
        c = self.config
        think = c.require_think
        if problem.kind == "numeric":
            correct = verifiers.numeric_reward(completion, problem.answer, prompt_text, think)
        elif problem.kind == "exact":
            correct = verifiers.exact_reward(completion, problem.answer, prompt_text, think)
        elif problem.kind == "countdown":
            correct = verifiers.countdown_reward(completion, list(problem.numbers), int(problem.answer), prompt_text, think)
        else:
            correct = verifiers.code_reward(completion, problem.tests, prompt_text, think)
        formatted = verifiers.format_reward(completion)
        return c.accuracy_weight * correct + c.format_weight * formatted, correct, formatted


def eval_expression(expression: str) -> int:
    """The integer value of a generated expression (integers, + - *, parentheses), exactly."""
    return int(verifiers.evaluate_expression(expression))


def problem_from_dict(raw: dict[str, Any], where: str) -> Problem:
    """A :class:`Problem` from a JSON-like dict (``prompt``, ``answer``, optional ``kind``,
    ``numbers``, ``tests``); ``kind`` defaults to numeric when the answer is a number, else exact."""
    if not isinstance(raw, dict) or "prompt" not in raw or ("answer" not in raw and raw.get("kind") != "code"):
        raise ConfigError(f"{where}: a problem is an object with `prompt` and `answer` (code problems: `prompt` and `tests`)")
    answer = str(raw.get("answer", ""))
    kind = raw.get("kind") or ("numeric" if verifiers.is_number(answer) else "exact")
    unknown = set(raw) - {f.name for f in dataclasses.fields(Problem)}
    if unknown:
        raise ConfigError(f"{where}: unknown problem field(s) {sorted(unknown)}; known: {[f.name for f in dataclasses.fields(Problem)]}")
    return Problem(prompt=str(raw["prompt"]), answer=answer, kind=kind, numbers=tuple(int(n) for n in raw.get("numbers", ())), tests=str(raw.get("tests", "")))


def load_problems(path: str | Path) -> list[Problem]:
    """The problems of a JSONL file, one object per line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"task file {path} does not exist", param="task")
    problems = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{n} is not valid JSON ({exc})") from None
            problems.append(problem_from_dict(raw, f"{path}:{n}"))
    return problems


def _user_function(spec: str) -> Callable[[random.Random], Problem]:
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"task {spec!r}: cannot import {attr} from {module_name} ({exc})", param="task") from None
    if not callable(fn):
        raise ConfigError(f"task {spec!r} is not a function", param="task")
    return lambda rng: problem_from_dict(fn(rng), spec)
