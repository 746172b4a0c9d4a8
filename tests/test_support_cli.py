"""`r1kit apps intent train|eval` end to end through the command line, on a tiny model built here: the
head is written beside the model, the evaluation prints its figures and writes the same ones to
eval.json beside a confusion-matrix PNG."""

import json
import re

from reason_models import tiny_reasoning_dir

from r1kit.cli import main


def test_intent_train_then_eval_through_the_cli(tmp_path, capsys):
    model = tiny_reasoning_dir(tmp_path / "model")
    rows = [{"text": f"{lead}{n}{n + 1}", "intent": intent, "lang": "en", "split": "test" if n % 4 == 3 else "train"}
            for lead, intent in (("p", "ask_p"), ("q", "ask_q"), ("+", "ask_plus")) for n in range(12)]  # fmt: skip
    data = tmp_path / "intents.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    assert main(["apps", "intent", "train", "--model", str(model), "--data", str(data), "--layer", "1", "--dtype", "float32"]) == 0
    assert "trained a head for 3 intents on 27 messages" in capsys.readouterr().out
    assert (model / "intent-head").is_dir()

    out = tmp_path / "eval"
    assert main(["apps", "intent", "eval", "--model", str(model), "--data", str(data), "--dtype", "float32", "--threshold", "0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "eval.json").read_text())
    assert report["messages"] == 9 and set(report["labels"]) == {"ask_p", "ask_q", "ask_plus"}
    accuracy = float(re.search(r"accuracy (\S+) \(top-1", printed).group(1))
    assert abs(accuracy - report["accuracy"]) < 1e-4 and report["accuracy"] == report["top1_accuracy"]  # threshold 0: no out_of_scope
    assert all(f"  {label}" in printed for label in report["labels"])  # recall per intent
    assert (out / "confusion.png").stat().st_size > 1000


def test_intent_eval_without_a_head_is_a_clear_error(tmp_path, capsys):
    model = tiny_reasoning_dir(tmp_path / "model")
    assert main(["apps", "intent", "eval", "--model", str(model), "--method", "head"]) == 2
    err = capsys.readouterr().err
    assert "intent-head holds no intent head" in err and "r1kit apps intent train" in err  # what is wrong, and the fix


def test_support_chat_in_the_terminal_keeps_its_session_across_runs(tmp_path, capsys, monkeypatch):
    import io

    from test_support_dialogue import tiny_support_dir

    model = tiny_support_dir(tmp_path / "model")
    chat = ["apps", "support", "chat", "--model", str(model), "--intent", "zero_shot", "--data-dir", str(tmp_path / "data"), "--max-new-tokens", "4"]
    monkeypatch.setattr("sys.stdin", io.StringIO("I want a refund for order A10023\nthanks\n"))
    assert main(chat) == 0
    first = capsys.readouterr().out
    session = re.search(r"session (\S+) \(Ctrl-D", first).group(1)
    assert first.count("bot> ") == 2 and first.count("     [") == 2  # a reply and its intent/decision line per turn
    assert "order_id=A10023" in first  # the order id the rules read from the first message, tracked

    monkeypatch.setattr("sys.stdin", io.StringIO("hello again\n"))
    assert main([*chat, "--session", session]) == 0
    again = capsys.readouterr().out
    assert f"session {session} (Ctrl-D" in again and "order_id=A10023" in again  # the slot survived the restart
