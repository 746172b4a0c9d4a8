"""Parity with Hugging Face transformers on the same weights, both directions."""

import json

import pytest
import torch
from devices import DEVICES
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from r1kit.model import R1kitForCausalLM
from r1kit.checkpoints import load_model

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=256)

CASES = {
    "llama-gqa-untied": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=2, rope_theta=50000.0, tie_word_embeddings=False)),
    "llama-mha-tied": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama3-rope-scaling": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(
            num_key_value_heads=2,
            rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        ),
    ),
    "qwen2-bias-gqa-tied": (Qwen2Config, Qwen2ForCausalLM, dict(num_key_value_heads=1, rope_theta=1000000.0, tie_word_embeddings=True)),
    "qwen2-bias-untied-linear-rope": (
        Qwen2Config,
        Qwen2ForCausalLM,
        dict(num_key_value_heads=2, tie_word_embeddings=False, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    ),
}


def make_hf(case, tmp_path):
    cfg_cls, model_cls, extra = CASES[case]
    torch.manual_seed(0)
    hf = model_cls(cfg_cls(**TINY, **extra)).eval()
    # random init leaves biases at zero; make them matter
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path / "hf")
    return hf


def greedy(model_call, prompt, steps):
    tokens = prompt.clone()
    for _ in range(steps):
        nxt = model_call(tokens)[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat((tokens, nxt), dim=1)
    return tokens[:, prompt.shape[1] :]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_greedy_match_transformers(case, device, tmp_path):
    hf = make_hf(case, tmp_path).to(device)
    ours = load_model(tmp_path / "hf", dtype=torch.float32, device=device)
    tokens = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        prompt = tokens[:1, :9]
        assert torch.equal(greedy(lambda t: ours(t), prompt, 12), greedy(lambda t: hf(t).logits, prompt, 12))


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_r1kit_saves_transformers_loads(case, tmp_path):
    make_hf(case, tmp_path)
    ours = load_model(tmp_path / "hf", dtype=torch.float32)
    ours.save_pretrained(tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["architectures"] == [CASES[case][1].__name__]
    _, model_cls, _ = CASES[case]
    back = model_cls.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    tokens = torch.randint(0, 97, (1, 33), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), back(tokens).logits, atol=1e-4, rtol=1e-4)


def test_sharded_checkpoint_round_trip(tmp_path):
    make_hf("qwen2-bias-gqa-tied", tmp_path)
    ours = load_model(tmp_path / "hf", dtype=torch.float32)
    ours.save_pretrained(tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    again = load_model(tmp_path / "sharded", dtype=torch.float32)
    tokens = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(again(tokens), ours(tokens))
    hf_again = Qwen2ForCausalLM.from_pretrained(tmp_path / "sharded", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_again(tokens).logits, ours(tokens), atol=1e-4, rtol=1e-4)


def test_qwen2_sliding_window_layers_become_local(tmp_path):
    cfg = Qwen2Config(**TINY, num_key_value_heads=2, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf", dtype=torch.float32)
    assert ours.config.attention == tuple("local" if t == "sliding_attention" else "global" for t in cfg.layer_types)
    assert "local" in ours.config.attention
    tokens = torch.randint(0, 97, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)


def test_r1kit_model_with_seed_features_round_trips(tmp_path):
    from r1kit.config import ModelConfig

    cfg = ModelConfig(
        vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
        attention=["local", "hybrid"], ffn="topk", norm="layernorm", activation="gelu", local_window=8,
    )  # fmt: skip
    model = R1kitForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "m")
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    assert raw["architectures"] == ["R1kitForCausalLM"] and raw["r1kit"]["attention"] == ["local", "hybrid"]
    again = load_model(tmp_path / "m")
    assert again.config == cfg
    tokens = torch.randint(0, 50, (1, 25))
    with torch.no_grad():
        torch.testing.assert_close(again(tokens), model(tokens))
