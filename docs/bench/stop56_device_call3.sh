#!/bin/bash
# Stop 56, call 3 (an H100): the GPU suite on the tree as it lands (its kernels are stop 55's; stop 55's dispatch rules
# for AMD and its test changes had run on no GPU but for the prefill tests), the Triton decode and sparse files last,
# in the time left (~7 minutes in all).
# `run` with command `bash docs/bench/stop56_device_call3.sh`.
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16 TORCH_EXTENSIONS_DIR=$PWD/bench/ext
SECONDS=0
python -m flashmla_ops.build > $OUT/build.log 2>&1; echo "build rc $? at ${SECONDS}s"
timeout $((300 - SECONDS)) python -m pytest -q -m gpu tests --ignore=tests/ops/test_triton_decode.py \
  --ignore=tests/ops/test_triton_sparse.py --ignore=tests/ops/test_sanitizer.py > $OUT/tests_rest.log 2>&1
echo "GPU suite but Triton decode / sparse rc $? at ${SECONDS}s"
grep -E "passed|failed|FAILED|rror" $OUT/tests_rest.log | tail -8
timeout $((420 - SECONDS)) python -m pytest -q -m gpu tests/ops/test_triton_decode.py tests/ops/test_triton_sparse.py \
  > $OUT/tests_triton.log 2>&1
echo "Triton decode / sparse rc $? at ${SECONDS}s"; grep -E "passed|failed|FAILED|rror" $OUT/tests_triton.log | tail -8
