"""A decode step of one sequence through the whole model in one C call (``csrc/decode_step.c``).

At batch 1 a thin, deep model spends much of a token's time between its products: the Python of
each layer's modules, a dispatch per small operation, a thread wake-up per oneDNN call, the cache
view's per-step tensors. :class:`DecodeStep` runs the step (embedding row, every layer's norm, fused
q/k/v product, rotary, K/V write, attention over the paged pool, output product, norm, fused
gate/up product with SiLU, down product, residual adds; then the final norm and the output head)
in one call and one OpenMP region, streaming each weight once at the machine's read rate.

It covers the dense models the engine packs: RMSNorm, SwiGLU, global and local attention (no hybrid
or Top-K layer), float32 or bfloat16 weights on the CPU, float (not int4) linears, widths that are
multiples of 16. It holds its own copy of the weights in its layout (:func:`interleave`: blocks of
four rows read as one stream, which measured faster than four row streams), so with the step the
engine holds its weights twice (``EngineConfig.decode_kernel=False`` trades the step, and the paged
attention kernel, for that memory).
Results match the module path to within float rounding (the sums run in another order): greedy
tokens equal the reference's, which ``tests/test_decode_step.py`` checks against the eager model.

It never decides when it runs: :class:`~r1kit.infer.model_runner.ModelRunner` calls it for steps
that decode one sequence alone.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import nn

from r1kit import native
from r1kit.infer.paged_cache import KVPool
from r1kit.infer.sequence import Sequence
from r1kit.infer.weight_packing import PackedLinear
from r1kit.model.attention import Attention, window_start
from r1kit.model.ffn import DenseFFN, TopKFFN
from r1kit.model.transformer import RMSNorm

SOURCE = Path(__file__).parent / "csrc" / "decode_step.c"
FUNCTIONS = {torch.float32: "decode_step_f32", torch.bfloat16: "decode_step_bf16"}
STATUS = {1: "bad head grouping or odd head dim", 2: "out of memory"}
ROWS, CHUNK = 4, 16  # the kernel's weight layout: blocks of ROWS rows, side by side in runs of CHUNK input features


def interleave(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [out, in] (``in`` a multiple of CHUNK) in the kernel's layout, a new 1-D tensor: each
    block of ROWS rows as its runs of CHUNK features, the block's rows side by side in each run, so a
    thread reads its rows as one stream; the last ``out % ROWS`` rows follow, plain."""
    out, cols = weight.shape
    whole = out - out % ROWS
    blocks = weight[:whole].reshape(whole // ROWS, ROWS, cols // CHUNK, CHUNK).transpose(1, 2).reshape(-1)
    return torch.cat([blocks, weight[whole:].reshape(-1)])


@functools.cache
def load_library() -> dict[torch.dtype, ctypes._CFuncPtr] | None:
    """The step functions by dtype, built once per process (and once per machine, cached on disk);
    None where they cannot be built."""
    lib = native.load(SOURCE, "decode steps run module by module")
    if lib is None:
        return None
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    fns = {}
    for dtype, name in FUNCTIONS.items():
        fn = getattr(lib, name)
        fn.argtypes = ([pointer, pointer, i64, i64, pointer, pointer, pointer, i64, pointer, pointer, pointer, i64, pointer, i64, i64, i64, i64,
                        pointer] + [i64] * 6 + [ctypes.c_float, ctypes.c_float])
        fn.restype = ctypes.c_int
        fns[dtype] = fn
    return fns


def plain_weight(linear: nn.Module) -> torch.Tensor | None:
    """A float linear layer's [out, in] weight, plain and row-major (a packed one unpacked); None for
    any other kind of layer (int4, tensor-parallel shards)."""
    if type(linear) is nn.Linear and type(linear.weight) is nn.Parameter:
        return linear.weight.detach().contiguous()
    if isinstance(linear, PackedLinear):
        return (linear.plain if linear.plain is not None else linear.packed.to_dense()).contiguous()
    return None


def _bias(linear: nn.Module) -> torch.Tensor | None:
    bias = linear.bias
    return None if bias is None else bias.detach().contiguous()


def _fused(module: nn.Module, fused: str, parts: tuple[str, ...]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(weight, bias) of ``module``'s fused product ``fused`` where it has one, else its ``parts`` stacked."""
    product = getattr(module, fused, None)
    if product is not None:
        weight = plain_weight(product)
        return (None, None) if weight is None else (weight, _bias(product))
    linears = [getattr(module, part) for part in parts]
    weights = [plain_weight(lin) for lin in linears]
    if any(w is None for w in weights):
        return None, None
    biases = [_bias(lin) for lin in linears]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        return None, None
    return torch.cat(weights), None if biases[0] is None else torch.cat(biases)


def _unsupported(model, pool: KVPool) -> str | None:
    """Why the step cannot run ``model`` over ``pool``; None when it can."""
    mc = model.config
    if model.device.type != "cpu" or model.dtype not in FUNCTIONS:
        return f"{model.dtype} on {model.device}"
    if mc.norm != "rmsnorm" or mc.activation != "swiglu" or pool.pooled or mc.head_dim % 2:
        return "not an RMSNorm/SwiGLU model without compressed layers"
    if type(model.model.embed_tokens) is not nn.Embedding or not isinstance(model.model.norm, RMSNorm):
        return "its embedding is not a plain table or its final norm not an RMSNorm"
    for layer in model.model.layers:
        attn, ffn = layer.self_attn, layer.mlp
        if not (isinstance(attn, Attention) and attn.kind in ("global", "local")):
            return "a hybrid attention layer"
        if not (isinstance(ffn, DenseFFN) and not isinstance(ffn, TopKFFN) and ffn.gated):
            return "a Top-K FFN layer"
        if not (isinstance(layer.input_layernorm, RMSNorm) and isinstance(layer.post_attention_layernorm, RMSNorm)):
            return "a norm other than RMSNorm"
    return None


class DecodeStep:
    """The step of one sequence: :meth:`__call__` returns its next-token logits [1, V] in the model's
    dtype and writes the new token's K/V into the pool. Built by :meth:`build`."""

    def __init__(self, fn, model, pool: KVPool, layers: torch.Tensor, kinds: torch.Tensor, keep: list[torch.Tensor],
                 head: torch.Tensor) -> None:
        mc = model.config
        self._fn, self.pool, self.rotary, self.dtype = fn, pool, model.rotary, model.dtype
        self._layers, self._kinds, self._keep = layers, kinds, keep  # keep: the tensors the pointers point into
        self._embed = model.model.embed_tokens.weight.detach()
        self._final = model.model.norm.weight.detach().contiguous()
        self._head = head
        self.vocab = mc.vocab_size
        self._dims = (mc.hidden_size, mc.num_heads, mc.num_kv_heads, mc.head_dim, mc.intermediate_size, pool.block_size)
        self._eps, self._scale = float(mc.norm_eps), mc.head_dim**-0.5
        self._cos = self._sin = torch.empty(0, mc.head_dim, dtype=model.dtype)

    @classmethod
    def build(cls, model, pool: KVPool) -> DecodeStep | None:
        """The step over ``model``'s weights and ``pool``, or None where it does not apply (see the
        module docstring) or cannot be built."""
        if _unsupported(model, pool) is not None:
            return None
        fns = load_library()
        if fns is None:
            return None
        mc = model.config
        d, f, heads = mc.hidden_size, mc.intermediate_size, mc.num_heads * mc.head_dim
        shapes = ((heads + 2 * mc.num_kv_heads * mc.head_dim, d), (d, heads), (2 * f, d), (d, f))
        if any(n % CHUNK for n in (d, f, heads)):
            return None
        keep: list[torch.Tensor] = []
        rows = []
        for i, layer in enumerate(model.model.layers):
            attn, ffn = layer.self_attn, layer.mlp
            qkv, qkv_bias = _fused(attn, "qkv_proj", ("q_proj", "k_proj", "v_proj"))
            gate_up, _ = _fused(ffn, "gate_up_proj", ("gate_proj", "up_proj"))
            o, down = plain_weight(attn.o_proj), plain_weight(ffn.down_proj)
            if qkv is None or gate_up is None or o is None or down is None or _bias(attn.o_proj) is not None:
                return None
            # the whole layer's shapes: a shard of one (tensor parallelism) is not a model the step can run
            if (qkv.shape, o.shape, gate_up.shape, down.shape) != shapes:
                return None
            tensors = [layer.input_layernorm.weight.detach().contiguous(), interleave(qkv), qkv_bias, interleave(o),
                       layer.post_attention_layernorm.weight.detach().contiguous(), interleave(gate_up[:f]), interleave(gate_up[f:]),
                       interleave(down), pool.k[i], pool.v[i]]
            if any(t is not None and t.dtype != model.dtype for t in tensors):
                return None
            keep += [t for t in tensors if t is not None]
            rows.append([0 if t is None else t.data_ptr() for t in tensors])
        head = model.model.embed_tokens.weight.detach() if model.config.tie_embeddings else plain_weight(model.lm_head)
        if head is None or head.shape != (mc.vocab_size, d) or head.dtype != model.dtype or getattr(model.lm_head, "bias", None) is not None:
            return None
        kinds = torch.tensor([[pool.groups[i], int(layer.self_attn.kind == "local")] for i, layer in enumerate(model.model.layers)], dtype=torch.int64)
        return cls(fns[model.dtype], model, pool, torch.tensor(rows, dtype=torch.int64), kinds, keep, interleave(head))

    def _rotation(self, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [1, D] of position ``pos``, as the model's rotary embedding gives them: rows of a
        table computed once for a range of positions (dynamic scaling's frequencies depend on the
        position itself, so it is asked each time)."""
        if self.rotary.scaling is not None and self.rotary.scaling.type == "dynamic":
            return self.rotary(torch.tensor([pos]), self.dtype)
        if pos >= self._cos.shape[0]:
            self._cos, self._sin = self.rotary(torch.arange(2 * pos + 64), self.dtype)
        return self._cos[pos : pos + 1], self._sin[pos : pos + 1]

    def __call__(self, seq: Sequence, window_table: list[int] | None = None) -> torch.Tensor:
        """Logits [1, V] of ``seq``'s next token, from its token at position ``num_computed_tokens``
        (whose K/V this writes); ``window_table``: its table of the pool's window group, if any."""
        pos, bs = seq.num_computed_tokens, self.pool.block_size
        token = seq.token_ids[pos]
        if not 0 <= token < self._embed.shape[0]:
            raise ValueError(f"token id {token} is outside the model's vocabulary of {self._embed.shape[0]}")
        cos, sin = self._rotation(pos)
        table0 = torch.tensor(seq.block_table, dtype=torch.int64)
        slot0 = seq.block_table[pos // bs] * bs + pos % bs
        table1, slot1 = None, 0
        if window_table is not None:
            table1 = torch.tensor(window_table, dtype=torch.int64)
            slot1 = window_table[pos // bs] * bs + pos % bs
        logits = torch.empty(1, self.vocab, dtype=self.dtype)
        status = self._fn(
            self._layers.data_ptr(), self._kinds.data_ptr(), self._kinds.shape[0], token, self._embed.data_ptr(), self._final.data_ptr(),
            self._head.data_ptr(), self.vocab, cos.data_ptr(), sin.data_ptr(), table0.data_ptr(), slot0,
            None if table1 is None else table1.data_ptr(), slot1, pos + 1, 0, window_start(pos, seq.window), logits.data_ptr(),
            *self._dims, self._eps, self._scale,
        )
        if status:
            raise RuntimeError(f"decode step failed (status {status}: {STATUS.get(status, 'unknown')})")
        return logits
