"""The Triton kernel's hybrid call (compressed and full global branch, the hard gate's skip) compiled for
GPUs; its results are checked under Triton's interpreter by ``triton_interpreted_hybrid.py`` (run by
``test_quant_triton.py``)."""

from pathlib import Path

import pytest


HERE = Path(__file__).parent


def test_triton_hybrid_kernel_compiles_for_a_gpu():
    """Lowered to PTX and assembled by Triton's bundled ptxas for H100/H200 (no GPU needed): the
    branch on the skip flag and the second range must build, within the architecture's shared memory."""
    triton = pytest.importorskip("triton")
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton has no NVIDIA backend")
    from test_triton_compile import TARGETS, compile_for

    from r1kit.infer.triton_decode_attention import BLOCK_N, paged_decode_hybrid

    ranges = {f"{p}{name}": kind for p in ("", "g") for name, kind in
              (("k_ptr", "*bf16"), ("v_ptr", "*bf16"), ("tables_ptr", "*i64"), ("contexts_ptr", "*i64"), ("lowest_ptr", "*i64"))}
    sizes = dict.fromkeys(("table_width", "block_size", "stride_ks", "stride_kh", "gtable_width", "gblock_size", "stride_gs", "stride_gh"), "i32")
    signature = {"q_ptr": "*bf16", "out_ptr": "*bf16", "gate_ptr": "*fp32", "skip_ptr": "*i64", "scale": "fp32", **ranges, **sizes,
                 **dict.fromkeys(("GROUP", "GROUP_PAD", "DIM", "DIM_PAD", "BLOCK"), "constexpr")}
    signature = {name: signature[name] for name in paged_decode_hybrid.arg_names}  # in the kernel's argument order
    capability, shared_limit = TARGETS["H100/H200 (sm_90)"]
    kernel = compile_for(paged_decode_hybrid, signature, {"GROUP": 3, "GROUP_PAD": 16, "DIM": 128, "DIM_PAD": 128, "BLOCK": BLOCK_N}, capability)
    assert kernel.asm["cubin"] and kernel.metadata.shared <= shared_limit
