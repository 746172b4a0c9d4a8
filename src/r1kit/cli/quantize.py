"""`r1kit quantize`: GPTQ (or RTN) 4- or 8-bit quantization of a model directory into a GPTQ checkpoint
(``--quantize-lm-head``: the output head too; a tied embedding is untied and stays float).

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
from r1kit.quant.config import LINEAR_BITS

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
    parser.add_argument("--bits", type=int, choices=LINEAR_BITS, default=4,
                        help="bits per weight: 4 (default) or 8 (the q8_0 class, between bfloat16 and int4)")
    parser.add_argument("--quantize-lm-head", action="store_true",
                        help="quantize the output head too (GPTQModel's lm_head option); a head tied to the embedding is untied: "
                             "the head quantized, the embedding kept in float")
    parser.add_argument("--group-size", type=int, default=128, help="input features sharing one scale and zero (default 128; -1: one group per output channel)")
    parser.add_argument("--desc-act", type=_bool, default=None, metavar="BOOL",
                        help="act-order: quantize columns by decreasing activation energy, groups following that order (default false)")
    parser.add_argument("--act-group-aware", type=_bool, default=None, metavar="BOOL",
                        help="quantize groups by decreasing activation energy, columns sorted inside each; groups stay contiguous (default true; off under --desc-act)")
    parser.add_argument("--static-groups", type=_bool, default=None, metavar="BOOL",
                        help="every group's scale from the original weights, before GPTQ updates them (default false)")
    parser.add_argument("--mse", type=float, default=None, metavar="NORM",
                        help="clipping search: shrink each group's range to minimise Σ H_jj·|error|^NORM (default 2.4; 0: off)")
    parser.add_argument("--sym", type=_bool, default=None, metavar="BOOL", help="symmetric grid, zero fixed at 8 (default true); false fits each group's [min, max]")
    parser.add_argument("--damp", type=float, default=None, help="Hessian dampening as a fraction of its mean diagonal (default 0.05)")
    parser.add_argument("--damp-auto-increment", type=float, default=None,
                        help="added to --damp until the Hessian factorizes (default 0.01; 0: fail instead)")
    parser.add_argument("--block-size", type=int, default=None, help="GPTQ lazy-update block in columns (default 128)")
    parser.add_argument("--true-sequential", type=_bool, default=None, metavar="BOOL",
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
    parser.add_argument("--eval", metavar="FILE", help="held-out text file (or shard folder, val split): print the float and the quantized model's perplexity on it at the end")
    parser.add_argument("--eval-seqlen", type=int, default=512, help="tokens per --eval block (default 512)")
    parser.add_argument("--eval-blocks", type=int, default=16, help="--eval blocks scored (default 16)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing model in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs stay quiet)")


# flag -> QuantConfig field; flags left out take QuantConfig's defaults (one place for them)
SETTINGS = {"desc_act": "desc_act", "act_group_aware": "act_group_aware", "static_groups": "static_groups", "mse": "mse",
            "sym": "sym", "damp": "damp_percent", "damp_auto_increment": "damp_auto_increment", "block_size": "block_size",
            "true_sequential": "true_sequential"}
REPORT = "quantize_report.json"


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from r1kit.checkpoints.load import load_model, resolve_model
    from r1kit.config import dump_json
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
    chosen = {field: getattr(args, flag) for flag, field in SETTINGS.items() if getattr(args, flag) is not None}
    config = QuantConfig(bits=args.bits, group_size=args.group_size, method=args.method, lm_head=args.quantize_lm_head, **chosen)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size={args.batch_size} must be positive")
    model = load_model(model_dir, device=args.device)
    if getattr(model, "quantization_config", None) is not None:
        raise ConfigError(f"{args.model} is already quantized; quantize the float model")
    report = {"model": str(model_dir), "quantization_config": config.to_hf()}
    calibration = None
    if args.method == "gptq":
        if not args.calib:
            raise ConfigError("--method gptq needs --calib (token shards or a text file); or use --method rtn")
        seqlen = args.seqlen or min(2048, model.config.max_seq_len)
        calibration = load_calibration(args.calib, model_dir, args.nsamples, seqlen, args.seed, args.calib_split)
        print(f"calibration: {calibration.shape[0]} samples × {calibration.shape[1]} tokens from {args.calib}", file=sys.stderr)
        report["calibration"] = {"source": str(args.calib), "samples": calibration.shape[0], "seqlen": calibration.shape[1], "seed": args.seed}
    evaluation = _held_out(args, model, model_dir) if args.eval else None
    start = time.perf_counter()
    if args.method == "gptq":
        bar = tqdm(desc="gptq layers", total=model.config.num_layers, unit="layer", file=sys.stderr, disable=args.no_progress)
        results = quantize_model(model, config, calibration, batch_size=args.batch_size, on_layer=lambda i, records: _log_layer(bar, i, records, config))
        bar.close()
    else:
        bar = (lambda it: tqdm(it, desc="rtn layers", unit="layer", file=sys.stderr)) if not args.no_progress else None
        results = quantize_model(model, config, progress=bar)
    seconds = time.perf_counter() - start
    save_dtype = None if args.save_dtype == "auto" else getattr(torch, args.save_dtype)
    save_quantized(model, out, config, results, dtype=save_dtype)
    for file in companion_files(model_dir):
        shutil.copyfile(file, out / file.name)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    source = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) or model.config.num_parameters() * 4  # a GGUF: its float32 size
    print(
        f"wrote {out}: {len(results)} linears quantized ({args.method}, {config.bits}-bit, group {config.group_size}, "
        f"desc_act={config.desc_act}, sym={config.sym}, lm_head={config.lm_head}) in {seconds:.1f}s; weights {size / 2**20:.2f} MiB "
        f"({100 * size / max(source, 1):.1f}% of {source / 2**20:.2f} MiB)"
    )
    errors = getattr(model, "quant_errors", {})
    report.update(seconds=round(seconds, 3), layers=errors)
    if errors:
        mean = sum(r["output_error"] for r in errors.values()) / len(errors)
        print(f"layer output error ‖X(W−Q)ᵀ‖²/‖XWᵀ‖² on the calibration inputs: mean {100 * mean:.3f}% over {len(errors)} linears (each in {out / REPORT})")
    if evaluation is not None:
        from r1kit.evaluate import perplexity

        blocks, float_ppl = evaluation
        del model
        quantized_ppl = perplexity(load_model(out, device=args.device), blocks, 1, args.batch_size)["ppl"]  # as served: quantized layers
        report["eval"] = {"file": str(args.eval), "blocks": len(blocks), "seqlen": blocks.shape[1] - 1,
                          "float_ppl": float_ppl, "quantized_ppl": quantized_ppl}
        print(f"perplexity on {args.eval} ({len(blocks)} × {blocks.shape[1] - 1} tokens): float {float_ppl:.3f}, "
              f"quantized {quantized_ppl:.3f} ({100 * (quantized_ppl / float_ppl - 1):+.2f}%)")
    dump_json(report, out / REPORT)
    return 0


def _log_layer(bar, i: int, records: dict[str, dict[str, float]], config) -> None:
    """One line per quantized layer: its linears' output errors (and a damp raised to factorize a Hessian)."""
    worst = max(records, key=lambda k: records[k]["output_error"])
    mean = sum(r["output_error"] for r in records.values()) / len(records)
    damped = max(r["damp"] for r in records.values())
    bar.set_postfix_str(f"output error {100 * mean:.2f}%")
    bar.update()
    if not bar.disable:
        bar.write(f"layer {i}: output error mean {100 * mean:.3f}%, max {100 * records[worst]['output_error']:.3f}% "
                  f"({'.'.join(worst.split('.')[3:])})" + (f"; damp raised to {damped:.3f}" if damped > config.damp_percent else ""), file=sys.stderr)


def _held_out(args: argparse.Namespace, model, model_dir: Path):
    """The --eval blocks and the float model's perplexity on them (before quantization changes it)."""
    from r1kit.evaluate import blocks_from, perplexity

    if args.eval_seqlen < 1 or args.eval_blocks < 1:
        raise ConfigError(f"--eval-seqlen={args.eval_seqlen} and --eval-blocks={args.eval_blocks} must be positive")
    blocks = blocks_from(args.eval, model_dir, args.eval_seqlen, args.eval_blocks)
    if len(blocks) == 0:
        raise ConfigError(f"--eval {args.eval} holds fewer than {args.eval_seqlen + 1} tokens: give more text or a smaller --eval-seqlen")
    return blocks, perplexity(model, blocks, 1, args.batch_size)["ppl"]
