"""Putting the assistant together for a model: the recogniser (its own bfloat16 copy of the model: the
engine's copy is packed for generation), the demo shop, the session store and the engine bundle."""

from __future__ import annotations

from pathlib import Path

from r1kit.apps.support.actions import DemoShop
from r1kit.apps.support.assistant import Assistant
from r1kit.apps.support.config import SupportConfig
from r1kit.apps.support.generation import EngineGenerator
from r1kit.apps.support.intent import build_recognizer, default_head_dir
from r1kit.apps.support.store import SessionStore
from r1kit.serve.app import ServerState


def default_data_dir() -> Path:
    from r1kit.checkpoints.cache import r1kit_home

    return r1kit_home() / "support"


def method_for(config: SupportConfig, model_dir: Path) -> tuple[str, Path | None]:
    """(method, head directory): a head if one was asked for or is found beside the model, else zero-shot."""
    head_dir = config.head_dir or default_head_dir(model_dir)
    if config.intent_method == "head" and (config.head_dir is not None or head_dir.is_dir()):
        return "head", head_dir
    return "zero_shot", None


def build_assistant(config: SupportConfig, state: ServerState, model: str | Path, data_dir: str | Path | None = None) -> Assistant:
    """The assistant for ``model`` over the engine bundle ``state``; sessions and the shop live in ``data_dir``."""
    from r1kit.checkpoints.load import load_model, resolve_model
    from r1kit.device import resolve_dtype

    model_dir = resolve_model(model)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    data_dir.mkdir(parents=True, exist_ok=True)  # a --data-dir that does not exist yet is where to start
    method, head_dir = method_for(config, model_dir)
    recognizer_model = load_model(model_dir, dtype=resolve_dtype(config.intent_dtype, "intent_dtype")).eval()
    recognizer = build_recognizer(method, recognizer_model, state.tokenizer, state.template, config.threshold, head_dir)
    shop = DemoShop(data_dir / "shop.sqlite")
    return Assistant(config, recognizer, EngineGenerator(state), shop.actions(), SessionStore(data_dir / "sessions.sqlite"), shop.catalogue())
