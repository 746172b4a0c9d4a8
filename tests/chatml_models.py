"""Tiny model directories shaped like real Hugging Face checkpoints, built in the tests (no downloads).

``smol_dir``: SmolLM2-135M-Instruct's shape (a ChatML template, no ``<think>``) plus what other real
checkpoints bring: StarCoder's FIM tokens (SmolLM2's own vocabulary has none), a Llama-style
``TemplateProcessing`` post-processor that adds BOS, and a ``generation_config.json`` with sampling
defaults and a second EOS id (Qwen2.5-Instruct's and Llama-3-Instruct's kind).
``chatml_think_dir``: r1kit's own tokenizer (it has ``<think>``/``</think>``) under a ChatML-like
template that never opens ``<think>`` (Qwen2.5-Instruct's case).
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from r1kit.config import ModelConfig
from r1kit.model import R1kitForCausalLM

SMOL_SPECIALS = ["<|endoftext|>", "<s>", "<|im_start|>", "<|im_end|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"]
CHATML = (
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [Path(m.__file__).read_text() for m in (json, socket, subprocess)]


def bpe_tokenizer(specials: list[str], vocab_size: int = 400, bos: str | None = None) -> Tokenizer:
    """A byte-level BPE with ``specials`` as its first ids; with ``bos``, a post-processor adding it (as Llama's)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def save_model(out: Path, tok: Tokenizer, eos: int, tokenizer_config: dict | None = None, generation_config: dict | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    if tokenizer_config is not None:
        (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    if generation_config is not None:
        (out / "generation_config.json").write_text(json.dumps(generation_config))
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                      max_seq_len=512, eos_token_id=eos)  # fmt: skip
    torch.manual_seed(0)
    R1kitForCausalLM(cfg).save_pretrained(out)
    return out


def smol_dir(out: Path, generation_config: dict | None = None) -> Path:
    tok = bpe_tokenizer(SMOL_SPECIALS, bos="<s>")
    ids = {t: tok.token_to_id(t) for t in SMOL_SPECIALS}
    generation = generation_config if generation_config is not None else {
        "bos_token_id": ids["<s>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "temperature": 0.0, "top_k": 7,
        "max_new_tokens": 5, "do_sample": False, "transformers_version": "4.46.0",
    }  # fmt: skip
    config = {"bos_token": "<s>", "eos_token": "<|im_end|>", "chat_template": CHATML}
    return save_model(out, tok, ids["<|im_end|>"], config, generation)


def chatml_think_dir(out: Path) -> Path:
    from r1kit.tokenizer import EOS, train_tokenizer

    tok = train_tokenizer(CORPUS, vocab_size=400)
    template = "{% for message in messages %}<|user|>{{ message['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    return save_model(out, tok, tok.token_to_id(EOS), {"bos_token": "<|bos|>", "eos_token": EOS, "chat_template": template})
