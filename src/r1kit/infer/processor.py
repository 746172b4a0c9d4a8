"""Requests in, text out: prompts to token ids (with the checks a request must pass), and token ids
back to text, incrementally, with stop strings.

The engine calls this for everything that depends on the tokenizer or on what a request may ask
for; it never touches the cache or the model.
"""

from __future__ import annotations

from typing import Any

from r1kit.errors import ConfigError
from r1kit.infer.sampler import SpecialIds
from r1kit.infer.sampling import SamplingParams
from r1kit.infer.sequence import Sequence
from r1kit.infer.structured import GrammarState, Grammars

Prompt = str | list[int] | dict[str, Any]


class Processor:
    def __init__(self, model_config, tokenizer, max_model_len: int, capacity_tokens: int, block_size: int,
                 think_token_ids: tuple[int, int] | None = None) -> None:
        self.model_config, self.tokenizer = model_config, tokenizer
        self.max_model_len, self.capacity_tokens, self.block_size = max_model_len, capacity_tokens, block_size
        self.special = self._special_ids(think_token_ids)
        self.hidden_ids = self._hidden_ids()
        self.grammars = Grammars(tokenizer, model_config.vocab_size)

    def _special_ids(self, think_token_ids: tuple[int, int] | None) -> SpecialIds:
        from r1kit.tokenizer import END_THINK, EOS, THINK

        eos = self.model_config.eos_token_id
        eos_ids = set(eos) if isinstance(eos, tuple) else ({eos} if eos is not None else set())
        tok = self.tokenizer
        if not eos_ids and tok is not None and tok.token_to_id(EOS) is not None:
            eos_ids = {tok.token_to_id(EOS)}
        start, end = think_token_ids or (None, None)
        if think_token_ids is None and tok is not None:
            start, end = tok.token_to_id(THINK), tok.token_to_id(END_THINK)
        return SpecialIds(frozenset(eos_ids), start, end)

    def _hidden_ids(self) -> frozenset[int]:
        """Special tokens left out of the text (``<think>``/``</think>`` stay: the reasoning parser needs them)."""
        if self.tokenizer is None:
            return frozenset()
        keep = {self.special.think_start, self.special.think_end}
        added = self.tokenizer.get_added_tokens_decoder()
        return frozenset(i for i, t in added.items() if t.special and i not in keep)

    def detokenize(self, seq: Sequence) -> str:
        """New text from the newest visible id; waits while the bytes end mid-character."""
        ids, decode = seq.visible_ids, self.tokenizer.decode
        prefix = decode(ids[seq.prefix_offset : seq.read_offset], skip_special_tokens=False)
        new = decode(ids[seq.prefix_offset :], skip_special_tokens=False)
        if len(new) > len(prefix) and not new.endswith("\ufffd"):
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
            return new[len(prefix) :]
        return ""

    def decode_one(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    @staticmethod
    def find_stop(seq: Sequence, checked: int) -> tuple[str, str] | None:
        """(the stop string, the text cut at it) when one ends in the text after ``checked``."""
        start = max(0, checked - max(len(s) for s in seq.params.stop) + 1)
        found = [(i, s) for s in seq.params.stop if (i := seq.text.find(s, start)) >= 0]
        if not found:
            return None
        i, s = min(found)
        return s, seq.text[: i + (len(s) if seq.params.include_stop_str_in_output else 0)]

    def tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        """(text, ids) of a prompt. Text is encoded with the tokenizer's special tokens, as vLLM encodes a
        completion prompt: a Llama tokenizer's post-processor adds BOS, the model's training saw it. A
        chat prompt already holds the template's BOS: render it, encode it without them and pass
        ``{"prompt": text, "prompt_token_ids": ids}``."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ConfigError("a dict prompt needs 'prompt_token_ids' or 'prompt'", param="prompt")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ConfigError("a text prompt needs a tokenizer: load the LLM from a model directory with tokenizer.json, or pass token ids", param="prompt")
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=True).ids
        return None, [int(t) for t in prompt]

    def validate(self, ids: list[int], params: SamplingParams) -> None:
        """The checks of a request that depend on this model and tokenizer (``SamplingParams`` checked
        the rest); errors name the request field at fault as ``param``."""
        vocab = self.model_config.vocab_size
        if not ids:
            raise ConfigError("the prompt is empty: give at least one token", param="prompt")
        if min(ids) < 0 or max(ids) >= vocab:
            raise ConfigError(f"prompt token ids must be in [0, {vocab}); got {min(ids)}..{max(ids)}", param="prompt")
        total = len(ids) + params.max_tokens
        if total > self.max_model_len:
            raise ConfigError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds the model's "
                f"max_seq_len={self.max_model_len}; shorten the prompt or lower max_tokens",
                param="prompt" if len(ids) >= self.max_model_len else "max_tokens",  # the one to change
            )
        if -(-total // self.block_size) * self.block_size > self.capacity_tokens:
            raise ConfigError(
                f"the KV cache holds {self.capacity_tokens} tokens, this request may need {total}; raise kv_cache_memory or lower max_tokens",
                param="max_tokens",
            )
        if params.stop and self.tokenizer is None:
            raise ConfigError("stop strings need a tokenizer; use stop_token_ids with token-id prompts", param="stop")
        if params.thinking_budget is not None and self.special.think_end is None:
            raise ConfigError("thinking_budget needs the </think> token: load a tokenizer that has it or pass think_token_ids", param="thinking_budget")
        if params.stop_token_ids and (min(params.stop_token_ids) < 0 or max(params.stop_token_ids) >= vocab):
            raise ConfigError(f"stop_token_ids must be in [0, {vocab})", param="stop_token_ids")
        if params.logit_bias and (min(params.logit_bias) < 0 or max(params.logit_bias) >= vocab):
            raise ConfigError(f"logit_bias token ids must be in [0, {vocab})", param="logit_bias")
        if params.structured is not None and self.tokenizer is None:
            raise ConfigError("structured output needs a tokenizer (grammars are over text): load the LLM from a model directory with tokenizer.json", param="structured")

    def prepare(self, params: SamplingParams) -> None:
        """Compile the request's grammar now, if it has one (thread-safe): the server calls this on a
        worker thread, so that ``add_request`` on the engine's thread finds it compiled."""
        if params.structured is not None and self.tokenizer is not None:
            self.grammars.compile(params.structured)

    def grammar_states(self, params: SamplingParams) -> list[GrammarState] | list[None]:
        """One grammar state per completion of a constrained request (None each for a free one). The
        output may end, where the grammar is complete, on the tokens that end it anyway: EOS (unless
        ``ignore_eos``) and the request's stop ids."""
        if params.structured is None:
            return [None] * params.n
        stop = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.special.eos))
        return self.grammars.states(params.structured, sorted(stop), params.n)

    def opens_reasoning(self, ids: list[int]) -> bool:
        """Whether ``ids`` end inside an open ``<think>`` (an R1 chat prompt ends with ``<think>\\n``), so
        the output starts as reasoning; always False for a tokenizer without a ``<think>`` token."""
        start, end = self.special.think_start, self.special.think_end
        if start is None:
            return False
        last_start = max((i for i, t in enumerate(ids) if t == start), default=-1)
        last_end = max((i for i, t in enumerate(ids) if t == end), default=-1)
        return last_start > last_end
