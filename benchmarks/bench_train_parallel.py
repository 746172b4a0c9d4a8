"""Training step time over several CPU processes (gloo): FSDP2 against DDP on the same processes and
the same global batch, and one process for scale.

    python benchmarks/bench_train_parallel.py [--nproc 2] [--size tiny] [--steps 6] [--seq-len 128] [--batch 8]

Each layout is one torchrun launch of this script (``--worker LAYOUT``) running r1kit's real
``Trainer`` step (2 warm-up steps, then ``--steps`` timed ones between barriers); one thread per
process. Prints tokens/s and milliseconds per step for each layout, and the ratio FSDP2 / DDP.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from r1kit.config import ModelConfig
from r1kit.train import distributed
from r1kit.train.config import TrainConfig
from r1kit.train.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from bench_train import SIZES, write_shards  # noqa: E402  (the training benchmark's models and corpus)

LAYOUTS = {"one process": ("single", 1), "DDP": ("ddp", None), "FSDP2": ("fsdp", None)}


def worker(layout: str, size: str, shards: str, out: str, seq_len: int, batch: int, steps: int) -> None:
    """One layout's timing, under torchrun (or alone for ``single``); rank 0 prints one JSON line."""
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = ModelConfig(**SIZES[size], max_seq_len=seq_len * 2, tie_embeddings=True)
    cfg = TrainConfig(data=shards, out=out, seq_len=seq_len, micro_batch_size=batch // world, max_steps=steps + 2, warmup_steps=1,
                      eval_every=0, device="cpu", data_parallel="ddp" if layout == "single" else layout)  # fmt: skip
    trainer = Trainer(model, cfg, log=lambda _: None)
    for _ in range(2):
        trainer._train_step()
    distributed.barrier(trainer.dist)
    start = time.perf_counter()
    for _ in range(steps):
        trainer._train_step()
    distributed.barrier(trainer.dist)
    seconds = (time.perf_counter() - start) / steps
    if trainer.dist.is_main:
        print(json.dumps({"ms_per_step": seconds * 1e3, "tokens_per_s": batch * seq_len / seconds}), flush=True)
    sys.stdout.flush()
    os._exit(0)  # gloo's threads can abort the interpreter's teardown on torch 2.13 (see tests/tp_worker.py)


def launch(layout: str, nproc: int, args: argparse.Namespace, shards: Path, out: Path) -> dict[str, float]:
    command = [__file__, "--worker", layout, "--size", args.size, "--shards", str(shards), "--out", str(out),
               "--seq-len", str(args.seq_len), "--batch", str(args.batch), "--steps", str(args.steps)]  # fmt: skip
    if nproc > 1:
        command = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", "29651", *command]
    r = subprocess.run([sys.executable, *command], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "R1KIT_NO_PROGRESS": "1"})
    if r.returncode:
        raise SystemExit(f"{layout} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2, help="processes for DDP and FSDP2")
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--steps", type=int, default=6, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="sequences per step, all processes together")
    parser.add_argument("--worker", choices=[v[0] for v in LAYOUTS.values()], help=argparse.SUPPRESS)
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.size, args.shards, args.out, args.seq_len, args.batch, args.steps)
    if args.batch % args.nproc:
        raise SystemExit(f"--batch {args.batch} must be a multiple of --nproc {args.nproc}")
    print(f"model {args.size} | {args.nproc} processes x 1 thread (gloo) | seq {args.seq_len} x batch {args.batch} per step")
    print(f"{'layout':<12} {'processes':>9} {'ms/step':>9} {'tokens/s':>10} {'vs DDP':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        shards = write_shards(Path(tmp), SIZES[args.size]["vocab_size"], 200_000)
        rows = {name: (nproc or args.nproc, launch(layout, nproc or args.nproc, args, shards, Path(tmp) / layout)) for name, (layout, nproc) in LAYOUTS.items()}
    ddp = rows["DDP"][1]["ms_per_step"]
    for name, (nproc, r) in rows.items():
        print(f"{name:<12} {nproc:>9} {r['ms_per_step']:>9.1f} {r['tokens_per_s']:>10,.0f} {ddp / r['ms_per_step']:>7.2f}x")


if __name__ == "__main__":
    main()
