#!/bin/bash
# For the next device session, first (stop 56 had no start left for it): the indexer logits' SPEC row on both paths
# (stop 56's H100 table lacks it), stop 56's racecheck probe (is store_output's report the tool's?), then the GPU suite
# on main (stop 55's dispatch rules for AMD and its test changes have run on no GPU but for the prefill tests), the
# Triton decode and sparse files last, in the time left (~9.5 minutes).
# `run` with command `bash docs/bench/stop56_next_device_call.sh`.
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16 TORCH_EXTENSIONS_DIR=$PWD/bench/ext
SECONDS=0
python -m flashmla_ops.build > $OUT/build.log 2>&1; echo "build rc $? at ${SECONDS}s"
for backend in cuda triton; do
  timeout 60 python scripts/bench_indexer.py --backend $backend --no-reference --settle 5 --rows "logits fp8 s_q" \
    --out $OUT/indexer_$backend > $OUT/indexer_$backend.log 2>&1
  echo "indexer $backend rc $? at ${SECONDS}s"; grep -E "^logits|rror" $OUT/indexer_$backend.log | grep -v Warning
done
# stop 56's racecheck probe (the wide kernel's barrier protocol alone; docs/bench/stop56_racecheck_probe.cu)
nvcc -arch=sm_90a -O2 -lineinfo -o bench/racecheck_probe docs/bench/stop56_racecheck_probe.cu && \
  for ctas in 20 70 132 140; do for blocks in 1 2 3; do
    bench/racecheck_probe $ctas $blocks | tail -1
    timeout 20 compute-sanitizer --tool racecheck --print-limit 2 bench/racecheck_probe $ctas $blocks 2>&1 \
      | grep -E "SUMMARY|rror"
  done; done
echo "=== probe done at ${SECONDS}s"
timeout $((380 - SECONDS)) python -m pytest -q -m gpu tests --ignore=tests/ops/test_triton_decode.py \
  --ignore=tests/ops/test_triton_sparse.py --ignore=tests/ops/test_sanitizer.py > $OUT/tests_rest.log 2>&1
echo "GPU suite but Triton decode / sparse rc $? at ${SECONDS}s"
grep -E "passed|failed|FAILED|rror" $OUT/tests_rest.log | tail -8
timeout $((570 - SECONDS)) python -m pytest -q tests/ops/test_triton_decode.py tests/ops/test_triton_sparse.py \
  > $OUT/tests_triton.log 2>&1
echo "Triton decode / sparse rc $? at ${SECONDS}s"; grep -E "passed|failed|FAILED|rror" $OUT/tests_triton.log | tail -8
