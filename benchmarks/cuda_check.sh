#!/usr/bin/env bash
# The CUDA checks, for a machine with a GPU: the device-parametrized tests (`-k cuda`, skipped on
# machines without one), the training tests on the GPU (`device: auto` picks it), then the GPU
# benchmarks (the int4 Triton kernel vs cuBLAS float16; the engine vs transformers in bfloat16).
# Each step has its own time limit, so one that hangs does not cost the others.
# Usage: benchmarks/cuda_check.sh [OUTDIR]   (r1kit importable: installed, or PYTHONPATH=src)
#        SWEEP=1 benchmarks/cuda_check.sh     (also sweep the int4 kernel's launch shapes)
set -u
out=${1:-cuda-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__)"
timeout 150 python3 -m pytest -q -p no:cacheprovider -rfs -k cuda tests/test_engine.py tests/test_hf_parity.py tests/test_train.py \
    tests/test_quant_gptq.py tests/test_quant_checkpoint.py tests/test_quant_triton.py 2>&1 | tee "$out/tests.log"
timeout 120 python3 -m pytest -q -p no:cacheprovider -rf tests/test_train.py 2>&1 | tee "$out/train.log"
timeout 200 python3 benchmarks/bench_int4_cuda.py ${SWEEP:+--sweep} 2>&1 | tee "$out/int4.log"
timeout 150 python3 benchmarks/bench_engine.py --device cuda --dtype bfloat16 --models 100m --repeats 2 2>&1 | tee "$out/engine.log"
