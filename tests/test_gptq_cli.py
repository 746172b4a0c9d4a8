"""`r1kit quantize --eval`: the float and the quantized perplexity at the end, per-layer output errors
in the log and in quantize_report.json beside the checkpoint (end to end on a tiny model)."""

import json
import math
import re

import torch
from test_quant_cli import model_dir  # noqa: F401 (a module fixture: tiny model, tokenizer, calibration text)
from test_quant_helpers import one_thread  # noqa: F401 (an autouse fixture)

from r1kit.checkpoints import load_model
from r1kit.cli import main
from r1kit.evaluate import blocks_from


def test_eval_prints_both_perplexities_and_the_report_holds_each_layer(model_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "int4"
    args = ["quantize", "--model", str(model_dir / "fp"), "--out", str(out), "--calib", str(model_dir / "calib.txt"),
            "--nsamples", "8", "--seqlen", "32", "--group-size", "64", "--mse", "2.4",
            "--eval", str(model_dir / "calib.txt"), "--eval-seqlen", "32", "--eval-blocks", "4"]
    assert main(args) == 0
    captured = capsys.readouterr()
    found = re.search(r"perplexity on \S+ \(4 × 32 tokens\): float ([\d.]+), quantized ([\d.]+) \(([+-][\d.]+)%\)", captured.out)
    assert found, captured.out
    float_ppl, quantized_ppl = float(found[1]), float(found[2])
    assert re.search(r"layer 1: output error mean [\d.]+%, max [\d.]+% \(\w+\.\w+_proj\)", captured.err), captured.err
    report = json.loads((out / "quantize_report.json").read_text())
    assert report["quantization_config"]["meta"]["mse"] == 2.4
    assert len(report["layers"]) == 14 and all(0 < r["output_error"] < 1 for r in report["layers"].values())
    assert (round(report["eval"]["float_ppl"], 3), round(report["eval"]["quantized_ppl"], 3)) == (float_ppl, quantized_ppl)
    # the two figures are the float model's and the written checkpoint's perplexity on those blocks
    blocks = blocks_from(str(model_dir / "calib.txt"), model_dir / "fp", 32, 4)
    for path, printed in ((model_dir / "fp", float_ppl), (out, quantized_ppl)):
        model = load_model(path)
        with torch.no_grad():
            logits = model(torch.from_numpy(blocks[:, :-1]))
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), torch.from_numpy(blocks[:, 1:]).reshape(-1))
        assert abs(math.exp(float(loss)) - printed) <= 1e-3 * printed
