"""Structured pruning of FFN neurons: what would make "40% fewer parameters" true of a Top-K model.

Top-K activation keeps every weight; only pruning removes any. Two ways to rank a layer's neurons:

* **selection** — how often the trained Top-K layer selects each neuron on training text (counted
  by swapping each layer for a subclass whose :meth:`TopKFFN.keep` also tallies its mask);
* **magnitude** — the L2 norm of the neuron's weights (its gate row, up row and down column),
  the usual baseline.

:func:`prune` keeps the top-ranked ``width`` neurons of every layer and returns a smaller dense-FFN
model; :func:`width_for` finds the width that meets a parameter target. This module must never train.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from r1kit.config import ModelConfig
from r1kit.errors import ConfigError
from r1kit.model.ffn import TopKFFN
from r1kit.model.transformer import R1kitForCausalLM, specialize


class CountingTopKFFN(TopKFFN):
    """A Top-K layer that adds each token's selection mask to ``counts`` (one entry per neuron)."""

    counts: torch.Tensor

    def keep(self, magnitude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mask, kept, total = super().keep(magnitude)
        self.counts += mask.reshape(-1, mask.shape[-1]).sum(0).to(self.counts.dtype)
        return mask, kept, total


@torch.inference_mode()
def selection_counts(model: R1kitForCausalLM, blocks: np.ndarray, batch_size: int = 4) -> dict[int, torch.Tensor]:
    """How many tokens of ``blocks`` selected each neuron, per Top-K layer (the model is left as it was)."""
    layers = model.topk_layers()
    if not layers:
        raise ConfigError("selection pruning needs a model with Top-K FFN layers (ffn: topk)")
    originals = {i: ffn for i, ffn in layers}
    counters = {i: specialize(ffn, CountingTopKFFN, counts=torch.zeros(ffn.down_proj.in_features, dtype=torch.float64),
                              gather_max_tokens=0) for i, ffn in layers}  # fmt: skip
    was_training = model.training
    model.eval()
    try:
        for i, counter in counters.items():
            model.model.layers[i].mlp = counter
        for lo in range(0, len(blocks), batch_size):
            model(torch.from_numpy(blocks[lo : lo + batch_size, :-1]).to(model.device))
    finally:
        for i, ffn in originals.items():
            model.model.layers[i].mlp = ffn
        model.train(was_training)
    return {i: counter.counts for i, counter in counters.items()}


def magnitude_scores(model: R1kitForCausalLM) -> dict[int, torch.Tensor]:
    """The L2 norm of each FFN neuron's weights (gate row, up row, down column), per layer."""
    scores = {}
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        squares = mlp.up_proj.weight.detach().float().pow(2).sum(1) + mlp.down_proj.weight.detach().float().pow(2).sum(0)
        if mlp.gated:
            squares += mlp.gate_proj.weight.detach().float().pow(2).sum(1)
        scores[i] = squares.sqrt()
    return scores


def non_embedding_parameters(config: ModelConfig) -> int:
    """Parameters outside the embedding table and head: what the decoder layers hold (plus the final norm)."""
    return config.num_parameters() - config.vocab_size * config.hidden_size * (1 if config.tie_embeddings else 2)


def width_for(config: ModelConfig, fewer: float) -> int:
    """The largest FFN width whose dense model has at least ``fewer`` (a fraction) fewer non-embedding parameters."""
    if not 0.0 < fewer < 1.0:
        raise ConfigError(f"pruning target {fewer} must be a fraction in (0, 1) of the non-embedding parameters to remove")
    target = (1.0 - fewer) * non_embedding_parameters(dataclasses.replace(config, ffn="dense"))
    fits = [f for f in range(1, config.intermediate_size + 1)
            if non_embedding_parameters(dataclasses.replace(config, intermediate_size=f, ffn="dense")) <= target]  # fmt: skip
    if not fits:
        raise ConfigError(f"removing {fewer:.0%} of the parameters needs more than the FFNs hold: attention alone is above the target")
    return max(fits)


def prune(model: R1kitForCausalLM, scores: dict[int, torch.Tensor], width: int) -> R1kitForCausalLM:
    """A dense-FFN copy of ``model`` keeping, in every layer, the ``width`` neurons with the highest ``scores``."""
    if len(scores) != model.config.num_layers:
        raise ConfigError(f"pruning needs a score for each of the {model.config.num_layers} layers, got {len(scores)}")
    config = dataclasses.replace(model.config, intermediate_size=width, ffn="dense")
    pruned = R1kitForCausalLM(config).to(model.device)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for i, layer_scores in scores.items():
        keep = layer_scores.topk(width).indices.sort().values.to(model.device)
        prefix = f"model.layers.{i}.mlp."
        for name in ("gate_proj", "up_proj"):
            if prefix + name + ".weight" in state:
                state[prefix + name + ".weight"] = state[prefix + name + ".weight"][keep]
        state[prefix + "down_proj.weight"] = state[prefix + "down_proj.weight"][:, keep]
    pruned.load_state_dict(state)
    return pruned
