"""Cold-start chats (r1kit.reason.cold_start): every worked solution is checked here against Python's
own arithmetic (each stated step, the final value, the countdown rules), never against the module's
evaluator; the chats pose training problems only, and the CLI writes them or says why it cannot."""

import ast
import json
import re
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from r1kit.errors import ConfigError
from r1kit.reason.cold_start import cold_start_chats
from r1kit.reason.tasks import Task, TaskConfig

STEP = re.compile(r"^(-?\d+) ([-+*]) (-?\d+) = (-?\d+)$")


def python_value(expression: str) -> int:
    """The value of an expression of integers, + - * and parentheses, by Python's own evaluator."""
    tree = ast.parse(expression, mode="eval")
    assert all(isinstance(node, (ast.Expression, ast.BinOp, ast.Constant, ast.Add, ast.Sub, ast.Mult, ast.UnaryOp, ast.USub)) for node in ast.walk(tree))
    return eval(compile(tree, "<expr>", "eval"))  # only integer literals and + - * reach here


def check_chat(chat, config):
    user, assistant = chat["messages"][-2]["content"], chat["messages"][-1]["content"]
    assert chat["messages"][-1]["role"] == "assistant"
    match = re.fullmatch(r"<think>\n(.*)\n</think>\n\n\\boxed\{(.*)\}", assistant, re.DOTALL)
    assert match, assistant
    reasoning, answer = match.groups()
    for line in reasoning.splitlines():
        step = STEP.match(line)
        if step:
            a, op, b, c = step.groups()
            assert python_value(f"{a} {op} ({b})") == int(c), line
    if config.name == "arithmetic":
        expression = re.fullmatch(r"What is (.*)\?", user.splitlines()[0]).group(1)
        assert int(answer) == python_value(expression)
        last = STEP.match(reasoning.splitlines()[-1]) if config.operands > 1 else None
        assert last and int(last.group(4)) == int(answer)
    else:
        numbers = [int(n) for n in re.search(r"\[([\d, ]+)\]", user).group(1).split(", ")]
        target = int(re.search(r"equals (-?\d+)\.", user).group(1))
        assert python_value(answer) == target
        assert Counter(int(n) for n in re.findall(r"\d+", answer)) == Counter(numbers)


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(["arithmetic", "countdown"]), operands=st.integers(2, 4), low=st.integers(0, 20), span=st.integers(0, 80),
       operations=st.sets(st.sampled_from(["+", "-", "*"]), min_size=1), seed=st.integers(0, 10**6))  # fmt: skip
def test_every_worked_solution_is_right_by_python(name, operands, low, span, operations, seed):
    if name == "countdown":
        operations = operations | {"+"}  # the puzzle needs a positive target
    config = TaskConfig(name=name, operands=operands, min_value=low, max_value=low + span + 3, operations=tuple(sorted(operations)),
                        heldout=2, seed=seed)  # fmt: skip
    for chat in cold_start_chats(config, 5):
        check_chat(chat, config)


def test_chats_pose_training_problems_as_the_task_does():
    config = TaskConfig(name="arithmetic", operands=2, max_value=5, heldout=10, seed=3)
    task = Task(config)
    heldout = {p.prompt for p in task.heldout_problems()}
    chats = list(cold_start_chats(config, 20))
    for i, chat in enumerate(chats):
        assert chat["messages"][:-1] == task.messages(task.train(i))  # problem i of the training split, posed as the RL run poses it
        assert not any(prompt in chat["messages"][-2]["content"] for prompt in heldout)


def test_the_cli_writes_chats_and_refuses_tasks_without_traces(tmp_path, capsys):
    from r1kit.cli import main

    out = tmp_path / "cold.jsonl"
    assert main(["cold-start", "--task", "countdown", "--count", "7", "--out", str(out)]) == 0
    chats = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(chats) == 7 and "wrote 7 chats" in capsys.readouterr().out
    for chat in chats:
        check_chat(chat, TaskConfig(name="countdown"))
    problems = tmp_path / "mine.jsonl"
    problems.write_text(json.dumps({"prompt": "2+2?", "answer": "4"}) + "\n")
    with pytest.raises(ConfigError, match="write chats of your own"):
        list(cold_start_chats(TaskConfig(name=str(problems), heldout=1), 1))
    assert main(["cold-start", "--task", "countdown", "--count", "0", "--out", str(tmp_path / "none.jsonl")]) == 2
    assert not (tmp_path / "none.jsonl").exists()


@pytest.mark.parametrize("name,sections", [("grpo-cpu.yaml", "grpo"), ("grpo-gpu.yaml", "grpo"), ("grpo-think-cpu.yaml", "grpo"), ("cold-start-cpu.yaml", "sft")])
def test_the_recipes_configs_load(name, sections):
    from pathlib import Path

    from r1kit.reason.config import GRPO_SECTIONS, SFT_SECTIONS, load_sections

    loaded = load_sections(Path(__file__).parent.parent / "configs" / name, GRPO_SECTIONS if sections == "grpo" else SFT_SECTIONS)
    if name == "grpo-think-cpu.yaml":  # the cold start writes its problems: every one has a checkable trace
        assert loaded["task"].require_think and len(list(cold_start_chats(loaded["task"], 20))) == 20
