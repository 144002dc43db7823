#!/bin/bash
# Stop 58: one call doing what stop 57's two prepared calls and stop 56's indexer row would (a device start is rare:
# every call is a cold start). The CUDA extension builds in the background on 8 of the 16 cores while the Triton A/B
# of docs/bench/stop57_triton_ab.py times the SPEC rows (main's dense kernel from flashmla_ops/triton/_main_decode.py,
# written from git first as its docstring says), then the new configs' Triton GPU tests, the indexer logits' SPEC row
# on both paths, and the rest of the GPU suite in the time left. `run` with `bash docs/bench/stop58_device_call.sh`.
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=8 TORCH_EXTENSIONS_DIR=$PWD/bench/ext
SECONDS=0
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
(python -m flashmla_ops.build > $OUT/build.log 2>&1; echo "build rc $? at ${SECONDS}s" >> $OUT/build.log) &
timeout 290 python docs/bench/stop57_triton_ab.py --settle 3 > $OUT/ab.log 2>&1
echo "A/B rc $? at ${SECONDS}s"; grep -v -i warn $OUT/ab.log
timeout $((420 - SECONDS)) python -m pytest -q tests/ops/test_triton_decode.py tests/ops/test_triton_sparse.py \
  -k "whole or apart or deep" > $OUT/tests_new.log 2>&1
echo "new-config tests rc $? at ${SECONDS}s"; grep -E "passed|failed|FAILED|rror" $OUT/tests_new.log | tail -6
wait; tail -1 $OUT/build.log
for backend in cuda triton; do
  timeout 40 python scripts/bench_indexer.py --backend $backend --no-reference --settle 3 --rows "logits fp8 s_q" \
    --out $OUT/indexer_$backend > $OUT/indexer_$backend.log 2>&1
  echo "indexer $backend rc $? at ${SECONDS}s"; grep -E "^logits|rror" $OUT/indexer_$backend.log | grep -v Warning
done
timeout $((585 - SECONDS)) python -m pytest -q -m gpu tests --ignore=tests/ops/test_triton_decode.py \
  --ignore=tests/ops/test_triton_sparse.py --ignore=tests/ops/test_sanitizer.py -x > $OUT/tests_rest.log 2>&1
echo "GPU suite but Triton decode / sparse rc $? at ${SECONDS}s"
grep -E "passed|failed|FAILED|rror" $OUT/tests_rest.log | tail -8
