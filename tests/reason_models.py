"""A tiny model directory for reasoning-training tests: a character-level tokenizer over digits and a
few letters, a chat template that marks answers with '=', and a 2-layer model. Sampling a given
digit from it at random is a 1-in-17 event, so GRPO has something to learn in a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from r1kit.config import ModelConfig
from r1kit.model import R1kitForCausalLM

CHARS = list("0123456789pq=+ \n")
TEMPLATE = "{% for m in messages %}{% if m['role'] == 'assistant' %}={% endif %}{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}={% endif %}"


def tiny_reasoning_dir(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=len(vocab), hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48, max_seq_len=64)
    R1kitForCausalLM(config).save_pretrained(out)
    return out


def seven_problems(out: Path, n: int = 12) -> Path:
    """A JSONL task whose every answer is 7 (the last 3 problems are held out)."""
    file = out / "sevens.jsonl"
    file.write_text("".join(json.dumps({"prompt": f"p{i}q", "answer": "7"}) + "\n" for i in range(n)))
    return file
