"""The assistant's one way to the model: chat messages in, the model's text out, through r1kit's
engine (:class:`r1kit.serve.async_engine.AsyncEngine`), the same engine ``r1kit serve`` runs, so the
assistant's requests batch with every other request the server holds.

The engine bundle is the server's :class:`~r1kit.serve.app.ServerState` (tokenizer, chat template,
engine, the checkpoint's extra end-of-sequence ids); in ``r1kit serve --app support`` it is the
server's own, elsewhere one built by :func:`start_engine`.
"""

from __future__ import annotations

from pathlib import Path

from r1kit.infer.sampling import SamplingParams
from r1kit.serve.app import ServerState
from r1kit.serve.reasoning import split_reasoning
from r1kit.serve.workers import encode


class EngineGenerator:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def chat(self, messages: list[dict[str, str]], params: SamplingParams) -> str:
        """The answer the model writes after ``messages`` (its reasoning, if any, left out)."""
        state = self.state
        prompt = state.template.render(messages, add_generation_prompt=True)
        ids = await state.workers.run(encode, state.tokenizer, [prompt], False)
        engine = state.engine
        if engine.engine.special.think_end is None and params.thinking_budget is not None:
            # a budget asks a reasoning model to close </think>; a model without reasoning has nothing to close
            params = params.replace(thinking_budget=None)
        stream = await engine.submit({"prompt": prompt, "prompt_token_ids": ids[0]}, params.with_eos_ids(state.extra_eos), stream=False)
        final = None
        async for final in stream:
            pass
        text = final.outputs[0].text
        if state.reasoning and engine.engine.special.think_end is not None:
            # an answer that never closed its reasoning is kept whole: a reply or JSON the model wrote
            # straight away (a constrained output starts at its first token) is still the answer
            answer = split_reasoning(text, engine.engine.processor.opens_reasoning(ids[0]))[1]
            text = text if answer is None else answer
        return text.strip()


def start_engine(model: str | Path, dtype: str = "auto", max_num_seqs: int = 16, kv_cache_memory: int | None = 256 << 20) -> ServerState:
    """Load ``model`` (directory, .gguf or pulled name), build its engine and run the engine loop on a
    thread of its own; ``state.engine.stop()`` ends it."""
    from r1kit.chat_template import ChatTemplate
    from r1kit.checkpoints.load import load_model, resolve_model
    from r1kit.device import resolve_dtype
    from r1kit.generation_config import GenerationConfig
    from r1kit.infer.engine import EngineConfig, LLMEngine
    from r1kit.serve.async_engine import AsyncEngine
    from r1kit.tokenizer import load_tokenizer

    model_dir = resolve_model(model)
    tokenizer = load_tokenizer(model_dir)
    loaded = load_model(model_dir, dtype=resolve_dtype(dtype, "--dtype"))
    engine = LLMEngine(loaded, tokenizer, EngineConfig(max_num_seqs=max_num_seqs, kv_cache_memory=kv_cache_memory), take_model=True)
    state = ServerState(model_name=model_dir.name, tokenizer=tokenizer, template=ChatTemplate.from_model_dir(model_dir))
    state.extra_eos = GenerationConfig.for_model(model_dir, "auto").extra_stop_ids(engine.special.eos, loaded.config.vocab_size)
    state.engine = AsyncEngine(engine)
    state.engine.start()
    return state
