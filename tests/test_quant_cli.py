"""`r1kit quantize` end to end on a tiny model: text and shard calibration, RTN, errors."""

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from test_quant_helpers import one_thread, tiny_config  # noqa: F401 (one_thread: an autouse fixture)

from r1kit.cli import main
from r1kit.data.records import write_json
from r1kit.data.shards import FORMAT, INDEX, ShardWriter, dtype_for
from r1kit.tokenizer import train_tokenizer
from r1kit.infer.generate import generate
from r1kit.infer.sampling import SamplingParams
from r1kit.checkpoints import load_model
from r1kit.model.transformer import R1kitForCausalLM
from r1kit.quant import QuantLinear


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant_cli")
    text = Path(textwrap.__file__).read_text(encoding="utf-8")
    tok = train_tokenizer([text], vocab_size=320)
    torch.manual_seed(0)
    model = R1kitForCausalLM(tiny_config(vocab_size=tok.get_vocab_size()))
    model.save_pretrained(root / "fp")
    tok.save(str(root / "fp" / "tokenizer.json"))
    (root / "calib.txt").write_text(text, encoding="utf-8")
    ids = np.asarray(tok.encode(text).ids, dtype=dtype_for(tok.get_vocab_size()))
    writer = ShardWriter(root / "shards", "train", 1000, ids.dtype)
    (root / "shards").mkdir()
    writer.add("textwrap", ids)
    write_json(root / "shards" / INDEX, {"format": FORMAT, "dtype": ids.dtype.name, "vocab_size": tok.get_vocab_size(),
                                          "splits": {"train": writer.close()}})
    return root


@pytest.mark.parametrize("calib,extra", [("calib.txt", []), ("shards", ["--desc-act", "true", "--sym", "false", "--save-dtype", "bfloat16"])])
def test_quantize_cli_end_to_end(model_dir, tmp_path, capsys, calib, extra):
    out = tmp_path / "int4"
    code = main(["quantize", "--model", str(model_dir / "fp"), "--out", str(out), "--calib", str(model_dir / calib),
                 "--nsamples", "8", "--seqlen", "32", "--group-size", "64", *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "gptq layers" in captured.err and "100%" in captured.err  # the per-layer progress bar
    assert "14 linears quantized" in captured.out
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["desc_act"] == ("true" in extra) and qc["sym"] == ("false" not in extra) and qc["group_size"] == 64
    assert (out / "tokenizer.json").is_file() and (out / "quantize_config.json").is_file()
    model = load_model(out)
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
    assert model.dtype == (torch.bfloat16 if "bfloat16" in extra else torch.float32)
    assert len(generate(model, [1, 2, 3], SamplingParams(temperature=0, max_tokens=8))) == 8
    assert main(["generate", "--model", str(out), "--prompt", "def wrap(", "--max-new-tokens", "4", "--seed", "0"]) == 0


def test_rtn_needs_no_calibration_and_errors_are_clear(model_dir, tmp_path, capsys):
    out = tmp_path / "rtn"
    assert main(["quantize", "--model", str(model_dir / "fp"), "--out", str(out), "--method", "rtn", "--group-size", "32", "--no-progress"]) == 0
    assert json.loads((out / "quantize_config.json").read_text())["meta"]["method"] == "rtn"
    capsys.readouterr()
    assert main(["quantize", "--model", str(model_dir / "fp"), "--out", str(out), "--method", "rtn"]) == 2
    assert "already holds a model; pass --force" in capsys.readouterr().err
    assert main(["quantize", "--model", str(model_dir / "fp"), "--out", str(tmp_path / "x")]) == 2
    assert "--method gptq needs --calib" in capsys.readouterr().err
    assert main(["quantize", "--model", str(model_dir / "fp"), "--out", str(tmp_path / "x"), "--method", "rtn", "--group-size", "0"]) == 2
    assert "group_size=0 must be positive, or -1" in capsys.readouterr().err
    assert main(["quantize", "--model", str(out), "--out", str(tmp_path / "y"), "--method", "rtn"]) == 2
    assert "already quantized" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quantize", "--model", "m", "--out", "o", "--desc-act", "maybe"])
