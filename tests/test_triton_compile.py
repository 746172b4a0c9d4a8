"""The Triton kernels compiled for real GPUs, on a machine without one: Triton lowers them to PTX and
its bundled ``ptxas`` assembles machine code for the named architectures (A100 and H100/H200), so a
kernel that the interpreter runs but the GPU compiler rejects (a layout, a reshape, shared memory
over the architecture's limit) fails here rather than on the first GPU run."""

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from r1kit.infer.triton_decode_attention import BLOCK_N, paged_decode  # noqa: E402

if "nvidia" not in triton.backends.backends:
    pytest.skip("this triton has no NVIDIA backend", allow_module_level=True)

from r1kit.quant import triton_int4  # noqa: E402

# (compute capability, shared memory a block may use) of the GPUs the engine is meant for
TARGETS = {"A100 (sm_80)": (80, 163 * 1024), "H100/H200 (sm_90)": (90, 227 * 1024)}
DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def compile_for(fn, signature: dict, constexprs: dict, capability: int, num_warps: int = 4):
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": num_warps})


def compile_small(capability: int, dtype: torch.dtype, tiles, tile_group: int):
    kind, atomic = DTYPES[dtype], tiles.split_k > 1
    signature = {
        "x_ptr": f"*{kind}", "qweight_ptr": "*i32", "qzeros_ptr": "*i32", "scales_ptr": "*fp16", "g_idx_ptr": "*i32",
        "out_ptr": "*fp32" if atomic else f"*{kind}", "M": "i32", "N": "i32", "K": "i32", "zero_offset": "i32", "k_per_split": "i32",
        "stride_xm": "i32", **dict.fromkeys(("BLOCK_M", "BLOCK_N", "BLOCK_K", "TILE_GROUP", "HALF", "IEEE", "ATOMIC"), "constexpr"),
    }
    constexprs = {"BLOCK_M": tiles.block_m, "BLOCK_N": tiles.block_n, "BLOCK_K": tiles.block_k, "TILE_GROUP": tile_group,
                  "HALF": dtype == torch.float16, "IEEE": dtype == torch.float32, "ATOMIC": atomic}
    return compile_for(triton_int4._int4_matmul_small, signature, constexprs, capability, tiles.num_warps)


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("rows", [1, 16])
def test_int4_matmul_compiles_and_its_default_shape_fits_every_target(target, dtype, rows):
    capability, shared_limit = TARGETS[target]
    default = triton_int4.default_tiles(rows)
    for tile_group in (0, 128):  # act-order (g_idx gathers) and contiguous groups (one scale vector a tile)
        kernel = compile_small(capability, dtype, default, tile_group)
        assert kernel.asm["cubin"] and kernel.metadata.shared <= shared_limit
    # the largest candidate the tile chooser times, split-K (float32 atomics) included
    largest = max(triton_int4.candidate_tiles(rows, 4096), key=lambda t: (t.block_n * t.block_k, t.split_k))
    assert largest.split_k > 1
    assert compile_small(capability, dtype, largest, 0).asm["cubin"]


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_int4_dequantize_compiles(dtype):
    signature = {"qweight_ptr": "*i32", "qzeros_ptr": "*i32", "scales_ptr": "*fp16", "g_idx_ptr": "*i32", "w_ptr": f"*{DTYPES[dtype]}",
                 "N": "i32", "K": "i32", "zero_offset": "i32", "BLOCK_K": "constexpr", "BLOCK_N": "constexpr"}
    kernel = compile_for(triton_int4._int4_dequantize, signature, {"BLOCK_K": 64, "BLOCK_N": 64}, 90)
    assert kernel.asm["cubin"]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("group,dim", [(1, 64), (4, 128), (7, 80)])
def test_paged_decode_attention_compiles(dtype, group, dim):
    kind = DTYPES[dtype]
    signature = {"q_ptr": f"*{kind}", "k_ptr": f"*{kind}", "v_ptr": f"*{kind}", "out_ptr": f"*{kind}", "tables_ptr": "*i64",
                 "contexts_ptr": "*i64", "lowest_ptr": "*i64", "table_width": "i32", "block_size": "i32", "scale": "fp32",
                 "stride_ks": "i32", "stride_kh": "i32", **dict.fromkeys(("GROUP", "GROUP_PAD", "DIM", "DIM_PAD", "BLOCK"), "constexpr")}
    constexprs = {"GROUP": group, "GROUP_PAD": max(16, triton.next_power_of_2(group)), "DIM": dim,
                  "DIM_PAD": max(16, triton.next_power_of_2(dim)), "BLOCK": BLOCK_N}
    for capability, shared_limit in TARGETS.values():
        kernel = compile_for(paged_decode, signature, constexprs, capability)
        assert kernel.asm["cubin"] and kernel.metadata.shared <= shared_limit


def test_fused_kernels_compile():
    """r1kit.fused's kernels (residual + norm, SwiGLU, up projection + GELU) for H100/H200 in bfloat16
    (a global the interpreter reads but the compiler refuses fails here), and the up projection's
    largest tile, in float32, within the A100's shared memory."""
    from r1kit.fused import linear_gelu, residual_norm, swiglu

    bf16 = "*bf16"
    norm_flags = dict.fromkeys(("RMS", "HAS_BIAS"), False)
    forward = {**dict.fromkeys(("x_ptr", "delta_ptr", "w_ptr", "b_ptr", "h_ptr", "y_ptr"), bf16), "mean_ptr": "*fp32", "rstd_ptr": "*fp32",
               **dict.fromkeys(("D", "stride_x", "stride_delta", "stride_h", "stride_y"), "i32"), "eps": "fp32",
               **dict.fromkeys(("BLOCK_D", "RMS", "HAS_DELTA", "HAS_BIAS"), "constexpr")}
    backward = {**dict.fromkeys(("dy_ptr", "dh_out_ptr", "h_ptr", "w_ptr", "dh_ptr"), bf16), **dict.fromkeys(("mean_ptr", "rstd_ptr", "dw_ptr", "db_ptr"), "*fp32"),
                **dict.fromkeys(("rows", "D", "rows_per_program", "stride_dy", "stride_dh_out", "stride_h", "stride_dh"), "i32"),
                **dict.fromkeys(("BLOCK_D", "RMS", "HAS_DH_OUT", "HAS_BIAS"), "constexpr")}
    gates = {**dict.fromkeys(("gate_ptr", "up_ptr", "h_ptr"), bf16), **dict.fromkeys(("F", "stride_gate", "stride_up", "stride_h"), "i32"), "BLOCK": "constexpr"}
    gates_back = {**dict.fromkeys(("dh_ptr", "gate_ptr", "up_ptr", "dgate_ptr", "dup_ptr"), bf16),
                  **dict.fromkeys(("F", "stride_dh", "stride_gate", "stride_up"), "i32"), "BLOCK": "constexpr"}
    capability = TARGETS["H100/H200 (sm_90)"][0]
    assert compile_for(residual_norm._add_norm_forward, forward, {"BLOCK_D": 4096, "HAS_DELTA": True, **norm_flags}, capability, 16).asm["cubin"]
    assert compile_for(residual_norm._add_norm_backward, backward, {"BLOCK_D": 4096, "HAS_DH_OUT": True, **norm_flags}, capability, 16).asm["cubin"]
    assert compile_for(swiglu._swiglu_forward, gates, {"BLOCK": swiglu.BLOCK}, capability).asm["cubin"]
    assert compile_for(swiglu._swiglu_backward, gates_back, {"BLOCK": swiglu.BLOCK}, capability).asm["cubin"]

    def up_gelu(kind, rows, capability):
        tiles = linear_gelu._tiles(rows, torch.float32 if kind == "fp32" else torch.bfloat16)
        warps, stages = tiles.pop("num_warps"), tiles.pop("num_stages")
        signature = {**dict.fromkeys(("x_ptr", "w_ptr", "y_ptr", "u_ptr"), f"*{kind}"), **dict.fromkeys(("M", "N", "K", "stride_xm", "stride_wn", "stride_ym"), "i32"),
                     **dict.fromkeys(("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "IEEE", "STORE_U"), "constexpr")}
        return triton.compile(ASTSource(fn=linear_gelu._linear_gelu, signature=signature,
                                        constexprs={**tiles, "GROUP_M": 8, "IEEE": kind == "fp32", "STORE_U": True}),
                              target=GPUTarget("cuda", capability, 32), options={"num_warps": warps, "num_stages": stages})

    assert up_gelu("bf16", 16, capability).asm["cubin"]  # a decode step's rows
    capability, shared_limit = TARGETS["A100 (sm_80)"]
    kernel = up_gelu("fp32", 4096, capability)
    assert kernel.asm["cubin"] and kernel.metadata.shared <= shared_limit
