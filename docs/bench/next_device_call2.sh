#!/bin/bash
# Prepared in stops 67-68 for the next device session, call 2: the wide kernel's phases over the FP8 and BF16 caches
# at 64 and 128 rows (docs/bench/phases_wide.py on a FLASHMLA_PHASES build in its own extension directory: why the FP8
# cache takes 1.74x the BF16 time at 128 rows); the GPU tests stop 67's call 2 did not reach (the rest of the Triton
# sparse file, the sanitizer file); then compute-sanitizer's synccheck and racecheck over scripts/sanitize_ops.py's
# cases, which the tests do not run yet (an exploration: whether they support the kernels' TMA, mbarriers and wgmma
# without false reports, before they become tests). `run` with command `bash docs/bench/next_device_call2.sh`.
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16
SECONDS=0
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
FLASHMLA_EXTRA_CUDA_FLAGS=-DFLASHMLA_PHASES TORCH_EXTENSIONS_DIR=$PWD/bench/ext_phases \
  timeout 240 python docs/bench/phases_wide.py > $OUT/phases_wide.log 2>&1
echo "phases rc $? at ${SECONDS}s"; grep -E "^==|warpgroup|rror" $OUT/phases_wide.log | head -24
export TORCH_EXTENSIONS_DIR=$PWD/bench/ext
python -m flashmla_ops.build > $OUT/build.log 2>&1; echo "build rc $? at ${SECONDS}s"
timeout $((420 - SECONDS)) python -m pytest -v -rf -m gpu tests/ops/test_triton_sparse.py tests/ops/test_sanitizer.py \
  > $OUT/tests.log 2>&1
echo "tests rc $? at ${SECONDS}s: $(grep -c " PASSED" $OUT/tests.log) PASSED"; grep -E "FAILED|ERROR|passed|failed" \
  $OUT/tests.log | tail -15
for tool in synccheck racecheck; do
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout $((590 - SECONDS)) compute-sanitizer --tool $tool --error-exitcode 9 \
    --print-limit 10 python scripts/sanitize_ops.py > $OUT/sanitize_$tool.log 2>&1
  echo "$tool rc $? at ${SECONDS}s"
  grep -E "ERROR SUMMARY|case\(s\) failed|Hazard|Barrier" $OUT/sanitize_$tool.log | head -8
done
