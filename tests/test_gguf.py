"""GGUF in and out: every tensor type r1kit reads, Llama's q/k permutation, qwen2 biases, the writer's
round trip, clear errors; references are the ``gguf`` package's own dequantizer and ``transformers``'
GGUF loader (neither runs r1kit's code)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from r1kit.checkpoints.gguf_convert import gguf_view, load_gguf_model, view_source
from r1kit.checkpoints.gguf_read import TENSOR_TYPES, dequantized, open_gguf
from r1kit.errors import CheckpointError

Q = gguf.GGMLQuantizationType
# where each K-quant block keeps its float16 scale(s): (byte offsets) within the block
K_SCALE_OFFSETS = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def encode(kind: str, values: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, object]:
    """(data, raw dtype) of ``values`` [rows, cols] stored as ``kind``; K-quants get random codes with sane scales."""
    if kind == "F32":
        return values.astype(np.float32), None
    if kind == "F16":
        return values.astype(np.float16), None
    if kind in K_SCALE_OFFSETS:
        block, size = gguf.GGML_QUANT_SIZES[Q[kind]]
        rows, cols = values.shape
        raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
        for offset in K_SCALE_OFFSETS[kind]:
            scale = rng.uniform(0.001, 0.01, size=(rows, cols // block)).astype(np.float16)
            raw[:, :, offset : offset + 2] = scale.view(np.uint8).reshape(rows, cols // block, 2)
        return raw.reshape(rows, -1), Q[kind]
    return gguf.quants.quantize(values.astype(np.float32), Q[kind]), Q[kind]


def test_every_tensor_type_reads_as_the_gguf_dequantizer_says(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "types.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    stored = {}
    for kind in TENSOR_TYPES:
        data, raw = encode(kind, rng.standard_normal((3, 512)).astype(np.float32) * 0.1, rng)
        writer.add_tensor(f"t.{kind}", data, raw_dtype=raw)
        stored[kind] = (data, raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = open_gguf(path)
    for tensor in reader.tensors:
        kind = tensor.name.split(".")[1]
        got = dequantized(tensor, "test")
        data, raw = stored[kind]
        want = data.astype(np.float32) if raw is None else gguf.quants.dequantize(data, raw)
        assert got.shape == (3, 512), kind
        assert got.dtype == torch.float32
        np.testing.assert_array_equal(got.numpy(), want, err_msg=kind)


def test_an_unsupported_tensor_type_names_itself(tmp_path):
    path = tmp_path / "q2k.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    block, size = gguf.GGML_QUANT_SIZES[Q.Q2_K]
    writer.add_tensor("t", np.zeros((1, size), dtype=np.uint8), raw_dtype=Q.Q2_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="Q2_K.*r1kit reads F32, F16, BF16, Q8_0"):
        dequantized(open_gguf(path).tensors[0], "test")


# -- a tiny model written by hand in llama.cpp's layout, every linear of another type ---------------------
HIDDEN, FFN, HEADS, KV_HEADS, VOCAB = 256, 512, 4, 2, 320
LINEAR_TYPES = {"attn_q": "Q4_K", "attn_k": "Q5_K", "attn_v": "Q6_K", "attn_output": "Q4_0",
                "ffn_gate": "Q4_1", "ffn_up": "Q8_0", "ffn_down": "BF16"}  # fmt: skip


def write_tiny_gguf(path, arch: str, layers: int = 2, tied: bool = False) -> None:
    rng = np.random.default_rng(1)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_vocab_size(VOCAB)
    # transformers' GGUF loader builds a tokenizer from the metadata too: a byte-level BPE with one merge
    from tokenizers import pre_tokenizers

    tokens = sorted(pre_tokenizers.ByteLevel.alphabet()) + ["Ġt"] + [f"<t{i}>" for i in range(VOCAB - 257)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.NORMAL] * 257 + [gguf.TokenType.CONTROL] * (VOCAB - 257))
    writer.add_token_merges(["Ġ t"])
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(257)

    def add(name, shape, kind, scale=0.05):
        data, raw = encode(kind, rng.standard_normal(shape).astype(np.float32) * scale, rng)
        writer.add_tensor(name, data, raw_dtype=raw)

    add("token_embd.weight", (VOCAB, HIDDEN), "F16", 0.5)
    if not tied:
        add("output.weight", (VOCAB, HIDDEN), "F32")
    writer.add_tensor("output_norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
    head_dim = HIDDEN // HEADS
    rows = {"attn_q": HIDDEN, "attn_k": KV_HEADS * head_dim, "attn_v": KV_HEADS * head_dim, "attn_output": HIDDEN,
            "ffn_gate": FFN, "ffn_up": FFN, "ffn_down": HIDDEN}
    for i in range(layers):
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{i}.{norm}.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
        for name, kind in LINEAR_TYPES.items():
            add(f"blk.{i}.{name}.weight", (rows[name], FFN if name == "ffn_down" else HIDDEN), kind)
        if arch == "qwen2":
            for name in ("attn_q", "attn_k", "attn_v"):
                writer.add_tensor(f"blk.{i}.{name}.bias", (0.1 * rng.standard_normal(rows[name])).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def transformers_logits(path, ids: torch.Tensor) -> torch.Tensor:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen2", False)])
def test_a_hand_written_gguf_runs_as_transformers_runs_it(tmp_path, arch, tied):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, arch, tied=tied)
    ids = torch.tensor([[3, 17, 250, 9, 100, 42, 7, 300, 1, 2]])
    model = load_gguf_model(path)
    assert model.config.tie_embeddings is tied and model.config.qkv_bias is (arch == "qwen2")
    with torch.no_grad():
        ours = model(ids)
    want = transformers_logits(path, ids)
    torch.testing.assert_close(ours, want, atol=1e-4, rtol=1e-4)


def test_not_a_gguf_or_an_unknown_architecture_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        open_gguf(bad)
    truncated = tmp_path / "cut.gguf"
    write_tiny_gguf(tmp_path / "whole.gguf", "llama", layers=1)
    truncated.write_bytes((tmp_path / "whole.gguf").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated|cannot be read"):
        load_gguf_model(truncated)
    other = tmp_path / "gemma.gguf"
    writer = gguf.GGUFWriter(str(other), "gemma3")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="architecture='gemma3' is not supported.*llama.*qwen2"):
        load_gguf_model(other)


def test_a_view_directory_points_at_its_gguf_and_is_made_once(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "llama", layers=1)
    home = tmp_path / "home"
    view = gguf_view(path, home)
    assert view_source(view) == path.resolve()
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {p.name for p in view.iterdir()}
    stamp = (view / "config.json").stat().st_mtime_ns
    assert gguf_view(path, home) == view and (view / "config.json").stat().st_mtime_ns == stamp
    assert not (view / "model.safetensors").exists()  # weights stay in the GGUF


def test_a_gguf_file_is_a_model_for_quantize_and_bench(tmp_path, monkeypatch, capsys):
    from r1kit.checkpoints import load_model
    from r1kit.cli import main

    monkeypatch.setenv("R1KIT_HOME", str(tmp_path / "home"))
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "qwen2", layers=1)
    out = tmp_path / "int4"
    assert main(["quantize", "--model", str(path), "--method", "rtn", "--out", str(out), "--no-progress"]) == 0
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "gguf_source.json").exists()  # the copy stands alone, not pointing at the GGUF
    assert load_model(out).model.layers[0].self_attn.q_proj.__class__.__name__ == "QuantLinear"
    assert main(["bench", "--model", str(path), "--batch-sizes", "1", "--prompt-len", "16", "--new-tokens", "8", "--prefix-len", "0"]) == 0
    assert "tok/s" in capsys.readouterr().out
