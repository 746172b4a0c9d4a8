"""Typed, validated configuration shared by every stage.

Configs are plain dataclasses: they are built from YAML, from a Hugging Face ``config.json`` or in
code, and validated once at construction so that a wrong field fails early with a message that names
the field and the fix. This module must never import torch: configs are read by tools (the CLI's
``--help``, the data pipeline) that should not pay for it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from r1kit.errors import ConfigError, R1kitError


ATTENTION_KINDS = ("global", "local", "hybrid")
FFN_KINDS = ("dense", "topk")
NORMS = ("rmsnorm", "layernorm")
ACTIVATIONS = ("swiglu", "gelu")
ROPE_SCALINGS = ("linear", "dynamic", "llama3", "yarn")
HYBRID_GLOBAL = ("full", "compressed")
HYBRID_GATES = ("token", "head")
TOPK_GRADIENTS = ("ste", "masked")
WINDOW_GROWTH = ("fixed", "proportional")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Long-context scaling of the rotary frequencies (the Hugging Face ``rope_scaling`` kinds)."""

    type: str
    factor: float
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn

    def __post_init__(self) -> None:
        if self.type not in ROPE_SCALINGS:
            raise ConfigError(f"rope_scaling.type={self.type!r} is not supported; use one of {ROPE_SCALINGS} or no rope_scaling")
        if not self.factor >= 1.0:
            raise ConfigError(f"rope_scaling.factor={self.factor} must be >= 1 (it stretches the context)")
        if self.type in ("llama3", "yarn") and not self.original_max_position_embeddings:
            raise ConfigError(f"rope_scaling.type={self.type!r} needs original_max_position_embeddings (the pre-training context length)")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> RopeScaling:
        # transformers >= 5 repeats rope_theta inside rope_parameters; unset optional keys come as None
        raw = {k: v for k, v in raw.items() if v is not None and k != "rope_theta"}
        kind = raw.pop("rope_type", None) or raw.pop("type", None)
        raw.pop("type", None)
        return _build(cls, {"type": kind, **raw}, where="rope_scaling")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The architecture of the one r1kit model.

    A Llama or Qwen2 checkpoint is this model with every layer ``global`` and ``dense``; the seed's
    model is the same with ``hybrid`` attention and ``topk`` FFN layers.

    Per-layer patterns (``attention``, ``ffn``) accept one kind for every layer, or a list whose length
    divides ``num_layers``; a short list repeats as a cycle (``[local, local, local, hybrid]`` over 8
    layers is Gemma-3-like: three local layers, then one that also sees the whole context).
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    norm: str = "rmsnorm"
    norm_eps: float = 1e-6
    activation: str = "swiglu"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 4096
    qkv_bias: bool = False
    tie_embeddings: bool = False
    dropout: float = 0.0
    initializer_range: float = 0.02
    # --- r1kit's own fields: per-layer patterns and the seed's DHA / Top-K designs ---
    attention: tuple[str, ...] | str = "global"
    ffn: tuple[str, ...] | str = "dense"
    local_window: int = 256
    max_local_window: int = 4096
    window_growth: str = "fixed"
    window_growth_ratio: int = 4
    hybrid_gate: str = "token"
    hybrid_global: str = "full"
    hybrid_compress_block: int = 32
    hybrid_gate_threshold: float | None = None
    topk_sparsity: float | tuple[float, ...] = 0.6  # one value, or one per layer (what training's controller reached)
    topk_gradient: str = "ste"
    topk_gather_max_tokens: int = 4
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    torch_dtype: str = "float32"

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        if self.num_kv_heads is None:
            set_("num_kv_heads", self.num_heads)
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ConfigError(
                    f"num_heads={self.num_heads} does not divide hidden_size={self.hidden_size}; "
                    "choose a head count that divides it, or set head_dim explicitly"
                )
            set_("head_dim", self.hidden_size // self.num_heads)
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be a positive even number (RoPE rotates pairs)")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads} (each KV head serves a whole group of query heads)"
            )
        _choice("norm", self.norm, NORMS)
        _choice("activation", self.activation, ACTIVATIONS)
        _choice("window_growth", self.window_growth, WINDOW_GROWTH)
        _choice("hybrid_gate", self.hybrid_gate, HYBRID_GATES)
        _choice("hybrid_global", self.hybrid_global, HYBRID_GLOBAL)
        _choice("topk_gradient", self.topk_gradient, TOPK_GRADIENTS)
        if isinstance(self.rope_scaling, Mapping):
            set_("rope_scaling", RopeScaling.from_dict(self.rope_scaling))
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta={self.rope_theta} must be positive")
        if not self.norm_eps > 0:
            raise ConfigError(f"norm_eps={self.norm_eps} must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout} must be in [0, 1)")
        if isinstance(self.topk_sparsity, (list, tuple)):
            set_("topk_sparsity", tuple(float(v) for v in self.topk_sparsity))
            if len(self.topk_sparsity) != self.num_layers:
                raise ConfigError(f"topk_sparsity lists {len(self.topk_sparsity)} values; give one, or one per layer ({self.num_layers})")
        for value in self.topk_sparsity if isinstance(self.topk_sparsity, tuple) else (self.topk_sparsity,):
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"topk_sparsity={value} must be in [0, 1): it is the fraction of FFN neurons switched off")
        if not 1 <= self.local_window <= self.max_local_window:
            raise ConfigError(f"local_window={self.local_window} must be between 1 and max_local_window={self.max_local_window}")
        if self.window_growth_ratio < 1:
            raise ConfigError(f"window_growth_ratio={self.window_growth_ratio} must be >= 1")
        if self.hybrid_compress_block < 2:
            raise ConfigError(f"hybrid_compress_block={self.hybrid_compress_block} must be >= 2 tokens")
        if self.hybrid_gate_threshold is not None and not 0.0 < self.hybrid_gate_threshold < 1.0:
            raise ConfigError(
                f"hybrid_gate_threshold={self.hybrid_gate_threshold} must be in (0, 1): tokens whose gate is above it skip the global branch"
            )
        if self.topk_gather_max_tokens < 0:
            raise ConfigError(f"topk_gather_max_tokens={self.topk_gather_max_tokens} must be >= 0")
        if isinstance(self.eos_token_id, list):
            set_("eos_token_id", tuple(self.eos_token_id))
        set_("attention", _layer_pattern("attention", self.attention, ATTENTION_KINDS, self.num_layers))
        set_("ffn", _layer_pattern("ffn", self.ffn, FFN_KINDS, self.num_layers))

    # -- derived facts -------------------------------------------------------------------------
    @property
    def is_standard(self) -> bool:
        """True when this is a plain Llama/Qwen2 decoder (what other tools can load)."""
        return (
            all(kind == "global" for kind in self.attention)
            and all(kind == "dense" for kind in self.ffn)
            and self.norm == "rmsnorm"
            and self.activation == "swiglu"
        )

    @property
    def kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    def sparsity_for(self, layer_idx: int) -> float:
        """The Top-K sparsity of layer ``layer_idx``."""
        return self.topk_sparsity[layer_idx] if isinstance(self.topk_sparsity, tuple) else self.topk_sparsity

    def window_for(self, length: int) -> int:
        """Local attention window for a request of ``length`` tokens.

        ``fixed`` keeps ``local_window``. ``proportional`` is the seed's dynamic growth on long
        inputs: the window is the power of two nearest above ``length / window_growth_ratio``, never
        below ``local_window`` nor above ``max_local_window`` (with the default ratio 4 and 256/4096:
        1K tokens -> 256, 4K -> 1024, 16K and beyond -> 4096). The engine fixes the window per request
        at prefill so that cached decoding sees the same window as a full forward.
        """
        if self.window_growth == "fixed" or length <= 0:
            return self.local_window
        wanted = 1 << max(0, math.ceil(math.log2(max(1, length) / self.window_growth_ratio)))
        return max(self.local_window, min(self.max_local_window, wanted))

    def num_parameters(self) -> int:
        """Parameter count from the config alone (embeddings counted once when tied)."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_heads * hd, self.num_kv_heads * hd
        attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if self.qkv_bias else 0)
        gate_out = self.num_heads if self.hybrid_gate == "head" else 1
        gate = d * (d // 4) + (d // 4) + (d // 4) * gate_out + gate_out
        ffn = (3 if self.activation == "swiglu" else 2) * d * f
        norms = 2 * d * (2 if self.norm == "layernorm" else 1)
        total = sum(attn + ffn + norms + (gate if kind == "hybrid" else 0) for kind in self.attention)
        emb = self.vocab_size * d
        return total + emb * (1 if self.tie_embeddings else 2) + d * (2 if self.norm == "layernorm" else 1)

    # -- (de)serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["attention"] = list(self.attention)
        out["ffn"] = list(self.ffn)
        if isinstance(self.topk_sparsity, tuple):
            out["topk_sparsity"] = list(self.topk_sparsity)
        if isinstance(self.eos_token_id, tuple):
            out["eos_token_id"] = list(self.eos_token_id)
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str = "model config") -> ModelConfig:
        return _build(cls, raw, where=where)

    @classmethod
    def from_yaml(cls, path: str | Path) -> ModelConfig:
        """Load from a YAML file; the model fields may sit at the top level or under ``model:``."""
        return load_section(cls, path, "model")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of field: value, got {type(raw).__name__}")
    return raw


def read_json(path: str | Path, error: type[R1kitError] = ConfigError, hint: str = "", mapping: bool = False) -> Any:
    """The JSON value in ``path``; an ``error`` that names the file (followed by ``hint``, how to fix it)
    when it is not valid JSON, or, with ``mapping``, not a JSON object."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise error(f"{path} is not valid JSON ({exc}){hint}") from None
    if mapping and not isinstance(raw, dict):
        raise error(f"{path} must hold a JSON object, not {type(raw).__name__}{hint}")
    return raw


T = TypeVar("T")


def load_section(cls: type[T], path: str | Path, section: str) -> T:
    """Build ``cls`` from a YAML file whose fields sit at the top level or under ``section:``."""
    raw = load_yaml(path)
    if section in raw and isinstance(raw[section], Mapping):
        raw = raw[section]
    return _build(cls, raw, where=str(path))


def _build(cls: type[T], raw: Mapping[str, Any], where: str) -> T:
    """Construct dataclass ``cls`` from ``raw``, rejecting unknown fields with a did-you-mean hint."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [key for key in raw if key not in names]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, names, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"{where}: unknown field(s) {', '.join(hints)}; known fields: {', '.join(sorted(names))}")
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in raw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing required field(s) {', '.join(missing)}")
    hints = typing.get_type_hints(cls)
    try:
        return cls(**{key: _coerce(key, value, hints[key]) for key, value in raw.items()})
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Numbers as YAML really gives them: ``1e-6`` (no dot) is text to PyYAML, an int may stand for a float."""
    accepts = set(typing.get_args(hint)) or {hint}
    if float in accepts and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{name}={value!r} must be a number") from None
    if int in accepts and float not in accepts and isinstance(value, str):
        raise ConfigError(f"{name}={value!r} must be a whole number, not text")
    return value


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {allowed}")


def _layer_pattern(name: str, value: Any, allowed: tuple[str, ...], num_layers: int) -> tuple[str, ...]:
    kinds = (value,) if isinstance(value, str) else tuple(value)
    if not kinds:
        raise ConfigError(f"{name} must name at least one kind from {allowed}")
    for kind in kinds:
        _choice(name, kind, allowed)
    if num_layers % len(kinds):
        raise ConfigError(
            f"{name} lists {len(kinds)} kinds, which does not divide num_layers={num_layers}; "
            f"give one kind, {num_layers} kinds, or a cycle whose length divides {num_layers}"
        )
    return kinds * (num_layers // len(kinds))


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` atomically (a temp file in the same folder, then a rename), so a crash never
    leaves half a file; the folder is created if needed. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def dump_json(data: Any, path: str | Path) -> None:
    """Write JSON atomically (:func:`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
