"""GGUF files (llama.cpp, Ollama, LM Studio) read as Hugging Face config and weights.

The file is read with the ``gguf`` package (llama.cpp's own reader and dequantizer). Architectures
``llama`` and ``qwen2`` map onto r1kit's model with every layer global + dense; quantized tensors are
dequantized to float32 on load; llama.cpp's row permutation of Llama's q/k projections (its rotary
pairs neighbouring dimensions, Hugging Face's pairs the two halves) is undone. Anything else is a
:class:`CheckpointError` naming what the file holds and what r1kit takes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from r1kit.errors import CheckpointError

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")

# GGUF tensor name (without .weight/.bias) <-> Hugging Face name; block names get the layer index
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
ROPE_FREQS = "rope_freqs.weight"  # llama3-style per-dimension frequency divisors


def open_gguf(path: str | Path):
    """A ``gguf.GGUFReader`` over ``path``, or a CheckpointError that says why it is not a usable GGUF."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist")
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise CheckpointError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, IndexError, OSError, TypeError) as exc:
        raise CheckpointError(f"{path} cannot be read as GGUF ({exc}); it is probably truncated") from None


def field(reader, key: str, default: Any = None) -> Any:
    """The value of a metadata key (str, number, bool or list), or ``default``."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def architecture(reader, where: str) -> str:
    arch = field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(
            f"{where}: general.architecture={arch!r} is not supported; r1kit reads GGUF architectures {sorted(ARCHITECTURES)} "
            "(DeepSeek-R1-Distill-Llama/-Qwen are llama/qwen2)"
        )
    return arch


def hf_config(reader, where: str) -> dict[str, Any]:
    """The Hugging Face ``config.json`` mapping of a llama/qwen2 GGUF, from its metadata and tensor names."""
    arch = architecture(reader, where)

    def need(key: str):
        value = field(reader, f"{arch}.{key}")
        if value is None:
            raise CheckpointError(f"{where}: metadata {arch}.{key} is missing; the file is incomplete")
        return value

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    names = {t.name for t in reader.tensors}
    vocab = field(reader, f"{arch}.vocab_size") or _vocab_rows(reader)
    head_dim = field(reader, f"{arch}.attention.key_length") or hidden // heads
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(field(reader, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(head_dim),
        "hidden_act": "silu",
        "max_position_embeddings": int(field(reader, f"{arch}.context_length", 4096)),
        "rms_norm_eps": float(field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(reader, arch, int(head_dim), where),
        "tie_word_embeddings": "output.weight" not in names,
        "torch_dtype": "float32",
        "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": field(reader, "tokenizer.ggml.padding_token_id"),
    }
    if arch == "llama" and "blk.0.attn_q.bias" in names:
        config["attention_bias"] = True
    return {k: v for k, v in config.items() if v is not None or k == "rope_scaling"}


def _vocab_rows(reader) -> int:
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise CheckpointError("the GGUF has no token_embd.weight; it is not a language model")
    return int(embed.shape[1])


def _rope_scaling(reader, arch: str, head_dim: int, where: str) -> dict[str, Any] | None:
    kind = field(reader, f"{arch}.rope.scaling.type")
    factor = field(reader, f"{arch}.rope.scaling.factor")
    original = field(reader, f"{arch}.rope.scaling.original_context_length")
    freqs = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    if freqs is not None:
        return _llama3_from_freqs(np.asarray(freqs.data, dtype=np.float32), reader, arch, head_dim, where)
    if kind in (None, "none") or not factor or float(factor) == 1.0:
        return None
    if kind not in ("linear", "yarn"):
        raise CheckpointError(f"{where}: rope scaling {kind!r} is not supported; r1kit reads linear and yarn from GGUF")
    out = {"rope_type": kind, "factor": float(factor)}
    if original:
        out["original_max_position_embeddings"] = int(original)
    return out


def _llama3_from_freqs(divisors: np.ndarray, reader, arch: str, head_dim: int, where: str) -> dict[str, Any]:
    """Llama 3.1's rope scaling from llama.cpp's ``rope_freqs`` tensor (the file keeps the divisors, not the rule).

    The factor is the largest divisor; the other parameters are Llama 3.1's, accepted only if r1kit's
    rotary code then reproduces every stored divisor.
    """
    from r1kit.config import RopeScaling
    from r1kit.model.rope import inverse_frequencies

    params = {"rope_type": "llama3", "factor": float(divisors.max()), "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    theta = float(field(reader, f"{arch}.rope.freq_base", 10000.0))
    plain, _ = inverse_frequencies(head_dim, theta, None)
    scaled, _ = inverse_frequencies(head_dim, theta, RopeScaling.from_dict(params))
    expected = (plain / scaled).numpy()
    if divisors.shape != expected.shape or not np.allclose(divisors, expected, rtol=1e-3):
        raise CheckpointError(
            f"{where}: rope_freqs.weight does not follow Llama 3.1's rope scaling; r1kit cannot rebuild this model's rotary frequencies"
        )
    return params


def hf_name(gguf_name: str, where: str) -> str:
    """The Hugging Face name of a GGUF tensor name."""
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in GLOBAL_NAMES and suffix == "weight":
        return f"{GLOBAL_NAMES[stem]}.weight"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in BLOCK_NAMES and suffix in ("weight", "bias"):
        return f"model.layers.{int(parts[1])}.{BLOCK_NAMES[parts[2]]}.{suffix}"
    raise CheckpointError(f"{where}: tensor {gguf_name!r} has no place in a llama/qwen2 model (mixture-of-experts or another architecture?)")


def llama_unpermute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: within each head, interleaved pairs back to two halves."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def dequantized(tensor, where: str) -> torch.Tensor:
    """One GGUF tensor as float32 in torch's dimension order."""
    import gguf

    kind = tensor.tensor_type.name
    if kind not in TENSOR_TYPES:
        raise CheckpointError(f"{where}: tensor {tensor.name} has type {kind}; r1kit reads {', '.join(TENSOR_TYPES)}")
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(tensor.shape))
    return torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))  # a copy: the file is mapped read-only


def read_weights(reader, config: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    """Every weight of the file under its Hugging Face name, float32, q/k rows in Hugging Face order."""
    from tqdm import tqdm

    state: dict[str, torch.Tensor] = {}
    permute = {"self_attn.q_proj": config["num_attention_heads"], "self_attn.k_proj": config["num_key_value_heads"]}
    llama = config["model_type"] == "llama"
    for tensor in tqdm(reader.tensors, desc="reading GGUF", unit="tensor", disable=None, leave=False):
        if tensor.name == ROPE_FREQS:  # already folded into rope_scaling
            continue
        name = hf_name(tensor.name, where)
        value = dequantized(tensor, where)
        heads = next((h for part, h in permute.items() if f".{part}." in name), None)
        if llama and heads is not None:
            value = llama_unpermute(value, heads)
        state[name] = value
    return state
