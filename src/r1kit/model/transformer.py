"""The one r1kit model: a decoder-only transformer whose layers are chosen per layer by the config.

Module names follow the Hugging Face Llama/Qwen2 layout (``model.layers.N.self_attn.q_proj`` …),
so a checkpoint's state dict maps onto this model with no renaming. Training, quantization,
inference and serving all run this class; it must never hold cache memory or sampling logic.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from r1kit.config import ModelConfig
from r1kit.model.attention import Attention
from r1kit.model.cache import KVCacheView
from r1kit.model.ffn import TopKFFN, build_ffn
from r1kit.model.rope import RotaryEmbedding


M = TypeVar("M", bound=nn.Module)


def specialize(module: nn.Module, cls: type[M], **state) -> M:
    """A ``cls`` (a subclass of ``module``'s class) holding ``module``'s parameters, children and
    settings, plus ``state`` as attributes: how an outside package swaps in its variant of a layer
    (``setattr(parent, name, specialize(layer, Variant, ...))``) without building it anew. The
    weights are shared, not copied; ``module`` itself is left as it was."""
    if not issubclass(cls, type(module)):
        raise TypeError(f"{cls.__name__} does not specialize {type(module).__name__}")
    new = cls.__new__(cls)
    # nn.Module keeps its parameters, children and hooks in dicts and sets: the variant gets its own
    new.__dict__.update({k: (v.copy() if isinstance(v, (dict, set)) else v) for k, v in module.__dict__.items()})
    for name, value in state.items():
        setattr(new, name, value)
    return new


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, as Llama/Qwen2 do (parity needs the same rounding)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32:  # one fused kernel, the same numbers
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        normed = F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)
        return self.weight * normed


def build_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.hidden_size, config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``h + ffn(norm(h))``."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = build_norm(config)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = build_norm(config)
        self.mlp = build_ffn(config, layer_idx)

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x + delta, norm(x + delta))``: the residual add and the norm after it, the step a
        subclass may compute in one pass (``r1kit.fused``)."""
        h = x + delta
        return h, norm(h)

    def forward(self, x, cos, sin, window: int, cache: KVCacheView | None = None) -> torch.Tensor:
        h, normed = self.add_norm(x, self.self_attn(self.input_layernorm(x), cos, sin, window, cache), self.post_attention_layernorm)
        return h + self.mlp(normed)


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = build_norm(config)


class R1kitForCausalLM(nn.Module):
    """The model. ``forward(tokens, positions=None, cache=None) -> logits``.

    * ``tokens``: [batch, m] token ids.
    * ``positions``: [m] or [batch, m]; by default the cache's next ``m`` positions, else ``0 … m-1``.
    * ``cache``: a :class:`~r1kit.model.cache.KVCacheView`; the layers append this step's keys and
      values to it and attend to what it returns (a full prompt and one-token steps alike).
    * ``window``: the local-attention window for this call; by default the cache's, else
      ``config.window_for(m)`` (the seed's growth rule).

    Fast paths (fused projections, native norms, tensor-parallel shards) are applied from outside,
    by swapping layers for subclasses (:func:`specialize`); the model checks no flag for them.
    * ``select``: the token columns whose logits to compute (e.g. ``[-1]``); default all.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.apply(self._init_weights)
        # GPT-2's residual scaling: the projections that write into the residual stream start smaller.
        for layer in self.model.layers:
            std = config.initializer_range / (2 * config.num_layers) ** 0.5
            nn.init.normal_(layer.self_attn.o_proj.weight, std=std)
            nn.init.normal_(layer.mlp.down_proj.weight, std=std)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=self.config.initializer_range)

    @property
    def device(self) -> torch.device:
        # the embedding table, not the head: inference may swap the head for a packed kernel
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCacheView | None = None,
        window: int | None = None,
        select: torch.Tensor | list[int] | None = None,
    ) -> torch.Tensor:
        m = tokens.shape[1]
        if positions is None:
            positions = cache.next_positions(m, tokens.device) if cache is not None else torch.arange(m, device=tokens.device)
        if window is None:
            window = cache.window if cache is not None else self.config.window_for(m)
        x = self.model.embed_tokens(tokens)
        cos, sin = self.rotary(positions, x.dtype)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and cache is None:
                # recompute in backward; torch restores the RNG so dropout masks match the first pass
                x = checkpoint(layer, x, cos, sin, window, use_reentrant=False)
            else:
                x = layer(x, cos, sin, window, cache)
        if cache is not None:
            cache.advance(m)
        x = self.model.norm(x if select is None else x[:, select])
        return self.lm_head(x)

    # -- introspection used by the trainer, the controller and the benchmarks -----------------------
    def topk_layers(self) -> list[tuple[int, TopKFFN]]:
        return [(i, layer.mlp) for i, layer in enumerate(self.model.layers) if isinstance(layer.mlp, TopKFFN)]

    # -- checkpoints ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> R1kitForCausalLM:
        """Load a float Hugging Face layout directory (Llama, Qwen2 or r1kit ``config.json`` + safetensors);
        GPTQ, GGUF and pulled models load through :func:`r1kit.checkpoints.load_model`."""
        from r1kit.model.hf import load_model

        return load_model(path, dtype=dtype, device=device)

    def save_pretrained(self, path: str | Path, max_shard_bytes: int = 5 * 2**30, state: dict[str, torch.Tensor] | None = None) -> None:
        """Save as ``config.json`` + ``model.safetensors`` (sharded with an index above ``max_shard_bytes``)."""
        from r1kit.model.hf import save_model

        save_model(self, path, max_shard_bytes=max_shard_bytes, state=state)
