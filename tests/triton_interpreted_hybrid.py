"""The Triton decode kernel's hybrid call on the CPU under Triton's interpreter, against the naive
attention of ``test_long_context.py``, and the engine serving the guide's compressed pattern through
it. Run by ``test_quant_triton.py`` in the same subprocess as ``triton_interpreted.py`` (``TRITON_INTERPRET=1``)."""

from hypothesis import given, settings
from test_long_context import PATTERNS, assert_hybrid_matches_naive, hybrid_problems, model_of, prompts_of

from r1kit import LLM, SamplingParams
from r1kit.infer.generate import generate
from r1kit.infer.triton_decode_attention import TritonPagedDecode


@settings(max_examples=6, deadline=None)
@given(hybrid_problems())
def test_triton_hybrid_call_equals_naive_attention(problem):
    assert_hybrid_matches_naive(TritonPagedDecode(), problem)


def test_engine_serves_the_compressed_hybrid_through_the_triton_kernel(tiny_config):
    model = model_of(tiny_config, **PATTERNS["guide-compressed"], hybrid_gate_threshold=0.5)
    prompts = prompts_of([9, 5])
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    want = [generate(model, p, params) for p in prompts]
    llm = LLM(model, block_size=4, num_kv_blocks=32, decode_kernel=False)
    kernel, calls = TritonPagedDecode(), []

    class Counting:  # what a CUDA engine holds (set by hand: this is the CPU), counting the hybrid calls
        def __call__(self, *args):
            return kernel(*args)

        def hybrid(self, q, *args):
            calls.append(q.shape[0])
            return kernel.hybrid(q, *args)

    llm.llm_engine.runner.pool.decode_kernel = Counting()
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == want
    assert calls and max(calls) == 2  # both rows' hybrid layer decoded through one launch
