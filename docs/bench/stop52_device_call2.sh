#!/bin/bash
# Stop 52's second device call. Call 1's memcheck found a shared-memory read past a row's codes in the CUDA top-k
# (csrc/indexer_topk.cu load4, a row of 70 keys: now the dynamic shared memory is whole groups of 4 codes) and its
# write_kv_cache case wrote one slot twice (the script's bug, fixed). Here: the top-k and cache-write GPU tests, then
# every CUDA kernel under memcheck again, initcheck (reads of memory no one wrote, e.g. a combine reading a split slot
# no CTA stored), synccheck, and racecheck on a few cases.
# `run` with command `bash docs/bench/stop52_device_call2.sh`.
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16 TORCH_EXTENSIONS_DIR=$PWD/bench/ext
SECONDS=0
python -m flashmla_ops.build > $OUT/build.log 2>&1; echo "build rc $?"; tail -1 $OUT/build.log
echo "=== built at ${SECONDS}s"
timeout 90 python -m pytest -q -m gpu tests/ops/test_cuda_indexer_topk.py tests/ops/test_cuda_kv_cache.py \
  > $OUT/tests_topk.log 2>&1
echo "tests rc $?"; grep -E "passed|failed|FAILED|Error" $OUT/tests_topk.log | tail -5
echo "=== tests at ${SECONDS}s"
sanitize() {  # tool, log name, timeout, more arguments of sanitize_ops.py
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout $3 compute-sanitizer --tool $1 --error-exitcode 9 --print-limit 10 \
    python scripts/sanitize_ops.py --backend cuda "${@:4}" > $OUT/$2.log 2>&1
  echo "$2 rc $?"; grep -E "=====.*(Invalid|Uninit|ERROR SUMMARY|hazard|Race|Barrier|at .* in )|differ| [a-z]+ off|differs$" \
    $OUT/$2.log | head -12
  echo "$(grep -cE ' ok$' $OUT/$2.log) cases ok; === $2 at ${SECONDS}s"
}
sanitize memcheck memcheck 110
sanitize initcheck initcheck 110
sanitize synccheck synccheck 90
sanitize racecheck racecheck $((440 - SECONDS)) --only "[700, 3]"
echo "=== done at ${SECONDS}s"
