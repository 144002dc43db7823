#!/bin/bash
# Stop 56, call 3 (an H100): the indexer logits' SPEC row on both paths, then the GPU suite on the tree as it lands (its
# kernels are stop 55's; stop 55's dispatch rules for AMD and its test changes had run on no GPU but for the prefill
# tests), the Triton decode and sparse files last, in the time left (~5.5 minutes in all).
# `run` with command `bash docs/bench/stop56_device_call3.sh`.
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16 TORCH_EXTENSIONS_DIR=$PWD/bench/ext
SECONDS=0
python -m flashmla_ops.build > $OUT/build.log 2>&1; echo "build rc $? at ${SECONDS}s"
for backend in cuda triton; do  # the indexer's SPEC row, which calls 1 and 2 left out
  timeout 60 python scripts/bench_indexer.py --backend $backend --no-reference --settle 10 --rows "logits fp8 s_q" \
    --out $OUT/indexer_$backend > $OUT/indexer_$backend.log 2>&1
  echo "indexer $backend rc $?"; grep -E "^logits|rror" $OUT/indexer_$backend.log | grep -v Warning
done
timeout $((300 - SECONDS)) python -m pytest -q -m gpu tests --ignore=tests/ops/test_triton_decode.py \
  --ignore=tests/ops/test_triton_sparse.py --ignore=tests/ops/test_sanitizer.py > $OUT/tests_rest.log 2>&1
echo "GPU suite but Triton decode / sparse rc $? at ${SECONDS}s"
grep -E "passed|failed|FAILED|rror" $OUT/tests_rest.log | tail -8
timeout $((330 - SECONDS)) python -m pytest -q -m gpu tests/ops/test_triton_decode.py tests/ops/test_triton_sparse.py \
  > $OUT/tests_triton.log 2>&1
echo "Triton decode / sparse rc $? at ${SECONDS}s"; grep -E "passed|failed|FAILED|rror" $OUT/tests_triton.log | tail -8
