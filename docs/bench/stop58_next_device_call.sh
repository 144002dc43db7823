#!/bin/bash
# For the next device session, on the H100 (`run` with kind nvidia-h100-x1, timeout_s 600): what stop 58 could time
# only on the H200 or not at all. The Triton dense decode's SPEC rows with stop 58's defaults (the README's H100 table
# has stop 56's), the indexer logits' SPEC row on both paths (never timed on the H100), stop 56's racecheck probe,
# then the Triton decode tests call 2 of stop 58 did not reach (its FP8 ones) and the launch of more than 65535
# sequences (WIDE_BATCH, run on no GPU yet) in the time left.
# `run` with command `bash docs/bench/stop58_next_device_call.sh`.
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=8 TORCH_EXTENSIONS_DIR=$PWD/bench/ext
SECONDS=0
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
(python -m flashmla_ops.build > $OUT/build.log 2>&1; echo "build rc $? at ${SECONDS}s" >> $OUT/build.log) &
timeout 150 python scripts/bench_decode.py --backend triton --no-baselines --settle 5 --out $OUT/decode_triton \
  > $OUT/decode_triton.log 2>&1
echo "bench_decode triton rc $? at ${SECONDS}s"; grep -E "^ *(bf16|fp8)" $OUT/decode_triton.log | head -8
wait; tail -1 $OUT/build.log
for backend in cuda triton; do
  timeout 50 python scripts/bench_indexer.py --backend $backend --no-reference --settle 5 --rows "logits fp8 s_q" \
    --out $OUT/indexer_$backend > $OUT/indexer_$backend.log 2>&1
  echo "indexer $backend rc $? at ${SECONDS}s"; grep -E "^logits|rror" $OUT/indexer_$backend.log | grep -v Warning
done
# stop 56's racecheck probe (the wide kernel's barrier protocol alone; docs/bench/stop56_racecheck_probe.cu)
nvcc -arch=sm_90a -O2 -lineinfo -o bench/racecheck_probe docs/bench/stop56_racecheck_probe.cu && \
  for ctas in 20 132 140; do for blocks in 1 3; do
    bench/racecheck_probe $ctas $blocks | tail -1
    timeout 20 compute-sanitizer --tool racecheck --print-limit 2 bench/racecheck_probe $ctas $blocks 2>&1 \
      | grep -E "SUMMARY|rror"
  done; done
echo "=== probe done at ${SECONDS}s"
timeout $((585 - SECONDS)) python -m pytest -q tests/ops/test_triton_decode.py -k "halves or wide or fp8" \
  tests/ops/test_triton_indexer.py::test_triton_indexer_wide_batch_matches_its_halves \
  > $OUT/tests_fp8.log 2>&1
echo "Triton decode fp8 and wide-batch tests rc $? at ${SECONDS}s"
grep -E "passed|failed|FAILED|rror" $OUT/tests_fp8.log | tail -6
