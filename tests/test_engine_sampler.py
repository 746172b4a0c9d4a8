"""The engine's sampling controls, each against a slow reference, and the text-side API (a model
directory with a tokenizer): stop strings, streaming text, logprobs, n > 1, the thinking budget."""

import subprocess

import pytest
import torch

from r1kit import LLM, SamplingParams
from r1kit.errors import ConfigError
from r1kit.infer.engine import EngineConfig, LLMEngine
from r1kit.infer.sampling import apply_logit_bias, apply_presence_frequency
from r1kit.model import R1kitForCausalLM


def test_presence_and_frequency_penalties_hit_the_right_tokens():
    logits = torch.randn(10)
    out_ids = [3, 3, 7, 3, 1]
    got = apply_presence_frequency(logits, torch.tensor(out_ids), 0.5, 0.25)
    want = logits.clone()
    for t in set(out_ids):
        want[t] -= 0.5 + 0.25 * out_ids.count(t)
    torch.testing.assert_close(got, want)


def test_logit_bias_adds_to_listed_tokens():
    logits = torch.zeros(2, 6)
    got = apply_logit_bias(logits, {1: 2.0, 4: -1.5})
    assert got[:, 1].tolist() == [2.0, 2.0] and got[:, 4].tolist() == [-1.5, -1.5] and got.sum() == 1.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from r1kit.config import ModelConfig
    from r1kit.tokenizer import train_tokenizer

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("m")
    tok = train_tokenizer([open(subprocess.__file__).read()], vocab_size=300)
    tok.save(str(path / "tokenizer.json"))
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=48, attention=["local", "global"], local_window=8, eos_token_id=1)
    R1kitForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, block_size=4, num_kv_blocks=256)


def test_text_prompts_and_all_prompt_forms_agree(llm):
    tok = llm.get_tokenizer()
    ids = tok.encode("def main(args):").ids
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    outs = llm.generate(["def main(args):", ids, {"prompt_token_ids": ids}], params)
    assert outs[0].prompt_token_ids == ids and outs[0].prompt == "def main(args):"
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids == outs[2].outputs[0].token_ids
    assert outs[0].outputs[0].text == tok.decode(outs[0].outputs[0].token_ids)
    single = llm.generate("def main(args):", params)
    assert len(single) == 1 and single[0].outputs[0].text == outs[0].outputs[0].text


def test_stop_strings_cut_the_text_and_streaming_holds_them_back(llm):
    prompt = "import os\n"
    base = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].outputs[0]
    stop = base.text[6:9]
    assert stop and stop in base.text
    cut = base.text[: base.text.index(stop)]
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop, "never here"]))[0].outputs[0]
    assert (out.text, out.finish_reason, out.stop_reason) == (cut, "stop", stop)
    kept = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=stop, include_stop_str_in_output=True))
    assert kept[0].outputs[0].text == cut + stop
    # streaming: the deltas add up to the final text and never show the stop string
    engine = llm.llm_engine
    engine.add_request("s", prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]))
    streamed = ""
    while engine.has_unfinished_requests():
        for o in engine.step():
            streamed += o.outputs[0].delta_text
            assert stop not in streamed
    assert streamed == cut


def test_min_tokens_masks_eos_and_logit_bias_steers(llm):
    eos = 1
    params = SamplingParams(temperature=0, max_tokens=20, min_tokens=6, logit_bias={eos: 100.0})
    out = llm.generate([[5, 6, 7]], params)[0].outputs[0]
    assert out.token_ids == out.token_ids[:6] + [eos] and len(out.token_ids) == 7 and eos not in out.token_ids[:6]
    assert out.finish_reason == "stop" and out.text == llm.get_tokenizer().decode(out.token_ids[:6])


def test_logprobs_match_the_model_distribution(llm):
    prompt = [10, 20, 30, 40, 50]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, logprobs=3, prompt_logprobs=2))[0]
    model = llm.llm_engine.model
    full = prompt + out.outputs[0].token_ids
    with torch.no_grad():
        ref = model(torch.tensor([full]), window=8)[0].log_softmax(-1)
    for i, entry in enumerate(out.outputs[0].logprobs):
        token = out.outputs[0].token_ids[i]
        row = ref[len(prompt) - 1 + i]
        assert entry[token].rank == 1 and abs(entry[token].logprob - float(row[token])) < 1e-4
        assert len(entry) >= 3 and sorted(entry.values(), key=lambda lp: lp.rank)[0].rank == 1
        top3 = row.topk(3).indices.tolist()
        assert set(top3) <= set(entry)
    assert out.outputs[0].cumulative_logprob == pytest.approx(sum(e[t].logprob for e, t in zip(out.outputs[0].logprobs, out.outputs[0].token_ids)))
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for i in range(1, len(prompt)):
        assert abs(out.prompt_logprobs[i][prompt[i]].logprob - float(ref[i - 1, prompt[i]])) < 1e-4


def test_n_completions_with_a_seed_are_distinct_and_reproducible(llm):
    params = SamplingParams(temperature=1.0, max_tokens=12, n=3, seed=5, ignore_eos=True)
    a = llm.generate([[4, 5, 6]], params)[0]
    b = llm.generate([[4, 5, 6]], params)[0]
    ids = [o.token_ids for o in a.outputs]
    assert [o.index for o in a.outputs] == [0, 1, 2] and ids == [o.token_ids for o in b.outputs]
    assert len({tuple(i) for i in ids}) == 3
    # the other completions reuse the first one's prompt blocks: each computes only the last token
    engine = llm.llm_engine
    computed, run = [], engine.runner.run
    engine.runner.run = lambda items: computed.append(sum(n for s, n in items if s.num_computed_tokens < 21)) or run(items)
    try:
        shared = llm.generate([list(range(10, 31))], params.replace(seed=6))[0]
    finally:
        engine.runner.run = run
    assert sum(computed) == 21 + 1 + 1 and len({tuple(o.token_ids) for o in shared.outputs}) == 3
    # the first child draws as an n=1 request with the same seed
    assert llm.generate([[4, 5, 6]], params.replace(n=1))[0].outputs[0].token_ids == ids[0]


def test_thinking_budget_forces_the_end_of_reasoning(llm):
    tok = llm.get_tokenizer()
    start, end = tok.token_to_id("<think>"), tok.token_to_id("</think>")
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, thinking_budget=4, logit_bias={end: -100.0}, skip_special_tokens=True)
    out = llm.generate([[7, 8, start]], params)[0].outputs[0]
    assert out.token_ids[4] == end and end not in out.token_ids[:4]
    assert "</think>" in out.text  # kept in the text for the reasoning parser
    free = llm.generate([[7, 8, 9]], params)[0].outputs[0]  # no open <think>: no forcing
    assert end not in free.token_ids


def test_penalties_change_greedy_output_and_need_a_tokenizer_for_stop_strings(llm, tiny_config):
    prompt = [3, 3, 3, 3]
    plain = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0].outputs[0].token_ids
    pen = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, frequency_penalty=2.0, presence_penalty=2.0))
    pen_ids = pen[0].outputs[0].token_ids
    assert max(pen_ids.count(t) for t in set(pen_ids)) <= max(plain.count(t) for t in set(plain))
    engine = LLMEngine(R1kitForCausalLM(tiny_config()), config=EngineConfig(num_kv_blocks=8))
    with pytest.raises(ConfigError, match="stop strings need a tokenizer") as info:
        engine.add_request("x", [1, 2], SamplingParams(stop=["a"]))
    assert info.value.param == "stop"
    with pytest.raises(ConfigError, match="thinking_budget needs") as info:
        engine.add_request("x", [1, 2], SamplingParams(thinking_budget=3))
    assert info.value.param == "thinking_budget"


@pytest.mark.parametrize(
    "bad,param",
    [(dict(n=0), "n"), (dict(min_tokens=5, max_tokens=2), "min_tokens"), (dict(presence_penalty=3.0), "presence_penalty"), (dict(stop=[""]), "stop"),
     (dict(logprobs=-1), "logprobs"), (dict(logprobs=21), "logprobs"), (dict(logit_bias={3: float("inf")}), "logit_bias"), (dict(logit_bias={3: 101}), "logit_bias"),
     (dict(seed=-1), "seed"), (dict(temperature=float("nan")), "temperature"), (dict(top_k=2.5), "top_k"), (dict(max_tokens=True), "max_tokens")],
)  # fmt: skip
def test_bad_engine_sampling_params(bad, param):
    with pytest.raises(ConfigError) as info:
        SamplingParams(**bad)
    assert info.value.param == param and str(info.value).startswith(param)


def test_generate_cli_runs_on_the_engine_and_matches_the_reference(model_dir, capsys):
    from r1kit.cli import main

    args = ["generate", "--model", str(model_dir), "--prompt", "import sys", "--temperature", "0", "--max-new-tokens", "8",
            "--ignore-eos", "--show-ids", "--repetition-penalty", "1.0"]
    assert main(args) == 0
    engine_out = capsys.readouterr().out
    assert main(args + ["--reference"]) == 0
    reference_out = capsys.readouterr().out
    assert engine_out.splitlines()[-1] == reference_out.splitlines()[-1] and engine_out.startswith("import sys")


def test_bench_cli_on_a_random_model(tmp_path, capsys):
    from r1kit.cli import main

    cfg = tmp_path / "m.yaml"
    cfg.write_text("model:\n  vocab_size: 97\n  hidden_size: 32\n  num_layers: 2\n  num_heads: 4\n  intermediate_size: 48\n  attention: [local, hybrid]\n  local_window: 8\n")
    args = ["bench", "--config", str(cfg), "--batch-sizes", "1,3", "--prompt-len", "8", "--new-tokens", "4", "--prefix-len", "64", "--reference"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "engine tok/s" in out and "batch-1 bandwidth" in out and "prefix cached (48 tokens)" in out


def test_shared_sampling_draws_from_the_filtered_distribution():
    """Unseeded rows are sampled together among the kept tokens only: same distribution as the slow path."""
    from collections import Counter

    from r1kit.infer.sampler import SpecialIds, sample
    from r1kit.infer.sequence import Sequence

    torch.manual_seed(0)
    params = SamplingParams(temperature=0.7, top_k=3, top_p=0.99, max_tokens=5)
    row = torch.tensor([2.0, 1.0, 0.5, 0.4, -3.0])
    seqs = [Sequence("r", i, [0], params, 4) for i in range(8)]
    draws = Counter()
    for _ in range(500):
        draws.update(t for t, _ in sample(row.expand(8, -1), seqs, SpecialIds(frozenset())))
    want = (row[:3] / 0.7).softmax(-1)
    assert set(draws) <= {0, 1, 2}
    for token in range(3):
        assert abs(draws[token] / 4000 - float(want[token])) < 0.03
