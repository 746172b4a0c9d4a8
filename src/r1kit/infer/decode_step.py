"""A decode step of a batch of sequences through the whole model in one C call (``csrc/decode_step.c``).

A thin, deep model decoding a few sequences spends much of a step between its products: the Python
of each layer's modules, a dispatch per small operation, a thread wake-up per oneDNN call, the cache
view's per-step tensors. :class:`DecodeStep` runs the step (embedding rows, every layer's norm, fused
q/k/v product, rotary, K/V write, attention over the paged pool, output product, norm, fused
gate/up product with SiLU, down product, residual adds; then the final norm and the output head)
in one call and one OpenMP region, streaming each weight once for up to eight sequences.

It covers the dense models the engine packs: RMSNorm, SwiGLU, global and local attention (no hybrid
or Top-K layer), float32 or bfloat16 activations on the CPU, widths that are multiples of 16. Each
product (q/k/v, output, gate/up, down, the head) is float or GPTQ 4-/8-bit, whatever mix the model
holds: a quantized product runs the very tiles of r1kit's int4 or int8 CPU kernel over the kernel's own
packed weights (no copy), so its results are the module path's to the bit. Float products run over the
step's own copy of the weights in its layout (:func:`interleave`: panels of 16 rows, transposed, so a
step multiplies one vector of 16 weights by each sequence's input broadcast), so a float model is held
twice (``EngineConfig.decode_step=False`` trades the step for that memory). Float results match the
module path to within float rounding (the sums run in another order): greedy tokens equal the
reference's, which ``tests/test_decode_step.py`` checks against the eager model. Every sum runs in one
order whatever the batch, so a sequence's logits are the same bits alone or among others.

It never decides when it runs: :class:`~r1kit.infer.model_runner.ModelRunner` calls it for steps of
decodes alone, up to :data:`MAX_BATCH` sequences.
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
from r1kit.quant.cpu_int4 import Int4CpuKernel
from r1kit.quant.cpu_int8 import Int8CpuKernel
from r1kit.quant.int4.cpu_kernel import CpuKernelState

SOURCE = Path(__file__).parent / "csrc" / "decode_step.c"
FUNCTIONS = {torch.float32: "decode_step_f32", torch.bfloat16: "decode_step_bf16"}
STATUS = {1: "bad head grouping or odd head dim", 2: "out of memory"}
PANEL = 16  # the kernel's float weight layout: panels of PANEL rows, transposed
CHUNK = 16  # every width the step takes is a multiple of it (its SwiGLU runs 16 neurons at a time)
FLOAT, INT4, INT8 = 0, 4, 8  # a product's kind: the C file's enum
QUANT_TILE = 32  # output columns per tile of the int4/int8 kernels
MAX_BATCH = 16  # the most sequences a step runs: past it oneDNN's compute-bound matrix products (bfloat16's first) catch up


def interleave(weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``weight`` [out, in] in the kernel's layout, as a 1-D tensor (``out``, of ``weight.numel()``
    elements, where given): each panel of PANEL rows transposed, so that for each input feature the
    panel's PANEL weights lie side by side (one vector of outputs) and a panel is one stream of memory;
    the last ``out % PANEL`` rows follow, plain."""
    rows, cols = weight.shape
    whole = rows - rows % PANEL
    out = torch.empty(weight.numel(), dtype=weight.dtype) if out is None else out
    out[: whole * cols].view(whole // PANEL, cols, PANEL).copy_(weight[:whole].reshape(whole // PANEL, PANEL, cols).transpose(1, 2))
    out[whole * cols :].copy_(weight[whole:].reshape(-1))
    return out


@functools.cache
def load_library() -> dict | None:
    """The step functions by dtype (and under ``"int4"`` whether they run int4 products), built once
    per process (and once per machine, cached on disk); None where they cannot be built."""
    lib = native.load(SOURCE, "decode steps run module by module")
    if lib is None:
        return None
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    fns: dict = {"int4": bool(lib.decode_step_int4())}
    for dtype, name in FUNCTIONS.items():
        fn = getattr(lib, name)
        fn.argtypes = ([pointer, pointer, i64, i64, pointer, pointer, pointer, pointer, i64, pointer, pointer, pointer, i64, pointer, i64, pointer]
                       + [i64] * 6 + [ctypes.c_float, ctypes.c_float])
        fn.restype = ctypes.c_int
        fns[dtype] = fn
    return fns


def plain_weight(linear: nn.Module) -> torch.Tensor | None:
    """A float linear layer's [out, in] weight, plain and row-major (a packed one unpacked; an embedding
    table, for a tied head); None for any other kind of layer (GPTQ, tensor-parallel shards)."""
    if type(linear) in (nn.Linear, nn.Embedding) and type(linear.weight) is nn.Parameter:
        return linear.weight.detach().contiguous()
    if isinstance(linear, PackedLinear):
        return (linear.plain if linear.plain is not None else linear.packed.to_dense()).contiguous()
    return None


class Product:
    """One product as the C step reads it: ``fields`` (kind, weight, scales and zeros, input order,
    group, float32 bias: pointers as integers, 0 for none) over the tensors in ``keep``, for an
    ``out_features`` x ``in_features`` weight. A float product's weight is ``source`` until
    :meth:`place` lays it out in the step's own memory."""

    def __init__(self, kind: int, weight: torch.Tensor, scale_zero: torch.Tensor | None, order: torch.Tensor | None, group: int,
                 bias: torch.Tensor | None, in_features: int, out_features: int) -> None:
        self.source = weight if kind == FLOAT else None
        self.keep = [t for t in (None if kind == FLOAT else weight, scale_zero, order, bias) if t is not None]
        pointer = lambda t: 0 if t is None else t.data_ptr()
        self.fields = [kind, pointer(None if kind == FLOAT else weight), pointer(scale_zero), pointer(order), group, pointer(bias)]
        self.in_features, self.out_features = in_features, out_features

    def place(self, memory: torch.Tensor) -> None:
        """Lay the float weight out (:func:`interleave`) in ``memory`` (1-D, its size) and point at it there."""
        interleave(self.source, memory)
        self.keep.append(memory)
        self.fields[1], self.source = memory.data_ptr(), None


def _float_bias(linears: list[nn.Module]) -> torch.Tensor | None | bool:
    """The linears' biases concatenated as float32, None where none has one, False where only some do."""
    biases = [getattr(lin, "bias", None) for lin in linears]
    if all(b is None for b in biases):
        return None
    if any(b is None for b in biases):
        return False
    return torch.cat([b.detach().float().reshape(-1) for b in biases]).contiguous()


def _kernel_state(linear: nn.Module) -> CpuKernelState | None:
    """The r1kit CPU kernel state (int4 or int8 codes in the kernel's layout) a GPTQ layer runs on, or None."""
    from r1kit.quant.int4 import choose
    from r1kit.quant.int4_linear import FusedInt4Linear, QuantLinear

    if isinstance(linear, FusedInt4Linear):
        state = linear.state
    elif type(linear) is QuantLinear and linear.backend in ("auto", "kernel") and linear.qweight.device.type == "cpu":
        backend = choose.cpu_kernel_for(linear, linear.qweight.device)
        state = None if backend is None else linear.prepared(backend.prepare)
    else:
        return None
    return state if isinstance(state, CpuKernelState) else None


def _quant_product(linears: list[nn.Module], int4: bool) -> Product | None:
    """The linears (over one input) as one quantized product: their kernel states' tiles one after
    another (the layout is tile-major), or None where they are not all on one kernel with one grouping."""
    states = [_kernel_state(lin) for lin in linears]
    if any(st is None for st in states):
        return None
    kinds = {INT4 if isinstance(st.kernel, Int4CpuKernel) else INT8 if isinstance(st.kernel, Int8CpuKernel) else None for st in states}
    first = states[0].packed
    same = all(st.packed.group == first.group and st.packed.in_features == first.in_features
               and (st.packed.order is None) == (first.order is None)
               and (first.order is None or torch.equal(st.packed.order, first.order)) for st in states)
    if len(kinds) != 1 or None in kinds or not same or (INT4 in kinds and not int4):
        return None
    bias = _float_bias(states)
    if bias is False:
        return None
    weight = states[0].packed.weight if len(states) == 1 else torch.cat([st.packed.weight for st in states])
    scale_zero = states[0].packed.scale_zero if len(states) == 1 else torch.cat([st.packed.scale_zero for st in states])
    return Product(kinds.pop(), weight, scale_zero, first.order, first.group, bias, first.in_features, sum(st.packed.out_features for st in states))


def _product(module: nn.Module, fused: str | None, parts: tuple[str, ...], dtype: torch.dtype, int4: bool) -> Product | None:
    """``module``'s product ``fused`` where it has one, else its ``parts`` stacked by output, as a float
    or a quantized :class:`Product`; None where the step cannot run it."""
    product = getattr(module, fused, None) if fused else None
    linears = [product] if product is not None else [getattr(module, part) for part in parts]
    if any(lin is None for lin in linears):
        return None
    weights = [plain_weight(lin) for lin in linears]
    if any(w is None for w in weights):
        return _quant_product(linears, int4)
    bias = _float_bias(linears)
    weight = torch.cat(weights) if len(weights) > 1 else weights[0]
    if bias is False or weight.dtype != dtype or weight.shape[1] % CHUNK:
        return None
    return Product(FLOAT, weight, None, None, 0, bias, weight.shape[1], weight.shape[0])


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
    """The step of a batch of sequences: :meth:`__call__` returns their next-token logits [B, V] (float32
    holding values of the model's dtype) and writes the new tokens' K/V into the pool. Built by :meth:`build`."""

    def __init__(self, fn, model, pool: KVPool, layers: torch.Tensor, kinds: torch.Tensor, keep: list[torch.Tensor],
                 head: Product) -> None:
        mc = model.config
        self._fn, self.pool, self.rotary, self.dtype = fn, pool, model.rotary, model.dtype
        self._layers, self._kinds, self._keep = layers, kinds, keep  # keep: the tensors the pointers point into
        self._embed = model.model.embed_tokens.weight.detach()
        self._final = model.model.norm.weight.detach().contiguous()
        self._head, self._head_fields = head, torch.tensor(head.fields, dtype=torch.int64)
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
        mc, dtype, int4 = model.config, model.dtype, fns["int4"]
        d, f, heads = mc.hidden_size, mc.intermediate_size, mc.num_heads * mc.head_dim
        if any(n % CHUNK for n in (d, f, heads)):
            return None
        # (in, out) of each product of a whole layer: a shard of one (tensor parallelism) is not a model the step can run
        shapes = ((d, heads + 2 * mc.num_kv_heads * mc.head_dim), (heads, d), (d, 2 * f), (f, d))
        keep: list[torch.Tensor] = []
        layers = []
        for i, layer in enumerate(model.model.layers):
            attn, ffn = layer.self_attn, layer.mlp
            products = [_product(attn, "qkv_proj", ("q_proj", "k_proj", "v_proj"), dtype, int4), _product(attn, None, ("o_proj",), dtype, int4),
                        _product(ffn, "gate_up_proj", ("gate_proj", "up_proj"), dtype, int4), _product(ffn, None, ("down_proj",), dtype, int4)]
            if any(pr is None or (pr.in_features, pr.out_features) != shape for pr, shape in zip(products, shapes)):
                return None
            # the C step adds no bias after the output, gate/up and down products; a quantized gate/up
            # splits into whole tiles of gate rows and of up rows (every packed product is whole tiles)
            if any(pr.fields[5] for pr in products[1:]) or (products[2].fields[0] != FLOAT and f % QUANT_TILE):
                return None
            norms = [layer.input_layernorm.weight.detach().contiguous(), layer.post_attention_layernorm.weight.detach().contiguous()]
            if any(t.dtype != dtype for t in (*norms, pool.k[i], pool.v[i])):
                return None
            keep += norms
            layers.append(([t.data_ptr() for t in (*norms, pool.k[i], pool.v[i])], products))
        head = _product(model.model, None, ("embed_tokens",), dtype, int4) if mc.tie_embeddings else _product(model, None, ("lm_head",), dtype, int4)
        if head is None or (head.in_features, head.out_features) != (d, mc.vocab_size) or head.fields[5]:
            return None
        floats = [pr for _, products in layers for pr in products if pr.source is not None] + ([head] if head.source is not None else [])
        if floats:
            # one block for every float weight the step reads, in large pages where the kernel gives them:
            # a token streams through all of it, and the hardware prefetchers stop at every page's end
            memory = native.huge_empty(sum(pr.source.numel() for pr in floats), dtype)
            offset = 0
            for pr in floats:
                size = pr.source.numel()
                pr.place(memory[offset : offset + size])
                offset += size
        rows = []
        for pointers, products in layers:
            keep += [t for pr in products for t in pr.keep]
            rows.append(pointers + [x for pr in products for x in pr.fields])
        kinds = torch.tensor([[pool.groups[i], int(layer.self_attn.kind == "local")] for i, layer in enumerate(model.model.layers)], dtype=torch.int64)
        return cls(fns[dtype], model, pool, torch.tensor(rows, dtype=torch.int64), kinds, keep, head)

    def _rotation(self, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [len(positions), D], as the model's rotary embedding gives them: rows of a table
        computed once for a range of positions (dynamic scaling's frequencies depend on the position
        itself, so it is asked for each)."""
        if self.rotary.scaling is not None and self.rotary.scaling.type == "dynamic":
            pairs = [self.rotary(torch.tensor([pos]), self.dtype) for pos in positions]
            return torch.cat([c for c, _ in pairs]), torch.cat([sn for _, sn in pairs])
        if max(positions) >= self._cos.shape[0]:
            self._cos, self._sin = self.rotary(torch.arange(2 * max(positions) + 64), self.dtype)
        index = torch.tensor(positions)
        return self._cos[index], self._sin[index]

    def __call__(self, seqs: list[Sequence], window_tables: list[list[int]] | None = None) -> torch.Tensor:
        """Logits [len(seqs), V] of each sequence's next token, from its token at position
        ``num_computed_tokens`` (whose K/V this writes); ``window_tables``: each sequence's table in the
        pool's window group, if the pool has one."""
        bs, fields, positions = self.pool.block_size, [], []
        for i, seq in enumerate(seqs):
            pos = seq.num_computed_tokens
            token = seq.token_ids[pos]
            if not 0 <= token < self._embed.shape[0]:
                raise ValueError(f"token id {token} is outside the model's vocabulary of {self._embed.shape[0]}")
            slot1 = 0 if window_tables is None else window_tables[i][pos // bs] * bs + pos % bs
            fields.append([token, pos + 1, 0, window_start(pos, seq.window), seq.block_table[pos // bs] * bs + pos % bs, slot1])
            positions.append(pos)
        cos, sin = self._rotation(positions)
        rows = torch.tensor(fields, dtype=torch.int64)  # named: a temporary's memory is freed before the call reads it
        table0 = _padded([seq.block_table for seq in seqs])
        table1 = None if window_tables is None else _padded(window_tables)
        logits = torch.empty(len(seqs), self.vocab)  # float32, rounded to the model's dtype: the sampler reads float32
        status = self._fn(
            self._layers.data_ptr(), self._kinds.data_ptr(), self._kinds.shape[0], len(seqs), rows.data_ptr(),
            self._embed.data_ptr(), self._final.data_ptr(), self._head_fields.data_ptr(), self.vocab, cos.data_ptr(), sin.data_ptr(),
            table0.data_ptr(), table0.shape[1], None if table1 is None else table1.data_ptr(), 0 if table1 is None else table1.shape[1],
            logits.data_ptr(), *self._dims, self._eps, self._scale,
        )
        if status:
            raise RuntimeError(f"decode step failed (status {status}: {STATUS.get(status, 'unknown')})")
        return logits


def _padded(tables: list[list[int]]) -> torch.Tensor:
    """Block tables as the rows of one int64 tensor, each padded to the longest (the step never reads
    a table past a sequence's context)."""
    width = max(len(t) for t in tables)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64)
