#!/usr/bin/env bash
# The CUDA checks, for a machine with a GPU: the device-parametrized tests (`-k cuda`, skipped on
# machines without one) and the multi-process training tests there (gloo on a GPU machine), then the
# GPU benchmarks: the int4 Triton kernels vs cuBLAS float16 (contiguous groups and act-order), and
# the engine vs transformers in bfloat16 with a profile of its decode step.
# With two GPUs or more, tensor-parallel inference over two of them (NCCL): its parity test and
# benchmarks/bench_tp.py (bfloat16; the single-GPU engine against two ranks).
# Each step has its own time limit, so one that hangs does not cost the others.
# Usage: benchmarks/cuda_check.sh [OUTDIR]   (r1kit importable: installed, or PYTHONPATH=src)
set -u
out=${1:-cuda-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__)"
timeout 150 python3 -m pytest -q -p no:cacheprovider -rfs -k cuda tests/test_attention.py tests/test_engine.py tests/test_hf_parity.py tests/test_train.py \
    tests/test_quant_gptq.py tests/test_quant_checkpoint.py tests/test_quant_triton.py tests/test_triton_decode_attention.py tests/test_weight_packing.py 2>&1 | tee "$out/tests.log"
timeout 90 python3 -m pytest -q -p no:cacheprovider -rf -k "gloo or processes" tests/test_train.py 2>&1 | tee "$out/train.log"
timeout 150 python3 benchmarks/bench_int4_cuda.py 2>&1 | tee "$out/int4.log"
timeout 60 python3 benchmarks/bench_int4_cuda.py --act-order --shapes 4096x4096,14336x4096 --rows 1,16 2>&1 | tee -a "$out/int4.log"
timeout 150 python3 benchmarks/bench_engine.py --device cuda --dtype bfloat16 --models 100m --batch-sizes 1,16 --repeats 1 \
    --profile 50 2>&1 | tee "$out/engine.log"
# the fused Triton kernels (r1kit.fused): their CUDA tests (self-check, model logits and gradients, the
# engine's copy), then fused vs eager per operation and for a whole training step
timeout 120 python3 -m pytest -q -p no:cacheprovider -rfs -k cuda tests/test_fused_kernels.py 2>&1 | tee "$out/fused.log"
timeout 150 python3 benchmarks/bench_fused.py --tokens 16,8192 --layers 4 2>&1 | tee -a "$out/fused.log"
if [ "$(python3 -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    timeout 120 python3 -m pytest -q -p no:cacheprovider -rfs -k cuda tests/test_tp_inference.py 2>&1 | tee "$out/tp.log"
    timeout 240 python3 benchmarks/bench_tp.py --device cuda --dtype bfloat16 --hidden 2048 --layers 16 --vocab 32768 \
        --batch-sizes 1,16 --new-tokens 64 --threads 1 2>&1 | tee -a "$out/tp.log"
fi
