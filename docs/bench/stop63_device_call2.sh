#!/bin/bash
# Stop 63 call 2 (H100): the op GPU tests on main after stop 62's Python changes (the ops' finite-scale check, the
# index bounds past int32, the FP8 write fixes), fastest files first: every -m gpu op test but the CUDA KV-cache
# file (call 1) and the Triton sparse file (call 3), then the CUDA dense decode file.
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16 TORCH_EXTENSIONS_DIR=$PWD/bench/ext
SECONDS=0
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
timeout 330 python -m pytest -q -rfs -m gpu tests/ops --ignore=tests/ops/test_cuda_kv_cache.py \
  --ignore=tests/ops/test_triton_sparse.py --ignore=tests/ops/test_cuda_decode.py > $OUT/ops_tests.log 2>&1
echo "op GPU tests rc $? at ${SECONDS}s"; grep -E "passed|failed|FAILED|rror" $OUT/ops_tests.log | tail -8
timeout $((580 - SECONDS)) python -m pytest -q -rfs tests/ops/test_cuda_decode.py > $OUT/cuda_decode_tests.log 2>&1
echo "CUDA decode tests rc $? at ${SECONDS}s"; grep -E "passed|failed|FAILED|rror" $OUT/cuda_decode_tests.log | tail -8
