"""`r1kit pull`, `r1kit convert` and the one loader: known models, Hugging Face repos (hub or local
cache, never the network here), GGUF files in every verb, and the pulled real model served to the
official ``openai`` client."""

from __future__ import annotations

import json

import openai
import pytest
import torch

from r1kit.checkpoints.load import load_model, resolve_model
from r1kit.checkpoints.pull import cached_pull, pull
from r1kit.cli import main
from r1kit.config import ModelConfig
from r1kit.errors import CheckpointError
from r1kit.model.transformer import R1kitForCausalLM


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """A Hugging Face cache in tmp_path and no hub: what `pull` finds must come from that cache."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_unknown_names_and_unreachable_repos_are_clear_errors(tmp_path, offline_hub):
    with pytest.raises(CheckpointError, match="unknown model 'no-such-model'.*smollm2-135m-instruct"):
        pull("no-such-model", home=tmp_path)
    with pytest.raises(CheckpointError, match="Qwen/Qwen2.5-0.5B-Instruct could not be downloaded.*not in the local Hugging Face cache"):
        pull("qwen2.5-0.5b-instruct", home=tmp_path)
    with pytest.raises(CheckpointError, match="model nowhere/at-all not found.*r1kit pull"):
        resolve_model("nowhere/at-all")


def test_a_repo_in_the_local_hugging_face_cache_is_found_without_the_hub(tmp_path, offline_hub):
    snapshot = offline_hub / "models--someorg--tiny" / "snapshots" / "0123456789abcdef"
    R1kitForCausalLM(ModelConfig(vocab_size=50, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=48)).save_pretrained(snapshot)
    (offline_hub / "models--someorg--tiny" / "refs").mkdir()
    (offline_hub / "models--someorg--tiny" / "refs" / "main").write_text("0123456789abcdef")
    assert pull("someorg/tiny", home=tmp_path) == snapshot
    assert cached_pull("someorg/tiny") == snapshot
    assert load_model("someorg/tiny").config.hidden_size == 32  # the name works wherever a model is expected
    out = tmp_path / "copy"
    assert pull("someorg/tiny", out=out, home=tmp_path) == out and (out / "config.json").is_file()


def test_pull_list_names_the_known_models(capsys):
    assert main(["pull", "--list"]) == 0
    assert "smollm2-135m-instruct" in capsys.readouterr().out


@pytest.fixture(scope="module")
def pulled(smollm2_gguf):
    """The real model pulled into the machine's r1kit cache (converted once per machine)."""
    return pull("smollm2-135m-instruct")


@pytest.mark.slow
def test_pulled_and_converted_models_equal_the_gguf(pulled, smollm2_gguf, tmp_path):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert (pulled / name).is_file(), name
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253]])
    with torch.no_grad():
        want = load_model(smollm2_gguf)(ids)
        torch.testing.assert_close(load_model(pulled)(ids), want, atol=0, rtol=0)
    assert resolve_model("smollm2-135m-instruct") == pulled
    assert json.loads((pulled / "generation_config.json").read_text())["eos_token_id"] == 2


@pytest.mark.slow
def test_serve_on_the_pulled_model_answers_paris_in_content(pulled, tmp_path, monkeypatch):
    from test_serve import start_server

    monkeypatch.chdir(tmp_path)  # the server's log lands beside the model argument's parent: here
    proc, base = start_server("smollm2-135m-instruct", "--kv-cache-memory", str(64 << 20))
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(
            model="smollm2-135m-instruct", temperature=0, max_tokens=24,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
        )  # fmt: skip
        message = reply.choices[0].message
        assert "Paris" in (message.content or ""), message
        assert getattr(message, "reasoning_content", None) is None
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_a_gguf_path_works_in_the_verbs(smollm2_gguf, tmp_path, capsys):
    from pydoc_data.topics import topics

    text = tmp_path / "held.txt"
    text.write_text(topics["assignment"])
    assert main(["eval", "ppl", "--model", str(smollm2_gguf), "--data", str(text), "--seq-len", "128", "--max-blocks", "2", "--json"]) == 0
    assert 1 < json.loads(capsys.readouterr().out)["ppl"] < 100
    assert main(["generate", "--model", str(smollm2_gguf), "--prompt", "The capital of France is", "--max-new-tokens", "8", "--temperature", "0"]) == 0
    assert "Paris" in capsys.readouterr().out
