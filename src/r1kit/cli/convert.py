"""`r1kit convert`: a GGUF file to a model directory, or a standard model directory to a GGUF file."""

from __future__ import annotations

import argparse
from pathlib import Path

from r1kit.errors import CheckpointError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="a .gguf file, or a model directory (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="the model directory (from a GGUF) or the .gguf file to write")
    parser.add_argument("--to", choices=["hf", "gguf"], help="target format (default: hf from a .gguf, gguf from a directory)")
    parser.add_argument("--outtype", choices=["f32", "f16", "q8_0"], default="f16", help="GGUF tensor type (default f16; norms stay f32)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")


def run(args: argparse.Namespace) -> int:
    from r1kit.checkpoints.gguf_convert import convert_gguf
    from r1kit.checkpoints.gguf_write import write_gguf

    source, out = Path(args.source), Path(args.out)
    target = args.to or ("hf" if source.is_file() else "gguf")
    if not source.exists():
        raise CheckpointError(f"{source} does not exist; give a .gguf file or a model directory")
    if out.exists() and not args.force and (out.is_file() or any(out.iterdir())):
        raise CheckpointError(f"{out} exists; pass --force to overwrite it or choose another --out")
    if target == "hf":
        if not source.is_file():
            raise CheckpointError(f"{source} is a directory; --to hf converts a .gguf file (use --to gguf for a directory)")
        if out.exists():
            import shutil

            shutil.rmtree(out) if out.is_dir() else out.unlink()
        convert_gguf(source, out)
    else:
        if not source.is_dir():
            raise CheckpointError(f"{source} is a file; --to gguf converts a model directory")
        write_gguf(source, out, args.outtype)
    print(f"wrote {out}")
    return 0
