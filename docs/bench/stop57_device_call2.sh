#!/bin/bash
# Stop 57, call 2: this tree's Triton decode and sparse GPU tests, the Triton SPEC rows (bench_decode.py and
# bench_sparse.py, --backend triton, each in its own process), then the rest of the GPU suite in the time left, with
# the CUDA extension built in the background meanwhile. `run` with command `bash docs/bench/stop57_device_call2.sh`.
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16 TORCH_EXTENSIONS_DIR=$PWD/bench/ext
SECONDS=0
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
(python -m flashmla_ops.build > $OUT/build.log 2>&1; echo "build rc $? at ${SECONDS}s" >> $OUT/build.log) &
# (the Triton files without -m gpu: on a GPU machine all their tests run on the GPU, and few carry the gpu mark)
timeout 240 python -m pytest -q tests/ops/test_triton_decode.py tests/ops/test_triton_sparse.py \
  > $OUT/tests_triton.log 2>&1
echo "Triton decode / sparse tests rc $? at ${SECONDS}s"
grep -E "passed|failed|FAILED|rror" $OUT/tests_triton.log | tail -8
timeout 100 python scripts/bench_decode.py --backend triton --no-baselines --settle 5 --out $OUT/decode_triton \
  > $OUT/decode_triton.log 2>&1
echo "bench_decode triton rc $? at ${SECONDS}s"; grep -E "^ *(bf16|fp8)" $OUT/decode_triton.log | head -8
timeout 130 python scripts/bench_sparse.py --backend triton --no-reference --settle 5 --out $OUT/sparse_triton \
  > $OUT/sparse_triton.log 2>&1
echo "bench_sparse triton rc $? at ${SECONDS}s"; grep -E "^ *(decode|prefill)" $OUT/sparse_triton.log | head -6
wait; tail -1 $OUT/build.log
timeout $((575 - SECONDS)) python -m pytest -q -m gpu tests --ignore=tests/ops/test_triton_decode.py \
  --ignore=tests/ops/test_triton_sparse.py --ignore=tests/ops/test_sanitizer.py > $OUT/tests_rest.log 2>&1
echo "GPU suite but Triton decode / sparse rc $? at ${SECONDS}s"
grep -E "passed|failed|FAILED|rror" $OUT/tests_rest.log | tail -8
