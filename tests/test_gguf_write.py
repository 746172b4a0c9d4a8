"""`r1kit convert DIR --to gguf`: standard models written as GGUF read back, by r1kit's reader and by
``transformers``' GGUF loader, with the original model's logits (f32 exactly, f16/q8_0 within their
rounding); r1kit-only layers and GPTQ checkpoints are clear errors."""

from __future__ import annotations

import json
import socket

import pytest
import torch

from r1kit.checkpoints.gguf_convert import load_gguf_model
from r1kit.checkpoints.gguf_write import write_gguf
from r1kit.cli import main
from r1kit.config import ModelConfig
from r1kit.tokenizer import EOS, train_tokenizer
from r1kit.errors import CheckpointError
from r1kit.model.transformer import R1kitForCausalLM

IDS = torch.tensor([[5, 17, 250, 9, 100, 42, 7, 300, 1, 2, 77, 150]])
# how far each stored type may move the logits of this model (f16: 11 bits of mantissa; q8_0: 8-bit codes)
TOLERANCE = {"f32": 1e-5, "f16": 2e-3, "q8_0": 2e-2}


def model_dir(tmp_path, **overrides):
    tok = train_tokenizer([open(socket.__file__).read(), open(json.__file__).read()], vocab_size=400)
    fields = dict(vocab_size=tok.get_vocab_size(), hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                  max_seq_len=256, eos_token_id=tok.token_to_id(EOS))  # fmt: skip
    fields.update(overrides)
    torch.manual_seed(0)
    model = R1kitForCausalLM(ModelConfig(**fields)).eval()
    out = tmp_path / "model"
    model.save_pretrained(out)
    tok.save(str(out / "tokenizer.json"))
    return model, out


def transformers_logits(path) -> torch.Tensor:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("qkv_bias,tied", [(False, False), (True, True)])
def test_written_gguf_reads_back_with_the_same_logits(tmp_path, outtype, qkv_bias, tied):
    model, folder = model_dir(tmp_path, qkv_bias=qkv_bias, tie_embeddings=tied)
    path = write_gguf(folder, tmp_path / f"model-{outtype}.gguf", outtype)
    with torch.no_grad():
        original = model(IDS)
        ours = load_gguf_model(path)(IDS)
    theirs = transformers_logits(path)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    scale = original.abs().max().item()
    assert (ours - original).abs().max().item() <= TOLERANCE[outtype] * scale, outtype


def test_r1kit_only_layers_and_bad_outtypes_are_refused(tmp_path):
    _, folder = model_dir(tmp_path, attention=["local", "hybrid"], ffn="topk")
    with pytest.raises(CheckpointError, match="r1kit-only layers.*only standard Llama/Qwen2"):
        write_gguf(folder, tmp_path / "x.gguf")
    with pytest.raises(CheckpointError, match="--outtype 'q4_k' is not supported"):
        write_gguf(folder, tmp_path / "x.gguf", "q4_k")
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".x.gguf*"))


def test_convert_cli_round_trip(tmp_path, capsys):
    model, folder = model_dir(tmp_path)
    gguf_file = tmp_path / "m.gguf"
    assert main(["convert", str(folder), "--to", "gguf", "--outtype", "f32", "--out", str(gguf_file)]) == 0
    assert main(["convert", str(gguf_file), "--out", str(tmp_path / "back")]) == 0
    assert main(["convert", str(gguf_file), "--out", str(tmp_path / "back")]) == 2  # exists: needs --force
    assert "--force" in capsys.readouterr().err
    from r1kit.checkpoints.load import load_model

    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "back")(IDS), model(IDS), atol=1e-5, rtol=1e-5)
    from r1kit.tokenizer import load_tokenizer

    text = "def f(x):\n    return x  # ünïcode"
    assert load_tokenizer(tmp_path / "back").encode(text).ids == load_tokenizer(folder).encode(text).ids
