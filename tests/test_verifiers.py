"""Each verifier on right, wrong, malformed and adversarial answers; the tasks' problems and scores."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from r1kit.errors import ConfigError
from r1kit.reason import verifiers as v
from r1kit.reason.tasks import Task, TaskConfig, load_problems


def test_format_reward():
    assert v.format_reward("<think>add them</think>\n12") == 1.0
    assert v.format_reward("add them</think> 12") == 1.0  # the template opened <think>
    assert v.format_reward("12") == 0.0  # no reasoning block
    assert v.format_reward("<think>a</think> 1 </think> 2") == 0.0  # two closings
    assert v.format_reward("<think>a</think> <think>b") == 0.0  # reopened after the answer
    assert v.format_reward("<think></think> 12") == 0.0  # empty reasoning
    assert v.format_reward("<think>done</think>   ") == 0.0  # empty answer


def test_numeric_right_wrong_malformed():
    assert v.numeric_reward("<think>7+5</think>\n\\boxed{12}", "12") == 1.0
    assert v.numeric_reward("<think>7+5</think>\nThe answer is 12.", "12") == 1.0  # the final line
    assert v.numeric_reward("<think>x</think> 1,024", "1024") == 1.0
    assert v.numeric_reward("<think>x</think> so \\boxed{\\frac{1}{2}}", "0.5") == 1.0
    assert v.numeric_reward("<think>x</think> \\boxed{7/4}", "1.75") == 1.0
    assert v.numeric_reward("<think>7+5</think>\n13", "12") == 0.0
    assert v.numeric_reward("<think>7+5</think>\nno idea", "12") == 0.0
    assert v.numeric_reward("<think>7+5 is 12", "12") == 0.0  # never closed: no answer part
    assert v.numeric_reward("", "12") == 0.0


def test_an_answer_hidden_in_the_reasoning_earns_nothing():
    assert v.numeric_reward("<think>it is 12</think>\nI cannot say", "12") == 0.0
    assert v.numeric_reward("<think>\\boxed{12}</think> 11", "12") == 0.0
    assert v.exact_reward("<think>Paris</think> London", "Paris") == 0.0


def test_a_boxed_answer_echoed_from_the_prompt_earns_nothing():
    prompt = "What is 7 + 5? Write the result like this: \\boxed{12}\nShow your work."
    echoed = "<think>hm</think>\nWhat is 7 + 5? Write the result like this: \\boxed{12}"
    assert v.numeric_reward(echoed, "12", prompt=prompt) == 0.0
    assert v.numeric_reward(echoed + "\n\\boxed{12}", "12", prompt=prompt) == 1.0  # its own answer still counts
    assert v.numeric_reward(echoed, "12") == 1.0  # (without the prompt the echo would have passed)


def test_without_require_think_the_whole_completion_answers():
    assert v.numeric_reward("7 + 5 = 12", "12", require_think=False) == 1.0
    assert v.numeric_reward("<think>12</think> 13", "12", require_think=False) == 0.0


def test_exact_reward():
    assert v.exact_reward("<think>capital</think>\n  paris ", "Paris") == 1.0
    assert v.exact_reward("<think>capital</think> \\boxed{Paris}", "Paris") == 1.0
    assert v.exact_reward("<think>capital</think> Lyon", "Paris") == 0.0


def test_countdown_reward():
    numbers, target = [3, 9, 12], 45
    assert v.countdown_reward("<think>try</think>\n(12 - 9) * 3 * ... ", numbers, target) == 0.0  # malformed
    assert v.countdown_reward("<think>try</think>\n3 * 12 + 9", numbers, target) == 1.0
    assert v.countdown_reward("<think>try</think>\n\\boxed{(9 + 12 - 6) * 3}", numbers, target) == 0.0  # 6 is not given
    assert v.countdown_reward("<think>try</think>\n3 * 12 + 9 = 45", numbers, target) == 1.0
    assert v.countdown_reward("<think>try</think>\n12 * 3 + 9 + 0", numbers, target) == 0.0  # an extra number
    assert v.countdown_reward("<think>try</think>\n12 * 3 + 8", numbers, target) == 0.0  # wrong value and numbers
    assert v.countdown_reward("<think>try</think>\n45", numbers, target) == 0.0  # the target alone uses no number
    assert v.countdown_reward("<think>x</think>\n__import__('os').system('true')", numbers, target) == 0.0
    assert v.countdown_reward("<think>x</think>\n9 / (3 - 3) + 12", numbers, target) == 0.0  # no crash on x/0


@given(st.text(max_size=60))
@settings(max_examples=150, deadline=None)
def test_verifiers_never_raise_on_any_text(text):
    assert v.numeric_reward(text, "3") in (0.0, 1.0)
    assert v.exact_reward(text, "x") in (0.0, 1.0)
    assert v.countdown_reward(text, [1, 2], 3, require_think=False) in (0.0, 1.0)
    assert v.format_reward(text) in (0.0, 1.0)


@given(st.lists(st.integers(0, 99), min_size=2, max_size=5), st.lists(st.sampled_from("+-*"), min_size=4, max_size=4))
@settings(max_examples=60, deadline=None)
def test_countdown_accepts_every_correct_expression(numbers, ops):
    expression = str(numbers[0])
    for n, op in zip(numbers[1:], ops):
        expression = f"({expression} {op} {n})"
    target = int(v.evaluate_expression(expression))
    assert v.countdown_reward(f"<think>x</think>\n{expression}", numbers, target) == 1.0


CODE_TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"


@pytest.mark.parametrize(
    "answer, reward",
    [
        ("```python\ndef add(a, b):\n    return a + b\n```", 1.0),
        ("```python\ndef add(a, b):\n    return a - b\n```", 0.0),  # wrong
        ("def add(a, b): return a + b", 0.0),  # malformed: no code block
        ("```python\nimport sys\nsys.exit(0)\ndef add(a, b):\n    return 0\n```", 0.0),  # leaves before the tests run
        ("```python\nimport os\nos._exit(0)\n```", 0.0),
        ("```python\nwhile True:\n    pass\n```", 0.0),  # loops forever: killed at the time limit
        ("```python\nimport subprocess\nsubprocess.run(['true'])\ndef add(a, b):\n    return a + b\n```", 0.0),  # escapes the sandbox
    ],
)
def test_code_reward(answer, reward):
    assert v.code_reward(f"<think>write it</think>\n{answer}", CODE_TESTS, timeout_s=2.0) == reward


def test_code_in_the_reasoning_is_not_run():
    assert v.code_reward("<think>```python\ndef add(a, b):\n    return a + b\n```</think>\nsee above", CODE_TESTS) == 0.0


def test_generated_tasks_are_seeded_and_hold_out_their_test_problems():
    config = TaskConfig(name="arithmetic", operands=3, max_value=30, operations=("+", "-", "*"), heldout=20, seed=5)
    a, b = Task(config), Task(config)
    assert [a.train(i) for i in range(30)] == [b.train(i) for i in range(30)]
    held = {p.prompt for p in a.heldout_problems()}
    assert len(held) == 20 and not held & {a.train(i).prompt for i in range(300)}
    p = a.train(7)
    assert a.score(p, f"<think>x</think>\n{p.answer}") == (1.2, 1.0, 1.0)
    assert a.score(p, f"{p.answer}") == (0.0, 0.0, 0.0)
    countdown = Task(TaskConfig(name="countdown", operands=4, max_value=20, heldout=5))
    puzzle = countdown.train(0)
    assert len(puzzle.numbers) == 4 and int(puzzle.answer) > 0


def test_user_tasks_from_jsonl_and_from_a_function(tmp_path):
    file = tmp_path / "p.jsonl"
    file.write_text('{"prompt": "2+2?", "answer": "4"}\n{"prompt": "Capital of France?", "answer": "Paris"}\n'
                    '{"prompt": "Write add", "kind": "code", "tests": "assert add(1, 1) == 2"}\n{"prompt": "3+3?", "answer": 6}\n')
    problems = load_problems(file)
    assert [p.kind for p in problems] == ["numeric", "exact", "code", "numeric"]
    task = Task(TaskConfig(name=str(file), heldout=1))
    assert task.heldout_problems() == problems[-1:]
    assert {task.train(i).prompt for i in range(6)} == {p.prompt for p in problems[:3]}
    module = tmp_path / "my_tasks.py"
    module.write_text("def make(rng):\n    a = rng.randint(1, 5)\n    return {'prompt': f'double {a}', 'answer': str(2 * a)}\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        task = Task(TaskConfig(name="my_tasks:make", heldout=3))
        assert task.train(0).prompt.startswith("double ")
    finally:
        sys.path.remove(str(tmp_path))
    with pytest.raises(ConfigError, match="cannot import"):
        Task(TaskConfig(name="no_such_module_xyz:make"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"}\n')
    with pytest.raises(ConfigError, match="bad.jsonl:1"):
        load_problems(bad)
    random.seed(0)
