"""Bad configs and bad checkpoints fail with one clear message naming the field or file."""

import json

import pytest
import torch

from r1kit import LLM
from r1kit.cli import main
from r1kit.config import ModelConfig
from r1kit.errors import CheckpointError, ConfigError
from r1kit.model import R1kitForCausalLM
from r1kit.checkpoints import load_model

BASE = dict(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48)


def test_unknown_field_is_named_with_a_suggestion(tmp_path):
    f = tmp_path / "m.yaml"
    f.write_text("model:\n  vocab_size: 10\n  hidden_size: 32\n  num_layers: 2\n  num_heads: 4\n  intermediate_size: 8\n  num_head: 3\n")
    with pytest.raises(ConfigError, match=r"unknown field\(s\) 'num_head' \(did you mean 'num_heads'\?\)"):
        ModelConfig.from_yaml(f)


@pytest.mark.parametrize(
    "override,match",
    [
        (dict(num_heads=5), "num_heads=5 does not divide hidden_size=32"),
        (dict(num_kv_heads=3), "num_kv_heads=3 must divide num_heads=4"),
        (dict(attention="sliding"), "attention='sliding' is not one of"),
        (dict(attention=["local", "global", "hybrid"]), "does not divide num_layers=2"),
        (dict(ffn="topk", topk_sparsity=1.0), "topk_sparsity=1.0 must be in"),
        (dict(local_window=8192), "local_window=8192 must be between 1 and max_local_window=4096"),
        (dict(vocab_size=0), "vocab_size=0 must be a positive integer"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "needs original_max_position_embeddings"),
        (dict(hybrid_gate_threshold=1.5), "hybrid_gate_threshold=1.5"),
    ],
)
def test_invalid_values(override, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_dict({**BASE, **override})


def test_missing_required_field():
    with pytest.raises(ConfigError, match="missing required field\\(s\\) intermediate_size"):
        ModelConfig.from_dict({k: v for k, v in BASE.items() if k != "intermediate_size"})


def test_yaml_patterns_cycle_over_layers(tmp_path):
    f = tmp_path / "m.yaml"
    f.write_text("vocab_size: 10\nhidden_size: 32\nnum_layers: 4\nnum_heads: 4\nintermediate_size: 8\nattention: [local, hybrid]\n")
    assert ModelConfig.from_yaml(f).attention == ("local", "hybrid", "local", "hybrid")


@pytest.fixture
def saved(tmp_path):
    R1kitForCausalLM(ModelConfig(**BASE)).save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_missing_weights_file(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        load_model(saved)


def test_truncated_weights_file(saved):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors cannot be read .*truncated"):
        load_model(saved)


def test_missing_shard_listed_in_index(saved):
    model = load_model(saved)
    model.save_pretrained(saved, max_shard_bytes=5000)
    shard = sorted(saved.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name} is listed in the index but missing"):
        load_model(saved)


def test_unsupported_architecture(saved):
    raw = json.loads((saved / "config.json").read_text())
    raw.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (saved / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="model_type='gpt2'.*not supported"):
        load_model(saved)


def test_weights_that_do_not_match_the_config(saved):
    raw = json.loads((saved / "config.json").read_text())
    raw["num_hidden_layers"] = 3
    (saved / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="missing \\['model.layers.2"):
        load_model(saved)
    raw["num_hidden_layers"] = 2
    raw["intermediate_size"] = 64
    (saved / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="has shape .* config.json implies"):
        load_model(saved)


def test_no_half_written_files_after_save(saved):
    assert not list(saved.glob(".*tmp"))
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("device,match", [("cdua", "'cdua' is not a device torch knows"), ("cuda:64", "sees no CUDA GPU|only [0-9]+ GPU")])
def test_a_device_that_is_not_there_is_named(saved, device, match, capsys):
    with pytest.raises(ConfigError, match=match):
        load_model(saved, device=device)
    with pytest.raises(ConfigError, match=match):
        LLM(R1kitForCausalLM(ModelConfig(**BASE)), device=device)
    assert main(["bench", "--model", str(saved), "--device", device]) == 2
    err = capsys.readouterr().err
    assert err.startswith("r1kit bench: error: device=") and ("not a device" in err or "GPU" in err)


def test_llm_moves_a_model_object_only_when_asked():
    model = R1kitForCausalLM(ModelConfig(**BASE))
    assert LLM(model, num_kv_blocks=8).llm_engine.model.device.type == "cpu"
    assert LLM(model, device="cpu", dtype="bfloat16", num_kv_blocks=8).llm_engine.model.dtype == torch.bfloat16
