"""`r1kit apps support chat`: the customer-service assistant in the terminal, the same loop as
``r1kit serve --app support`` (intent, slots, policy, demo shop, the model's reply), one line per turn."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="support_verb", metavar="ACTION", title="actions")
    chat = sub.add_parser("chat", help="chat with the assistant in the terminal", description="chat with the assistant in the terminal")
    chat.add_argument("--model", default="smollm2-135m-instruct", help="model directory, .gguf file or pulled model name (default smollm2-135m-instruct)")
    chat.add_argument("--intent", choices=["head", "zero_shot"], default="head", help="intent method (default head, if one was trained beside the model; else zero_shot)")
    chat.add_argument("--head", type=Path, help="the trained head's directory (default <model dir>/intent-head)")
    chat.add_argument("--data-dir", type=Path, help="where sessions and the demo shop live (default $R1KIT_HOME/support)")
    chat.add_argument("--session", help="continue this session id (it survives restarts)")
    chat.add_argument("--max-new-tokens", type=int, default=64, help="longest reply in tokens (default 64)")


def run(args: argparse.Namespace) -> int:
    import asyncio

    from r1kit.apps.support.config import SupportConfig
    from r1kit.apps.support.generation import start_engine
    from r1kit.apps.support.loader import build_assistant
    from r1kit.errors import ConfigError, R1kitError

    if args.support_verb != "chat":
        raise ConfigError("name an action: r1kit apps support chat --model M")
    config = SupportConfig(intent_method=args.intent, head_dir=args.head, max_new_tokens=args.max_new_tokens)
    state = start_engine(args.model)
    try:
        assistant = build_assistant(config, state, args.model, args.data_dir)

        async def loop() -> None:
            session_id = args.session or (await assistant.create()).id
            await assistant.load(session_id)
            print(f"session {session_id} (Ctrl-D to leave)")
            while True:
                try:
                    text = await asyncio.to_thread(input, "you> ")
                except EOFError:
                    return
                try:
                    r = await assistant.respond(session_id, text)
                except R1kitError as exc:
                    print(f"  ({exc})")
                    continue
                slots = ", ".join(f"{k}={v}" for k, v in r["slots"].items())
                print(f"bot> {r['reply']}\n     [{r['intent']} {r['confidence']:.0%} · {r['decision']['kind']}"
                      f"{' · ' + r['action']['message'] if r['action'] else ''}{' · ' + slots if slots else ''}]")  # fmt: skip

        asyncio.run(loop())
    finally:
        state.engine.stop()
    return 0
