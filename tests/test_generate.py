"""The sampler's filters (property tests), the reference decoding loop, and `r1kit init/generate`."""

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from r1kit.errors import ConfigError
from r1kit.infer.generate import generate
from r1kit.infer.sampling import SamplingParams, apply_repetition_penalty, filter_logits
from r1kit.model import R1kitForCausalLM

logit_rows = st.lists(st.floats(-20, 20, allow_nan=False), min_size=2, max_size=40).map(lambda xs: torch.tensor([xs]))


@settings(max_examples=200, deadline=None)
@given(logit_rows, st.integers(1, 50))
def test_top_k_keeps_the_k_largest(logits, k):
    kept = torch.isfinite(filter_logits(logits, top_k=k))[0]
    kth = logits[0].sort(descending=True).values[min(k, logits.shape[1]) - 1]
    assert kept.equal(logits[0] >= kth)


@settings(max_examples=200, deadline=None)
@given(logit_rows, st.floats(0.01, 1.0))
def test_top_p_keeps_the_smallest_prefix_reaching_p(logits, p):
    kept = torch.isfinite(filter_logits(logits, top_p=p))[0]
    probs = logits[0].softmax(-1)
    assert probs[kept].max() == probs.max()
    assert probs[kept].sum() >= p - 1e-5
    # dropping the least likely kept token would fall short of p (unless it ties with another)
    smallest = probs[kept].min()
    assert probs[kept].sum() - smallest < p + 1e-5 or (probs[kept] == smallest).sum() > 1


@settings(max_examples=200, deadline=None)
@given(logit_rows, st.floats(0.0, 1.0))
def test_min_p_drops_tokens_below_a_share_of_the_best(logits, min_p):
    kept = torch.isfinite(filter_logits(logits, min_p=min_p))[0]
    probs = logits[0].softmax(-1)
    assert kept.equal(probs >= min_p * probs.max())


def test_repetition_penalty_always_lowers_seen_tokens():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0.0), dict(max_tokens=0), dict(repetition_penalty=0)])
def test_bad_sampling_params(bad):
    with pytest.raises(ConfigError):
        SamplingParams(**bad)


@pytest.fixture
def model(tiny_config):
    return R1kitForCausalLM(tiny_config(attention=["local", "hybrid"], ffn="topk", eos_token_id=5)).eval()


def test_greedy_generation_equals_argmax_over_full_forwards(model):
    prompt = [3, 14, 15, 9, 2, 6]
    out = generate(model, prompt, SamplingParams(temperature=0, max_tokens=15), eos_ids=[])
    tokens = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(15):
            tokens = torch.cat((tokens, model(tokens, window=4)[:, -1:].argmax(-1)), dim=1)
    assert out == tokens[0, len(prompt) :].tolist()


def test_seeded_sampling_is_reproducible_and_stops_at_eos(model):
    params = SamplingParams(temperature=1.5, top_k=20, top_p=0.95, max_tokens=40, seed=11)
    a = generate(model, [1, 2, 3], params, eos_ids=[])
    assert a == generate(model, [1, 2, 3], params, eos_ids=[]) and len(a) == 40
    assert a != generate(model, [1, 2, 3], SamplingParams(temperature=1.5, max_tokens=40, seed=12), eos_ids=[])
    stopped = generate(model, [1, 2, 3], params, eos_ids=[a[4]])
    assert stopped == a[: a.index(a[4]) + 1]


def test_too_long_request_is_refused(model):
    with pytest.raises(ConfigError, match="exceeds the model's max_seq_len"):
        generate(model, [1] * 4000, SamplingParams(max_tokens=200))


def test_init_and_generate_through_the_cli(tmp_path, capsys):
    from r1kit.tokenizer import train_tokenizer

    text = [open(torch.__file__).read(), open(subprocess.__file__).read()]
    train_tokenizer(text, vocab_size=400).save(str(tmp_path / "tokenizer.json"))
    cfg = tmp_path / "m.yaml"
    cfg.write_text("model:\n  vocab_size: 1\n  hidden_size: 32\n  num_layers: 2\n  num_heads: 4\n  intermediate_size: 48\n  attention: hybrid\n  ffn: topk\n")
    run = lambda *a: subprocess.run([sys.executable, "-m", "r1kit.cli", *a], capture_output=True, text=True, timeout=120)  # noqa: E731
    r = run("init", "--config", str(cfg), "--out", str(tmp_path / "m"), "--tokenizer", str(tmp_path / "tokenizer.json"))
    assert r.returncode == 0, r.stderr
    gen = ["generate", "--model", str(tmp_path / "m"), "--prompt", "import os", "--max-new-tokens", "12", "--temperature", "0", "--show-ids"]
    first, second = run(*gen), run(*gen)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.startswith("import os")
    ids = eval(first.stdout.strip().splitlines()[-1].removeprefix("ids: "))
    assert 1 <= len(ids) <= 12 and all(0 <= i < 400 + 8 for i in ids)
    from r1kit.cli import main  # the refusals in-process: the runs above checked a fresh process

    assert main(["init", "--config", str(cfg), "--out", str(tmp_path / "m")]) == 2
    assert "already holds a model; pass --force" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "nope does not exist; give a model directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extreme",
    [dict(temperature=1e-300), dict(temperature=1e-4), dict(repetition_penalty=1e-300), dict(repetition_penalty=1e300), dict(top_p=1e-300), dict(min_p=1.0)],
)
def test_extreme_sampling_values_still_sample(extreme):
    """Found by fuzzing the server: overflowing logits must not reach torch.multinomial as inf/NaN."""
    from r1kit.infer.sampling import sample_next

    logits = torch.randn(3, 50)
    tokens = sample_next(logits, SamplingParams(**extreme), torch.tensor([[1, 2]] * 3), torch.Generator().manual_seed(0))
    assert tokens.shape == (3,) and ((0 <= tokens) & (tokens < 50)).all()
