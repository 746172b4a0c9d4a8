"""Claim §3.3: GPTQ 4-bit keeps 99.2% of the accuracy at 12.5% of the original size.

On the real pulled model (SmolLM2-135M-Instruct by default): the float model, GPTQ and RTN (4-bit,
group 128, desc_act off, the guide's settings) are each measured by perplexity and next-token
accuracy on held-out text (stdlib packages other than the calibration ones). The quantized models
are the checkpoints written to disk and loaded back, so what is measured is what ships. Sizes are
the checkpoint's safetensors bytes against the float16 and float32 weights, and, separately, the
quantized linears' own bytes against theirs in float32 (the guide's 4/32). Quantization goes
through :func:`r1kit.quant.quantizer.quantize_model` only, so improvements to it flow in.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from r1kit.claims import corpus, training
from r1kit.claims.results import DOES_NOT_HOLD, HOLDS, Claim, Verdict, ratio_text
from r1kit.claims.scale import Scale
from r1kit.config import write_text_atomic

NAME = "gptq"
MODEL = "smollm2-135m-instruct"
GROUP_SIZE = 128  # the guide's §3.3 settings
CODES = (".qweight", ".qzeros", ".scales", ".g_idx")
CLAIMS = (Claim("gptq_4bit", "3.3", "GPTQ 4-bit quantization (group 128, desc_act off): accuracy kept and size", "99.2% of accuracy at 12.5% of the size"),)


def checkpoint_sizes(folder: Path) -> dict[str, int]:
    """Bytes of the checkpoint's safetensors, of its quantized linears' tensors, and the float32 bytes those linears replace."""
    from safetensors import safe_open

    total = quantized = replaced = 0
    for file in sorted(folder.glob("*.safetensors")):
        total += file.stat().st_size
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                tensor = f.get_slice(key)
                shape, dtype = tensor.get_shape(), tensor.get_dtype()
                count = 1
                for dim in shape:
                    count *= dim
                if key.endswith(CODES):
                    quantized += count * {"I32": 4, "F16": 2, "BF16": 2, "F32": 4}[dtype]
                if key.endswith(".qweight"):
                    replaced += 4 * (shape[0] * 8) * shape[1]  # [in/8, out] int32 words of 8 codes
    return {"checkpoint": total, "quantized_linears": quantized, "linears_fp32": replaced}


def quantize(float_model, model_dir: Path, target: Path, method: str, calibration: torch.Tensor | None) -> Path:
    """Quantize a copy of ``float_model`` with ``method`` and write the GPTQ checkpoint (float tensors in float16) to ``target``."""
    from r1kit.quant.checkpoint import save_quantized
    from r1kit.quant.config import QuantConfig
    from r1kit.quant.quantizer import quantize_model

    if (target / "config.json").is_file():
        return target
    config = QuantConfig(bits=4, group_size=GROUP_SIZE, desc_act=False, method=method)
    model = copy.deepcopy(float_model)  # quantize_model works in place; the float model serves both methods
    results = quantize_model(model, config, calibration if method == "gptq" else None)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted run
    save_quantized(model, tmp, config, results, dtype=torch.float16)
    if (model_dir / "tokenizer.json").is_file():
        shutil.copyfile(model_dir / "tokenizer.json", tmp / "tokenizer.json")
    tmp.rename(target)
    return target


def run(out: Path, scale: Scale, device: torch.device, log: Callable[[str], None], model: str = MODEL) -> dict[str, Any]:
    """Quantize the real model with GPTQ and RTN and measure all three; returns the experiment's result."""
    from r1kit.checkpoints import load_model
    from r1kit.checkpoints.load import resolve_model
    from r1kit.checkpoints.pull import KNOWN_MODELS, pull
    from r1kit.evaluate import blocks_from
    from r1kit.quant.calibration import load_calibration

    work = Path(out) / "work" / NAME
    model_dir = pull(model) if model in KNOWN_MODELS else resolve_model(model)
    chars = max(20_000, 8 * max(scale.gptq_nsamples * scale.gptq_seqlen, scale.eval_blocks * (scale.eval_len + 1)))
    calib_file = write_text_atomic(work / "calibration.txt", corpus.package_text(corpus.CALIBRATION_PACKAGES, chars))
    held_out = write_text_atomic(work / "held_out.txt", corpus.package_text(corpus.HELD_OUT_PACKAGES, chars))
    calibration = load_calibration(calib_file, model_dir, scale.gptq_nsamples, scale.gptq_seqlen, seed=0)
    blocks = blocks_from(str(held_out), str(model_dir), scale.eval_len, scale.eval_blocks)
    log(f"gptq: {model_dir.name}, calibration {tuple(calibration.shape)}, held-out {blocks.shape[0]} blocks of {scale.eval_len} tokens")
    float_model = load_model(model_dir, dtype=torch.float32)
    parameters = sum(p.numel() for p in {id(p): p for p in float_model.parameters()}.values())
    rows = {"float32": training.quality(float_model, blocks, buckets=4)}
    sizes = {"float32": 4 * parameters, "float16": 2 * parameters}
    for method in ("gptq", "rtn"):
        log(f"gptq: quantizing with {method}")
        folder = quantize(float_model, model_dir, work / method, method, calibration)
        rows[method] = {**training.quality(load_model(folder, dtype=torch.float32), blocks, buckets=4), "sizes": checkpoint_sizes(folder)}
    for name in ("gptq", "rtn"):
        row = rows[name]
        row["accuracy_ratio"] = row["accuracy"] / rows["float32"]["accuracy"]
        row["ppl_ratio"] = row["ppl"] / rows["float32"]["ppl"]
        row["size_vs_float32"] = row["sizes"]["checkpoint"] / sizes["float32"]
        row["size_vs_float16"] = row["sizes"]["checkpoint"] / sizes["float16"]
        row["linears_vs_float32"] = row["sizes"]["quantized_linears"] / max(row["sizes"]["linears_fp32"], 1)
    return {"model": model_dir.name, "parameters": parameters, "group_size": GROUP_SIZE, "calibration": list(calibration.shape),
            "eval_blocks": int(blocks.shape[0]), "eval_len": scale.eval_len, "float_bytes": sizes, "models": rows}  # fmt: skip


def verdicts(result: dict[str, Any]) -> dict[str, Verdict]:
    gptq, rtn = result["models"]["gptq"], result["models"]["rtn"]
    holds = gptq["accuracy_ratio"] >= 0.992 and gptq["size_vs_float32"] <= 0.125
    return {"gptq_4bit": Verdict(
        measured=(f"GPTQ: {ratio_text(gptq['accuracy_ratio'])} of float accuracy (ppl {gptq['ppl']:.2f} vs {result['models']['float32']['ppl']:.2f}), "
                  f"checkpoint {ratio_text(gptq['size_vs_float32'])} of float32 / {ratio_text(gptq['size_vs_float16'])} of float16, "
                  f"quantized linears {ratio_text(gptq['linears_vs_float32'])} of theirs in float32; "
                  f"RTN: {ratio_text(rtn['accuracy_ratio'])} accuracy, ppl {rtn['ppl']:.2f}"),
        method=(f"{result['model']} ({result['parameters']:,} parameters), 4-bit group {result['group_size']}, calibration "
                f"{result['calibration'][0]}×{result['calibration'][1]} tokens; next-token accuracy and perplexity on "
                f"{result['eval_blocks']}×{result['eval_len']} held-out stdlib tokens, checkpoints loaded back from disk"),
        verdict=HOLDS if holds else DOES_NOT_HOLD,
        why=("both figures met" if holds else
             ("accuracy kept but " if gptq["accuracy_ratio"] >= 0.992 else "accuracy below 99.2%; ")
             + ("" if gptq["size_vs_float32"] <= 0.125 else
                "the checkpoint is above 12.5%: embeddings and norms stay float16 and each group of 128 adds a scale and a zero")),
    )}  # fmt: skip
