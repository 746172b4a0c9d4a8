"""Benchmark: the r1kit engine against llama.cpp on the same weights, in every precision (issue 23).

Protocol: ``--threads`` CPU threads (2), ``--prompt-len``-token prompts (128), ``--new-tokens`` greedy
new tokens (128), tokens/s end to end (prefill included) at batch 1 and 8 (``--batch-sizes``). Two
models: the real SmolLM2-135M-Instruct (``r1kit pull smollm2-135m-instruct``, the float32 weights r1kit
reads from its GGUF) and the ~100M Qwen2 shape of ``benchmarks/bench_engine.py`` (random weights in the
Llama layout, i.e. without Qwen2's q/k/v biases, saved as Hugging Face safetensors with SmolLM2's
tokenizer, so its vocabulary is SmolLM2's 49,152). Both are
converted by llama.cpp's own ``convert_hf_to_gguf.py`` to f32, f16 and q8_0, and q4_0 is quantized
from the f32 file by ``llama_model_quantize`` (llama.cpp keeps its output head at q6_K there).

r1kit runs fp32, bf16, int8 and int4 (round-to-nearest codes, ``--group-size``, from ``r1kit.quant``;
with ``--quantize-head`` the output head too, where ``QuantConfig`` offers it; a precision that
``r1kit.quant`` does not run is skipped with a message). llama.cpp runs f32, f16, q8_0, q4_0 through
llama-cpp-python's low-level API (one context, ``n_seq_max`` sequences decoding together, greedy by
argmax over the logits). For each precision class (fp32/f32, bf16/f16, int8/q8_0, int4/q4_0) it
prints both rates and their ratio, and at batch 1 the achieved weight bandwidth (weight bytes read
per token × decode tokens/s, the decode rate being the tokens after the first over the time after
the first) against the machine's copy bandwidth measured here (a 256 MiB tensor copy). It checks that
r1kit's fp32 greedy tokens equal llama.cpp's f32 ones at batch 1 and prints how many agree.

Installing llama-cpp-python (about 10 minutes to build on 2 cores; without it the llama.cpp rows are
skipped with a message)::

    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python==0.3.36 --no-binary :all:

``convert_hf_to_gguf.py`` (with its ``conversion`` and ``gguf-py`` folders) comes from the same source
package; it imports ``sentencepiece`` before it falls back to a ``tokenizer.json``::

    pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36 -d /tmp/llama-src
    tar xzf /tmp/llama-src/llama_cpp_python-0.3.36.tar.gz -C /tmp/llama-src
    pip install sentencepiece

and ``--llama-src /tmp/llama-src/llama_cpp_python-0.3.36/vendor/llama.cpp`` points at it.

Usage: python benchmarks/bench_vs_llamacpp.py --llama-src DIR [--models real,100m] [--batch-sizes 1,8] [--repeats 3]
       [--precisions fp32,bf16,int8,int4] [--prompt-len 128] [--new-tokens 128] [--threads 2]
       [--group-size 64] [--quantize-head]
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from r1kit.checkpoints import load_model
from r1kit.errors import ConfigError
from r1kit.infer.benchmark import memory_bandwidth
from r1kit.infer.llm import LLM
from r1kit.infer.sampling import SamplingParams

# r1kit precision -> (llama.cpp type, convert_hf_to_gguf --outtype or None: quantized from f32)
CLASSES = {"fp32": ("f32", "f32"), "bf16": ("f16", "f16"), "int8": ("q8_0", "q8_0"), "int4": ("q4_0", None)}
LLAMA_FTYPE_MOSTLY_Q4_0 = 2
SHAPE_100M = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4, intermediate_size=2048)


@dataclasses.dataclass
class Run:
    total_tps: float  # batch x new tokens / wall time, prefill included
    decode_tps: float  # tokens after the first / time after the first
    tokens: list[list[int]]  # each sequence's new tokens


# -- the models ------------------------------------------------------------------------------------
def real_model_dir() -> Path:
    from r1kit.checkpoints.pull import pull

    return Path(pull("smollm2-135m-instruct"))


def shape_100m_dir(tokenizer_dir: Path, out: Path) -> Path:
    """bench_engine.py's 100m Qwen2 shape with random weights and SmolLM2's tokenizer, in the Llama layout
    (Qwen2 less its q/k/v biases): convert_hf_to_gguf reads a Qwen2 vocabulary only from tokenizers
    whose pre-tokenizer it has on its list, and reads this one through its Llama path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=4096, rope_theta=1e6, **SHAPE_100M)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


def prompts_of(tokenizer_dir: Path, count: int, length: int) -> list[list[int]]:
    """``count`` prompts of ``length`` tokens of real English (Python's reference documentation)."""
    from pydoc_data.topics import topics

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = tokenizer("\n\n".join(topics[k] for k in sorted(topics)[:40]))["input_ids"]
    if len(ids) < count * length:
        raise ConfigError(f"the text holds {len(ids)} tokens, fewer than {count} prompts of {length}")
    return [ids[i * length : (i + 1) * length] for i in range(count)]


# -- r1kit -------------------------------------------------------------------------------------------
def r1kit_model(path: Path, precision: str, group_size: int, quantize_head: bool):
    """The model in ``precision``; None (with a message) where r1kit.quant does not run it."""
    if precision in ("fp32", "bf16"):
        return load_model(path, dtype=torch.float32 if precision == "fp32" else torch.bfloat16).eval()
    from r1kit.quant import QuantConfig, quantize_model, to_quantized

    fields = {f.name for f in dataclasses.fields(QuantConfig)}
    extra = {"lm_head": True} if quantize_head and "lm_head" in fields else {}
    try:
        config = QuantConfig(bits=8 if precision == "int8" else 4, group_size=group_size, method="rtn", **extra)
        model = load_model(path, dtype=torch.float32).eval()
        return to_quantized(model, quantize_model(model, config), config)
    except ConfigError as exc:
        print(f"# r1kit {precision}: skipped, r1kit.quant does not run it here ({exc})")
        return None


def weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer once, less the embedding
    table where the output head does not read it (one row of it is read)."""
    seen, total = set(), 0
    embed = {t.data_ptr() for t in (*model.model.embed_tokens.parameters(), *model.model.embed_tokens.buffers())}
    head = {t.data_ptr() for t in (*model.lm_head.parameters(), *model.lm_head.buffers())}
    for t in (*model.parameters(), *model.buffers()):
        ptr = t.data_ptr()
        if ptr in seen or (ptr in embed and ptr not in head) or t.numel() * t.element_size() < 4096:
            continue
        seen.add(ptr)
        total += t.numel() * t.element_size()
    return total


def time_r1kit(llm, prompts: list[list[int]], new_tokens: int) -> Run:
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    ids = [engine.add_request(None, p, params) for p in prompts]
    first, done = {}, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            first.setdefault(out.request_id, time.perf_counter())
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    end = time.perf_counter()
    decode = len(prompts) * (new_tokens - 1) / max(end - max(first.values()), 1e-9)
    return Run(len(prompts) * new_tokens / (end - start), decode, [done[i] for i in ids])


# -- llama.cpp -------------------------------------------------------------------------------------
def convert(llama_src: Path, hf_dir: Path, outtype: str, out: Path) -> Path:
    """``hf_dir`` converted by llama.cpp's own script (its gguf-py first on the path)."""
    script = llama_src / "convert_hf_to_gguf.py"
    if not script.exists():
        raise FileNotFoundError(f"{script} not found: --llama-src must be the vendor/llama.cpp folder of llama-cpp-python's source package")
    done = subprocess.run([sys.executable, str(script), str(hf_dir), "--outfile", str(out), "--outtype", outtype], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"convert_hf_to_gguf.py --outtype {outtype} of {hf_dir} failed:\n{done.stderr[-2000:]}")
    return out


def quantize_gguf(source: Path, out: Path, threads: int) -> Path:
    import llama_cpp as L

    params = L.llama_model_quantize_default_params()
    params.ftype, params.nthread = LLAMA_FTYPE_MOSTLY_Q4_0, threads
    if L.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize of {source} to q4_0 failed")
    return out


def gguf_weight_bytes(path: Path) -> int:
    """Bytes one llama.cpp decode step reads: every tensor, less the token embedding where a separate
    output head exists (one row of it is read)."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    total = sum(tensors.values())
    return total - tensors.get("token_embd.weight", 0) if "output.weight" in tensors else total


class LlamaCpp:
    """One llama.cpp model and context through the low-level API: ``run`` decodes ``prompts`` together,
    greedy, as the engine does (one batch per step, every sequence's next token in it)."""

    def __init__(self, path: Path, threads: int, max_seqs: int, max_len: int) -> None:
        import llama_cpp as L

        self.L = L
        self._quiet = L.llama_log_callback(lambda level, text, data: None)  # kept: llama.cpp calls it later
        L.llama_log_set(self._quiet, ctypes.c_void_p(0))
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(str(path).encode(), L.llama_model_default_params())
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = max_seqs * max_len, max_seqs * max_len, max_seqs * max_len
        cp.n_seq_max, cp.n_threads, cp.n_threads_batch = max_seqs, threads, threads
        self.ctx = L.llama_init_from_model(self.model, cp)
        self.vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(max_seqs * max_len, 0, max_seqs)

    def close(self) -> None:
        self.L.llama_batch_free(self.batch)
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)

    def _decode(self, rows: list[tuple[int, int, int, bool]]) -> None:
        b = self.batch
        for i, (token, pos, seq, logits) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(rows)
        if self.L.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def _argmax(self, i: int) -> int:
        return int(np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, i), shape=(self.vocab,)).argmax())

    def run(self, prompts: list[list[int]], new_tokens: int) -> Run:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        start = time.perf_counter()
        rows = [(t, p, s, p == len(prompt) - 1) for s, prompt in enumerate(prompts) for p, t in enumerate(prompt)]
        self._decode(rows)
        ends = np.cumsum([len(p) for p in prompts]) - 1
        out = [[self._argmax(int(e))] for e in ends]
        first = time.perf_counter()
        for step in range(1, new_tokens):
            self._decode([(out[s][-1], len(prompts[s]) + step - 1, s, True) for s in range(len(prompts))])
            for s in range(len(prompts)):
                out[s].append(self._argmax(s))
        end = time.perf_counter()
        return Run(len(prompts) * new_tokens / (end - start), len(prompts) * (new_tokens - 1) / max(end - first, 1e-9), out)


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("# llama.cpp rows skipped: llama-cpp-python is not installed (see this script's docstring to build it)")
        return False
    return True


# -- the run ---------------------------------------------------------------------------------------
def bench_model(name: str, hf_dir: Path, tokenizer_dir: Path, args, work: Path, copy_bw: float, with_llama: bool) -> None:
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    prompts = prompts_of(tokenizer_dir, max(sizes), args.prompt_len)
    max_len = args.prompt_len + args.new_tokens
    copy_bw = max(copy_bw, memory_bandwidth("cpu")[0])  # the best seen: other work on the machine only lowers it
    print(f"\n## {name} (copy bandwidth {copy_bw / 1e9:.1f} GB/s)\n")
    print("| precision | batch | r1kit tok/s | llama.cpp | llama.cpp tok/s | r1kit / llama.cpp | r1kit GB/s (% of copy) | llama.cpp GB/s (% of copy) |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    f32_tokens = {}
    for precision in args.precisions.split(","):
        lname, outtype = CLASSES[precision]
        model = r1kit_model(hf_dir, precision, args.group_size, args.quantize_head)
        llm = peer = None
        if model is not None:
            nbytes = weight_bytes(model)
            llm = LLM(model, max_num_seqs=max(sizes), max_model_len=max_len)
            del model
            time_r1kit(llm, [prompts[0][:16]], 4)  # warm-up: kernels built and loaded
        lbytes = 0
        if with_llama:
            f32 = work / f"{name}-f32.gguf"
            if not f32.exists():
                convert(args.llama_src, hf_dir, "f32", f32)
            path = work / f"{name}-{lname}.gguf"
            if not path.exists():
                convert(args.llama_src, hf_dir, outtype, path) if outtype else quantize_gguf(f32, path, args.threads)
            lbytes = gguf_weight_bytes(path)
            peer = LlamaCpp(path, args.threads, max(sizes), max_len)
            peer.run([prompts[0][:16]], 4)
        # the two engines take turns, round after round, and each keeps its best round: a machine shared
        # with other work disturbs the ratio as little as it can
        mine, theirs = {}, {}
        turns = []
        if llm is not None:
            turns.append((mine, lambda p, n: time_r1kit(llm, p, n)))
        if peer is not None:
            turns.append((theirs, peer.run))
        for _ in range(args.repeats):
            for b in sizes:
                for runs, engine in turns:
                    run = engine(prompts[:b], args.new_tokens)
                    if b not in runs or run.total_tps > runs[b].total_tps:
                        runs[b] = run
        if peer is not None:
            peer.close()
        turns = llm = peer = None  # the next precision's engines replace these
        for b in sizes:
            r, t = mine.get(b), theirs.get(b)
            ratio = f"{r.total_tps / t.total_tps:.2f}x" if r and t else "-"
            bw_r = f"{nbytes * r.decode_tps / 1e9:.1f} ({100 * nbytes * r.decode_tps / copy_bw:.0f}%)" if r and b == 1 else "-"
            bw_t = f"{lbytes * t.decode_tps / 1e9:.1f} ({100 * lbytes * t.decode_tps / copy_bw:.0f}%)" if t and b == 1 else "-"
            print(f"| r1kit {precision} | {b} | {r.total_tps if r else float('nan'):.1f} | {lname} | {t.total_tps if t else float('nan'):.1f} | "
                  f"{ratio} | {bw_r} | {bw_t} |", flush=True)
        if precision == "fp32" and 1 in mine and 1 in theirs:
            f32_tokens = {"r1kit": mine[1].tokens[0], "llama.cpp": theirs[1].tokens[0]}
    if f32_tokens:
        a, b = f32_tokens["r1kit"], f32_tokens["llama.cpp"]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        verdict = "equal" if a == b else f"agree on the first {same} of {len(a)}"
        print(f"\nfp32 greedy tokens at batch 1, r1kit vs llama.cpp f32: {verdict}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="real,100m", help="real (SmolLM2-135M-Instruct), 100m (the random Qwen2 shape)")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--precisions", default="fp32,bf16,int8,int4")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="rounds in which the two engines take turns; the best of each is reported")
    ap.add_argument("--group-size", type=int, default=64, help="r1kit int4/int8 group size")
    ap.add_argument("--quantize-head", action="store_true", help="quantize r1kit's output head too (where r1kit.quant offers it)")
    ap.add_argument("--llama-src", type=Path, default=None, help="llama.cpp's source folder (vendor/llama.cpp of the sdist)")
    args = ap.parse_args()
    unknown = set(args.precisions.split(",")) - set(CLASSES)
    if unknown:
        raise SystemExit(f"--precisions: unknown {sorted(unknown)}; choose from {list(CLASSES)}")
    torch.set_num_threads(args.threads)
    with_llama = llama_cpp_available()
    if with_llama and args.llama_src is None:
        print("# llama.cpp rows skipped: --llama-src is needed for convert_hf_to_gguf.py (see this script's docstring)")
        with_llama = False
    copy_bw, read_bw = memory_bandwidth("cpu")
    print(f"# r1kit vs llama.cpp: {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
          f"prompt {args.prompt_len}, {args.new_tokens} greedy new tokens, tok/s end to end (prefill included)")
    print(f"# memory bandwidth: copy (read + write) {copy_bw / 1e9:.1f} GB/s, read {read_bw / 1e9:.1f} GB/s; "
          "weight bandwidth = weight bytes read per token x decode tok/s at batch 1")
    real = real_model_dir()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            hf_dir = real if name == "real" else shape_100m_dir(real, work / "shape-100m")
            bench_model(name, hf_dir, real, args, work, copy_bw, with_llama)


if __name__ == "__main__":
    main()
