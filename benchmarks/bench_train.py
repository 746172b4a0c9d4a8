"""Training throughput: r1kit's training step against the same architecture in Hugging Face transformers.

Both sides train the same Llama-architecture model (global attention, dense SwiGLU: the one layout
transformers can build) on the same batches with AdamW and gradient clipping; r1kit runs its real
``Trainer`` step (data from memory-mapped shards, accumulation machinery, sparsity hooks), the peer a
plain PyTorch loop over ``LlamaForCausalLM``. The seed's layout (hybrid attention + Top-K FFN) is
timed too, for information: it has no transformers peer.

    python benchmarks/bench_train.py [--steps 8] [--sizes tiny,30m]

Prints tokens/s, MFU against this machine's measured matmul peak, and the ratio r1kit / transformers.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from r1kit.config import ModelConfig
from r1kit.data.records import write_json
from r1kit.data.shards import FORMAT, INDEX, ShardWriter
from r1kit.model.hf import config_to_hf
from r1kit.train.config import TrainConfig
from r1kit.train.trainer import Trainer, decay_groups, flops_per_token, measure_peak_flops

SIZES = {
    "tiny": dict(vocab_size=8192, hidden_size=192, num_layers=4, num_heads=6, num_kv_heads=2, intermediate_size=512),
    "30m": dict(vocab_size=16384, hidden_size=512, num_layers=6, num_heads=8, num_kv_heads=4, intermediate_size=1408),
}


def write_shards(directory: Path, vocab: int, tokens: int) -> Path:
    out = directory / "shards"
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    writers = {s: ShardWriter(out, s, 1 << 20, np.uint16) for s in ("train", "val")}
    writers["train"].add("train", rng.integers(0, vocab, tokens))
    writers["val"].add("val", rng.integers(0, vocab, 4096))
    write_json(out / INDEX, {"format": FORMAT, "dtype": "uint16", "vocab_size": vocab, "splits": {s: w.close() for s, w in writers.items()}})
    return out


def time_r1kit(model_cfg: ModelConfig, shards: Path, out: Path, seq_len: int, batch: int, steps: int) -> float:
    cfg = TrainConfig(data=str(shards), out=str(out), seq_len=seq_len, micro_batch_size=batch, max_steps=steps + 2, warmup_steps=1, eval_every=0)
    trainer = Trainer(model_cfg, cfg, log=lambda _: None)
    for _ in range(2):  # warm-up
        trainer._train_step()
    start = time.perf_counter()
    for _ in range(steps):
        loss, _ = trainer._train_step()
        if trainer.controller:
            trainer.controller.step(loss)
    return steps * batch * seq_len / (time.perf_counter() - start)


def time_transformers(model_cfg: ModelConfig, shards: Path, seq_len: int, batch: int, steps: int) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    raw = config_to_hf(model_cfg)
    hf_cfg = LlamaConfig(**{k: v for k, v in raw.items() if k not in ("r1kit", "architectures", "model_type", "rope_scaling", "torch_dtype")})
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf_cfg).train()
    opt = torch.optim.AdamW(decay_groups(model, 0.01), lr=3e-4, betas=(0.9, 0.95))
    from r1kit.data.shards import ShardDataset

    data = ShardDataset(shards, "train", seq_len, seed=0)

    def step() -> None:
        x, y = data.next_batch(batch)
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        opt.zero_grad(set_to_none=True)
        logits = model(x).logits
        F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch * seq_len / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,30m", help="comma-separated sizes: " + ", ".join(SIZES))
    parser.add_argument("--steps", type=int, default=8, help="timed steps per case (after 2 warm-up steps)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    args = parser.parse_args()
    os.environ["R1KIT_NO_PROGRESS"] = "1"
    peak = measure_peak_flops(torch.device("cpu"), seconds=2.0)
    print(f"threads {torch.get_num_threads()} | measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s | seq {args.seq_len} x batch {args.batch}")
    print(f"{'size':<6} {'model':<34} {'params':>8} {'tokens/s':>10} {'MFU':>7} {'vs transformers':>16}")
    for size in args.sizes.split(","):
        base = ModelConfig(**SIZES[size], max_seq_len=args.seq_len * 2, tie_embeddings=True)
        seed = dataclasses.replace(base, attention=("local", "hybrid"), ffn="topk", local_window=64, topk_sparsity=0.5)
        with tempfile.TemporaryDirectory() as tmp:
            shards = write_shards(Path(tmp), base.vocab_size, 2_000_000)
            ref = time_transformers(base, shards, args.seq_len, args.batch, args.steps)
            ours = time_r1kit(base, shards, Path(tmp) / "a", args.seq_len, args.batch, args.steps)
            seeded = time_r1kit(seed, shards, Path(tmp) / "b", args.seq_len, args.batch, args.steps)
        fpt = flops_per_token(base, args.seq_len)
        rows = [
            ("transformers Llama (plain loop)", ref, ""),
            ("r1kit, same architecture", ours, f"{ours / ref:.2f}x"),
            ("r1kit, local+hybrid, Top-K 0.5", seeded, f"{seeded / ref:.2f}x"),
        ]
        for name, tps, ratio in rows:
            print(f"{size:<6} {name:<34} {base.num_parameters() / 1e6:>7.1f}M {tps:>10,.0f} {tps * fpt / peak:>6.1%} {ratio:>16}")


if __name__ == "__main__":
    main()
