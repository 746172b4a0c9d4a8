"""`r1kit quantize`: GPTQ (or RTN) 4-bit quantization of a model directory into a GPTQ checkpoint.

Reads the float model, draws calibration samples, quantizes layer by layer with a progress bar,
and writes ``--out`` (config.json with quantization_config, quantize_config.json, safetensors,
and every other file of the model directory: tokenizer, chat template, generation config, ...).
It never overwrites a model without ``--force``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from r1kit.errors import ConfigError

# what the quantized checkpoint replaces; every other top-level file travels with it (see companion_files)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
WRITTEN = ("config.json", "quantize_config.json", "gguf_source.json")  # the last: a GGUF view's pointer to its weights


def companion_files(model_dir: Path) -> list[Path]:
    """The files of a model directory that a quantized copy keeps as they are: every visible top-level
    file but the weights (and their ``*.index.json``) and the configs the quantizer writes itself, so
    tokenizer files, chat templates (``chat_template.jinja``) and generation settings of any name come
    along without a list of names to keep up to date."""
    return sorted(
        f for f in model_dir.iterdir()
        if f.is_file() and not f.name.startswith(".") and f.name not in WRITTEN
        and not f.name.endswith(WEIGHT_SUFFIXES) and not f.name.endswith(".index.json")
    )


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="float model directory (config.json + safetensors [+ tokenizer.json]), .gguf file or pulled model name")
    parser.add_argument("--out", required=True, help="directory to write the GPTQ checkpoint to")
    parser.add_argument("--method", choices=("gptq", "rtn"), default="gptq", help="gptq (default; needs --calib) or rtn, round-to-nearest, the baseline")
    parser.add_argument("--bits", type=int, choices=(4,), default=4, help="bits per weight (4: what the int4 layers run)")
    parser.add_argument("--group-size", type=int, default=128, help="input features sharing one scale and zero (default 128; -1: one group per output channel)")
    parser.add_argument("--desc-act", type=_bool, default=False, metavar="BOOL", help="act-order: quantize columns by decreasing activation energy (default false)")
    parser.add_argument("--sym", type=_bool, default=True, metavar="BOOL", help="symmetric grid, zero fixed at 8 (default true); false fits each group's [min, max]")
    parser.add_argument("--damp", type=float, default=0.01, help="Hessian dampening as a fraction of its mean diagonal (default 0.01)")
    parser.add_argument("--block-size", type=int, default=128, help="GPTQ lazy-update block in columns (default 128)")
    parser.add_argument("--true-sequential", type=_bool, default=True, metavar="BOOL",
                        help="quantize q/k/v, o, gate/up, down in turn, each calibrated on the previous ones' quantized outputs (default true)")
    parser.add_argument("--calib", help="calibration data: an r1kit shard directory (index.json) or a text file tokenized with the model's tokenizer.json")
    parser.add_argument("--calib-split", default="train", help="shard split to draw calibration samples from (default train)")
    parser.add_argument("--nsamples", type=int, default=1024, help="calibration samples (default 1024, as the seed)")
    parser.add_argument("--seqlen", type=int, help="tokens per calibration sample (default: min(2048, the model's max_seq_len))")
    parser.add_argument("--batch-size", type=int, default=8, help="calibration samples per forward pass (default 8; lower it to save memory)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration sampling (default 0)")
    parser.add_argument("--device", default="cpu", help="device to quantize on: cpu (default) or cuda[:N]")
    parser.add_argument("--save-dtype", choices=("auto", "float16", "bfloat16", "float32"), default="auto",
                        help="dtype of the tensors left in float (embeddings, norms, lm_head, biases); auto keeps the model's")
    parser.add_argument("--force", action="store_true", help="overwrite an existing model in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs stay quiet)")


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from r1kit.checkpoints.load import load_model, resolve_model
    from r1kit.quant.calibration import load_calibration
    from r1kit.quant.checkpoint import save_quantized
    from r1kit.quant.config import QuantConfig
    from r1kit.quant.quantizer import quantize_model

    out = Path(args.out)
    model_dir = resolve_model(args.model)
    if (out / "config.json").exists() and not args.force:
        raise ConfigError(f"{out} already holds a model; pass --force to overwrite it or choose another --out")
    if model_dir.resolve() == out.resolve():
        raise ConfigError("--out must differ from --model: the float weights would be overwritten")
    config = QuantConfig(
        bits=args.bits, group_size=args.group_size, desc_act=args.desc_act, sym=args.sym, damp_percent=args.damp,
        block_size=args.block_size, true_sequential=args.true_sequential, method=args.method,
    )
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size={args.batch_size} must be positive")
    model = load_model(model_dir, device=args.device)
    if getattr(model, "quantization_config", None) is not None:
        raise ConfigError(f"{args.model} is already quantized; quantize the float model")
    calibration = None
    if args.method == "gptq":
        if not args.calib:
            raise ConfigError("--method gptq needs --calib (token shards or a text file); or use --method rtn")
        seqlen = args.seqlen or min(2048, model.config.max_seq_len)
        calibration = load_calibration(args.calib, model_dir, args.nsamples, seqlen, args.seed, args.calib_split)
        print(f"calibration: {calibration.shape[0]} samples × {calibration.shape[1]} tokens from {args.calib}", file=sys.stderr)
    start = time.perf_counter()
    bar = (lambda it: tqdm(it, desc=f"{args.method} layers", unit="layer", file=sys.stderr)) if not args.no_progress else None
    results = quantize_model(model, config, calibration, batch_size=args.batch_size, progress=bar)
    seconds = time.perf_counter() - start
    save_dtype = None if args.save_dtype == "auto" else getattr(torch, args.save_dtype)
    save_quantized(model, out, config, results, dtype=save_dtype)
    for file in companion_files(model_dir):
        shutil.copyfile(file, out / file.name)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    source = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) or model.config.num_parameters() * 4  # a GGUF: its float32 size
    print(
        f"wrote {out}: {len(results)} linears quantized ({args.method}, {config.bits}-bit, group {config.group_size}, "
        f"desc_act={config.desc_act}, sym={config.sym}) in {seconds:.1f}s; weights {size / 2**20:.2f} MiB "
        f"({100 * size / max(source, 1):.1f}% of {source / 2**20:.2f} MiB)"
    )
    return 0
