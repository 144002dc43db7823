#!/bin/bash
# Stop 67 call 2: the files the reference review of this stop added cases to (their GPU cases), then the GPU test
# files call 1 did not run (the CUDA dense decode, dispatch, Triton, MoE, opcheck, compile, packaging, sanitizer).
# `run` with command `bash docs/bench/stop67_device_call2.sh`.
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16 TORCH_EXTENSIONS_DIR=$PWD/bench/ext
SECONDS=0
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
python -m flashmla_ops.build > $OUT/build.log 2>&1; echo "build rc $? at ${SECONDS}s"
timeout $((330 - SECONDS)) python -m pytest -v -rf -m gpu tests/ops/test_decode.py tests/ops/test_sparse_prefill.py \
  tests/ops/test_indexer.py tests/ops/test_kv_cache.py tests/ops/test_cuda_decode.py tests/ops/test_dispatch.py \
  tests/ops/test_triton_decode.py tests/ops/test_triton_indexer.py tests/ops/test_triton_kv_cache.py \
  tests/ops/test_moe.py tests/ops/test_opcheck.py tests/ops/test_compile.py tests/ops/test_packaging.py \
  tests/ops/test_triton_sparse.py tests/ops/test_sanitizer.py > $OUT/tests.log 2>&1
echo "tests rc $? at ${SECONDS}s: $(grep -c " PASSED" $OUT/tests.log) PASSED"; grep -E "FAILED|ERROR|passed|failed" $OUT/tests.log | tail -15; grep -E " PASSED" $OUT/tests.log | tail -1
