#!/bin/bash
# Stop 56, call 3 (an H100): the indexer logits' SPEC row (CUDA), then the GPU suite on the tree as it lands (its
# kernels are stop 55's; stop 55's dispatch rules for AMD and its test changes had run on no GPU but for the prefill
# tests) but the Triton decode and sparse files and the sanitizer's, in the time left (~4 minutes in all: the budget).
# `run` with command `bash docs/bench/stop56_device_call3.sh`.
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16 TORCH_EXTENSIONS_DIR=$PWD/bench/ext
SECONDS=0
python -m flashmla_ops.build > $OUT/build.log 2>&1; echo "build rc $? at ${SECONDS}s"
# the indexer's SPEC row (CUDA), which calls 1 and 2 left out
timeout 60 python scripts/bench_indexer.py --backend cuda --no-reference --settle 5 --rows "logits fp8 s_q" \
  --out $OUT/indexer_cuda > $OUT/indexer_cuda.log 2>&1
echo "indexer rc $?"; grep -E "^logits|rror" $OUT/indexer_cuda.log | grep -v Warning
timeout $((250 - SECONDS)) python -m pytest -q -m gpu tests --ignore=tests/ops/test_triton_decode.py \
  --ignore=tests/ops/test_triton_sparse.py --ignore=tests/ops/test_sanitizer.py > $OUT/tests_rest.log 2>&1
echo "GPU suite but Triton decode / sparse rc $? at ${SECONDS}s"
grep -E "passed|failed|FAILED|rror" $OUT/tests_rest.log | tail -8; tail -c 400 $OUT/tests_rest.log  # if cut off
