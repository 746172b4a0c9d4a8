"""The Triton int4 kernel on the CPU under Triton's interpreter, against the dequantize reference.

Run by ``test_quant_triton.py`` in a subprocess with ``TRITON_INTERPRET=1`` (Triton reads it when a
kernel is defined, so it must be set before ``r1kit.quant.triton_int4`` is imported). The kernel code
is the one a GPU runs; only its execution is emulated.
"""

import os

import pytest
import torch
from test_quant_helpers import trained_model
from test_quant_packing import random_int4
from test_quant_triton import RTOL

from r1kit.infer.generate import generate
from r1kit.infer.sampling import SamplingParams
from r1kit.quant import QuantConfig, quantize_model, to_int4
from r1kit.quant.int4_linear import Int4Linear

assert os.environ.get("TRITON_INTERPRET") == "1", "run through test_quant_triton.py (TRITON_INTERPRET=1)"



@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "in_f,out_f,group_size,act_order,bias,rows",
    [(128, 64, 128, False, False, 1), (256, 48, 32, False, True, 5), (200, 24, -1, False, False, 17),
     (256, 72, 64, True, False, 40), (128, 16, 128, True, True, 3)],
)
def test_triton_matches_dequantized_reference(dtype, in_f, out_f, group_size, act_order, bias, rows):
    layer = random_int4(in_f, out_f, group_size, act_order, bias).to(dtype)
    x = torch.randn(rows, in_f).to(dtype)
    ref = torch.nn.functional.linear(x.float(), layer.dequantized_weight(torch.float32), None if layer.bias is None else layer.bias.float())
    layer.backend = "triton"
    out = layer(x)
    assert out.dtype == dtype and out.shape == (rows, out_f)
    assert (out.float() - ref).abs().max() <= RTOL[dtype] * ref.abs().max()


def test_triton_model_generates_as_the_reference():
    model = trained_model()
    qc = QuantConfig(group_size=64, method="rtn")
    to_int4(model, quantize_model(model, qc), qc)
    prompt = [3, 17, 5, 9]
    params = SamplingParams(temperature=0, max_tokens=6)
    for m in model.modules():
        if isinstance(m, Int4Linear):
            m.backend = "dequant"
    expected = generate(model, prompt, params)
    for m in model.modules():
        if isinstance(m, Int4Linear):
            m.backend = "triton"
    assert generate(model, prompt, params) == expected
