"""The reference generation loop: prefill once, then one cached decode step per token.

Slow but obviously correct (one request, a contiguous cache): the paged engine is tested against it.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from r1kit.errors import ConfigError
from r1kit.infer.sampling import SamplingParams, sample_next
from r1kit.model.cache import ContiguousKVCache


@torch.inference_mode()
def stream_tokens(model, prompt_ids: Sequence[int], params: SamplingParams, eos_ids: Sequence[int] = ()) -> Iterator[int]:
    """Yield generated token ids one at a time until EOS, a stop id or ``params.max_tokens``."""
    config = model.config
    if not prompt_ids:
        raise ConfigError("the prompt is empty: give at least one token")
    total = len(prompt_ids) + params.max_tokens
    if total > config.max_seq_len:
        raise ConfigError(
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds the model's "
            f"max_seq_len={config.max_seq_len}; shorten the prompt or lower max_tokens"
        )
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(params.seed)
    stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
    cache = ContiguousKVCache(config, window=config.window_for(len(prompt_ids)))
    seen = torch.tensor([list(prompt_ids)], device=model.device)
    logits = model(seen, cache=cache, select=[-1])[:, -1]
    for _ in range(params.max_tokens):
        token = sample_next(logits, params, seen, generator)
        yield int(token)
        if int(token) in stops:
            return
        seen = torch.cat((seen, token[:, None]), dim=1)
        logits = model(token[:, None], cache=cache)[:, -1]


def generate(model, prompt_ids: Sequence[int], params: SamplingParams, eos_ids: Sequence[int] = ()) -> list[int]:
    """All generated token ids (the stop token included when one ended the run)."""
    return list(stream_tokens(model, prompt_ids, params, eos_ids))
