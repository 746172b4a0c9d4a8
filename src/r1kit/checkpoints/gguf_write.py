"""A standard (Llama/Qwen2) model directory written as a GGUF file that llama.cpp and Ollama run.

Tensors are named and laid out as llama.cpp's own converter writes them (Llama's q/k rows permuted
for its rotary, norms and biases float32), in float32, float16 or Q8_0 (blocks of 32, one float16
scale each). The tokenizer and chat template go into the ``tokenizer.*`` metadata. Models with
r1kit's own layers (local/hybrid attention, Top-K FFNs, LayerNorm/GELU) have no GGUF architecture and
are refused, as are GPTQ checkpoints (their int4 layout is not a GGUF type).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from r1kit.checkpoints.gguf_read import BLOCK_NAMES, GLOBAL_NAMES
from r1kit.errors import CheckpointError

OUTTYPES = ("f32", "f16", "q8_0")


def gguf_name(hf_name: str) -> str:
    """The llama.cpp name of a Hugging Face tensor name."""
    stem, _, suffix = hf_name.rpartition(".")
    for gguf, hf in GLOBAL_NAMES.items():
        if stem == hf:
            return f"{gguf}.{suffix}"
    parts = stem.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"]:
        for gguf, hf in BLOCK_NAMES.items():
            if parts[3] == hf:
                return f"blk.{int(parts[2])}.{gguf}.{suffix}"
    raise CheckpointError(f"tensor {hf_name!r} has no llama.cpp name; only standard Llama/Qwen2 models convert to GGUF")


def llama_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's q/k row order to llama.cpp's: within each head, two halves to interleaved pairs."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _encoded(array: np.ndarray, outtype: str):
    """(data, raw GGML type or None) for one tensor; vectors and widths Q8_0 cannot block stay float32."""
    import gguf

    if array.ndim == 1 or outtype == "f32":
        return array.astype(np.float32), None
    if outtype == "f16":
        return array.astype(np.float16), None
    if array.shape[-1] % 32:
        return array.astype(np.float16), None  # llama.cpp's fallback for rows Q8_0 cannot block
    kind = gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.quantize(array.astype(np.float32), kind), kind


def write_gguf(model_dir: str | Path, out: str | Path, outtype: str = "f16") -> Path:
    """Write the model in ``model_dir`` as a GGUF file at ``out`` (temp file, then rename)."""
    import gguf
    from tqdm import tqdm

    from r1kit.checkpoints.gguf_tokenizer import add_tokenizer_to_gguf
    from r1kit.model.hf import load_config, read_safetensors, weight_files
    from r1kit.quant.checkpoint import is_gptq_checkpoint

    model_dir, out = Path(model_dir), Path(out)
    if outtype not in OUTTYPES:
        raise CheckpointError(f"--outtype {outtype!r} is not supported; choose one of {OUTTYPES}")
    if is_gptq_checkpoint(model_dir):
        raise CheckpointError(f"{model_dir} is a GPTQ checkpoint; GGUF has no GPTQ int4 type: convert the float model instead")
    config = load_config(model_dir)
    if not config.is_standard:
        raise CheckpointError(
            f"{model_dir} uses r1kit-only layers (attention {sorted(set(config.attention))}, ffn {sorted(set(config.ffn))}, "
            f"norm {config.norm}, activation {config.activation}); llama.cpp has no such architecture, only standard Llama/Qwen2 models convert"
        )
    arch = "qwen2" if config.qkv_bias else "llama"
    state = read_safetensors(weight_files(model_dir))
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)

    tmp = out.with_name(f".{out.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        _write_metadata(writer, config, model_dir.name, outtype)
        add_tokenizer_to_gguf(writer, model_dir)
        heads = {"self_attn.q_proj": config.num_heads, "self_attn.k_proj": config.num_kv_heads}
        for name in tqdm(sorted(state), desc=f"writing {out.name}", unit="tensor", disable=None, leave=False):
            tensor = state[name].float()
            if arch == "llama":
                count = next((h for part, h in heads.items() if f".{part}." in name), None)
                tensor = tensor if count is None else llama_permute(tensor, count)
            data, raw = _encoded(tensor.numpy(), outtype)
            writer.add_tensor(gguf_name(name), data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def _write_metadata(writer, config, name: str, outtype: str) -> None:
    import gguf

    writer.add_name(name)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_dimension_count(config.head_dim)
    if config.head_dim * config.num_heads != config.hidden_size:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_type[outtype])
    scaling = config.rope_scaling
    if scaling is not None:
        if scaling.type not in ("linear", "yarn"):
            raise CheckpointError(f"rope scaling {scaling.type!r} has no GGUF metadata form r1kit writes; only linear and yarn")
        writer.add_rope_scaling_type(gguf.RopeScalingType(scaling.type))
        writer.add_rope_scaling_factor(scaling.factor)
        if scaling.original_max_position_embeddings:
            writer.add_rope_scaling_orig_ctx_len(scaling.original_max_position_embeddings)
