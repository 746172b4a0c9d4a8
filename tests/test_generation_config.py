"""generation_config.json: parsing and validation, the vLLM rules, and its use by LLM and `r1kit generate`."""

import argparse
import json
import subprocess
import sys

import pytest
from chatml_models import smol_dir

from r1kit.errors import CheckpointError, ConfigError
from r1kit.generation_config import GenerationConfig
from r1kit.cli.generate import RECIPE, sampling_params
from r1kit.infer.sampling import SamplingParams

QWEN = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05,
        "bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643, "transformers_version": "4.37.0"}  # fmt: skip


def test_the_fields_a_file_sets_become_sampling_defaults_under_vllms_names():
    config = GenerationConfig.from_dict({**QWEN, "max_new_tokens": 64, "min_p": 0.05})
    assert config.sampling_defaults() == {"temperature": 0.7, "top_k": 20, "top_p": 0.8, "min_p": 0.05, "repetition_penalty": 1.05, "max_tokens": 64}
    assert config.eos_token_id == (151645, 151643)
    assert SamplingParams(**config.sampling_defaults()).max_tokens == 64
    # a file that sets only special ids (SmolLM2's) changes no sampling default; an int eos is one id
    only_ids = GenerationConfig.from_dict({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2})
    assert only_ids.sampling_defaults() == {} and only_ids.eos_token_id == (2,)


@pytest.mark.parametrize(
    "field,value",
    [("temperature", -0.1), ("temperature", "0.7"), ("top_p", 0), ("top_p", 1.5), ("top_k", 2.5), ("top_k", -2), ("min_p", 2),
     ("repetition_penalty", 0), ("max_new_tokens", 0), ("max_new_tokens", True), ("eos_token_id", "2"), ("eos_token_id", [1, -1]),
     ("eos_token_id", [True]), ("do_sample", "yes")],
)  # fmt: skip
def test_a_bad_field_is_an_error_naming_the_file_and_the_field(tmp_path, field, value):
    path = tmp_path / "generation_config.json"
    path.write_text(json.dumps({"temperature": 0.6, field: value}))
    with pytest.raises(ConfigError) as info:
        GenerationConfig.from_file(path)
    assert str(path) in str(info.value) and f"{field}={value!r}" in str(info.value) and "--generation-config none" in str(info.value)


def test_a_broken_file_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "generation_config.json"
    path.write_text("{not json")
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        GenerationConfig.for_model(tmp_path)
    path.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="must hold a JSON object"):
        GenerationConfig.for_model(tmp_path)


def test_modes_auto_and_none(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(QWEN))
    assert GenerationConfig.for_model(tmp_path, "auto").temperature == 0.7
    none = GenerationConfig.for_model(tmp_path, "none")
    assert none.sampling_defaults() == {} and none.eos_token_id == (151645, 151643)  # the EOS ids stay (vLLM's rule)
    assert GenerationConfig.for_model(tmp_path / "elsewhere") == GenerationConfig()  # no file: r1kit's defaults
    with pytest.raises(ConfigError, match=r"generation_config='vllm' must be one of \['auto', 'none'\]"):
        GenerationConfig.for_model(tmp_path, "vllm")


def test_do_sample_false_still_samples_like_vllm_and_says_so(tmp_path, caplog):
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.6}))
    config = GenerationConfig.for_model(tmp_path)
    assert config.sampling_defaults() == {"temperature": 0.6}
    assert "do_sample=false" in caplog.text and "temperature=0" in caplog.text


def test_extra_eos_ids_become_stop_ids_unless_ignore_eos():
    config = GenerationConfig.from_dict({"eos_token_id": [7, 2, 9]})
    extra = config.extra_stop_ids(model_eos={2}, vocab_size=10)
    assert extra == (7, 9)
    assert SamplingParams(stop_token_ids=(9, 3)).with_eos_ids(extra).stop_token_ids == (9, 3, 7)
    assert SamplingParams(ignore_eos=True).with_eos_ids(extra).stop_token_ids == ()
    with pytest.raises(CheckpointError, match=r"eos_token_id \[9\] is outside the model's vocabulary \[0, 8\)"):
        config.extra_stop_ids(model_eos={2}, vocab_size=8)


# -- LLM and `r1kit generate` on a model directory that has the file -----------------------------------
@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    return smol_dir(tmp_path_factory.mktemp("gen") / "smol")


def test_llm_defaults_come_from_the_file_and_its_eos_ids_stop(smol):
    from r1kit.infer.llm import LLM

    llm = LLM(smol, kv_cache_memory=4 << 20)
    assert llm.get_default_sampling_params() == SamplingParams(temperature=0.0, top_k=7, max_tokens=5)
    assert LLM(smol, generation_config="none", kv_cache_memory=4 << 20).get_default_sampling_params() == SamplingParams()
    tok = llm.get_tokenizer()
    out = llm.generate("def f(x):", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0].outputs[0]
    assert llm.generate("def f(x):")[0].outputs[0].token_ids == out.token_ids  # the file's defaults: greedy, 5 tokens
    # <|endoftext|> is an EOS only in generation_config.json (config.json says <|im_end|>): it still ends the output
    endoftext = tok.token_to_id("<|endoftext|>")
    forced = SamplingParams(temperature=0, max_tokens=5, logit_bias={endoftext: 100})
    for mode in ("auto", "none"):
        stopped = LLM(smol, generation_config=mode, kv_cache_memory=4 << 20).generate("x", forced)[0].outputs[0]
        assert stopped.token_ids == [endoftext] and stopped.finish_reason == "stop", mode
    kept = llm.generate("x", forced.replace(ignore_eos=True))[0].outputs[0]
    assert kept.token_ids == [endoftext] * 5 and kept.finish_reason == "length"


def test_generate_flags_win_over_the_file_which_wins_over_the_recipe():
    args = argparse.Namespace(temperature=None, top_k=3, top_p=None, min_p=None, repetition_penalty=None, max_new_tokens=None, ignore_eos=False, seed=1)
    params = sampling_params(args, GenerationConfig(temperature=0.6, top_k=20, top_p=0.95))
    assert (params.temperature, params.top_k, params.top_p) == (0.6, 3, 0.95)
    assert (params.repetition_penalty, params.max_tokens, params.seed) == (RECIPE["repetition_penalty"], RECIPE["max_tokens"], 1)
    assert sampling_params(args, GenerationConfig()).temperature == RECIPE["temperature"]


def test_generate_cli_uses_the_file_unless_told_none(smol):
    run = lambda *a: subprocess.run([sys.executable, "-m", "r1kit.cli", "generate", "--model", str(smol), "--prompt", "import os", "--show-ids", "--ignore-eos", *a],
                                    capture_output=True, text=True, timeout=120)  # fmt: skip
    auto, none = run(), run("--generation-config", "none", "--temperature", "0")
    assert auto.returncode == 0 and none.returncode == 0, auto.stderr + none.stderr
    ids = lambda r: eval(r.stdout.strip().splitlines()[-1].removeprefix("ids: "))  # noqa: E731
    assert len(ids(auto)) == 5  # max_new_tokens from the file (greedy, so the same as the line below's start)
    assert len(ids(none)) == RECIPE["max_tokens"] and ids(none)[:5] == ids(auto)
