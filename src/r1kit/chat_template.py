"""Chat templates: the checkpoint's own Jinja template (``tokenizer_config.json``), or r1kit's default.

r1kit's default follows DeepSeek-R1: roles are marked with the tokenizer's role tokens, an
assistant turn keeps only its answer (reasoning is not fed back), and the generation prompt ends
with ``<think>\\n`` so the model starts by reasoning. Templates render in Jinja's sandbox.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment

from r1kit.config import read_json
from r1kit.errors import CheckpointError, R1kitError

DEFAULT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}<|assistant|>"
    "{{ message['content'].split('</think>')[-1].lstrip() }}{{ eos_token }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}"
)


class ChatTemplate:
    """Renders a list of ``{"role", "content"}`` messages into the prompt text."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=False, lstrip_blocks=False)
        env.globals["raise_exception"] = _raise
        self.template = env.from_string(source)
        self.source, self.bos_token, self.eos_token = source, bos_token, eos_token

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> ChatTemplate:
        """The template in ``tokenizer_config.json`` (or ``chat_template.jinja``), else r1kit's default."""
        model_dir = Path(model_dir)
        bos, eos, source = "<|bos|>", "<|eos|>", DEFAULT_TEMPLATE
        config = model_dir / "tokenizer_config.json"
        if config.is_file():
            raw = read_json(config, CheckpointError)
            bos, eos = _token_text(raw.get("bos_token"), bos), _token_text(raw.get("eos_token"), eos)
            template = raw.get("chat_template")
            if isinstance(template, list):  # named templates: take the default one
                template = next((t["template"] for t in template if t.get("name") == "default"), None)
            source = template or source
        jinja = model_dir / "chat_template.jinja"
        if jinja.is_file():
            source = jinja.read_text(encoding="utf-8")
        return cls(source, bos, eos)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        return self.template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token, eos_token=self.eos_token
        )


def _token_text(value: Any, default: str) -> str:
    if isinstance(value, dict):
        return value.get("content", default)
    return value if isinstance(value, str) else default


def _raise(message: str):
    raise R1kitError(message)
