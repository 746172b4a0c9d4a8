"""Sentence features for the intent head: the mean over a message's tokens of one layer's hidden states.

Only the layers up to the chosen one run (the head never needs the rest, nor the vocabulary
projection). Messages are padded on the right: attention is causal, so the padding after a message
never reaches its tokens, and the mean counts the message's own positions only. Messages are batched
by length so little padding is computed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from r1kit.errors import ConfigError


def check_layer(model, layer: int) -> int:
    """``layer`` (1-based: the output of the first ``layer`` blocks; negative counts from the top) as a block count."""
    total = model.config.num_layers
    count = layer if layer > 0 else total + 1 + layer
    if not 1 <= count <= total:
        raise ConfigError(f"layer={layer}: the model has {total} layers; give 1..{total} (or -1 for the last)", param="layer")
    return count


@torch.inference_mode()
def hidden_states(model, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """The output of the first ``layer`` blocks for right-padded ``ids`` [B, T]: [B, T, H]."""
    positions = torch.arange(ids.shape[1], device=ids.device)
    x = model.model.embed_tokens(ids)
    cos, sin = model.rotary(positions, x.dtype)
    window = model.config.window_for(ids.shape[1])
    for block in model.model.layers[:layer]:
        x = block(x, cos, sin, window)
    return x


def pooled_features(model, tokenizer, texts: Sequence[str], layer: int, batch_size: int = 64, progress: bool = False) -> torch.Tensor:
    """Mean-pooled hidden states of layer ``layer`` for each text: float32 [N, hidden], in ``texts``' order."""
    count = check_layer(model, layer)
    encoded = [e.ids or [0] for e in tokenizer.encode_batch(list(texts), add_special_tokens=False)]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out = torch.empty(len(encoded), model.config.hidden_size)
    batches = range(0, len(order), batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="features", unit="batch")
    for start in batches:
        rows = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, 1)
        for r, i in enumerate(rows):
            ids[r, : len(encoded[i])] = torch.tensor(encoded[i])
            mask[r, : len(encoded[i])] = 1.0
        h = hidden_states(model, ids.to(model.device), count).float().cpu()
        out[rows] = (h * mask).sum(1) / mask.sum(1)
    return out
