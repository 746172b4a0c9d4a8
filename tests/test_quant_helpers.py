"""Shared by the quantization tests: a tiny model trained in seconds on structured synthetic tokens.

The data is a sparse Markov chain (each token has three likely successors), so a 2-layer model
learns real structure in ~60 AdamW steps and its weights and activations are no longer random:
the regime where GPTQ's Hessian-aware rounding has something to win over RTN.
"""

from __future__ import annotations

import functools

import pytest
import torch

from r1kit.config import ModelConfig
from r1kit.model.transformer import R1kitForCausalLM

VOCAB = 64


def markov_tokens(n: int, seqlen: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)  # the chain is fixed; only the walks depend on seed
    successors = torch.randint(0, VOCAB, (VOCAB, 3), generator=g)
    walk = torch.Generator().manual_seed(seed)
    out = torch.empty(n, seqlen, dtype=torch.long)
    out[:, 0] = torch.randint(0, VOCAB, (n,), generator=walk)
    for t in range(1, seqlen):
        pick = torch.multinomial(torch.tensor([0.6, 0.3, 0.1]), n, replacement=True, generator=walk)
        out[:, t] = successors[out[:, t - 1], pick]
    return out


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=VOCAB, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256,
                local_window=16, max_seq_len=256)
    base.update(overrides)
    return ModelConfig(**base)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Imported by the quantization tests: their tiny matmuls run ~100x faster on one thread than on
    two when the 2-core box is shared (an OpenMP barrier waits for a descheduled thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=4)
def _trained_state(steps: int, **overrides) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: a second thread only adds contention on a busy 2-core box
    try:
        return _train(steps, **overrides)
    finally:
        torch.set_num_threads(threads)


def _train(steps: int, **overrides) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    config = tiny_config(**overrides)
    model = R1kitForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    data = markov_tokens(512, 33, seed=0)
    for step in range(steps):
        batch = data[(step * 16) % 512 : (step * 16) % 512 + 16]
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return config, {k: v.detach().clone() for k, v in model.state_dict().items()}


def trained_model(steps: int = 60, **overrides) -> R1kitForCausalLM:
    """A fresh copy of the cached trained model (tests may quantize it in place)."""
    config, state = _trained_state(steps, **overrides)
    model = R1kitForCausalLM(config)
    model.load_state_dict(state)
    return model.eval()


def perplexity(model, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))
    return float(loss.exp())
