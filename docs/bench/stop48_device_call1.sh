#!/bin/bash
# Stop 48's first device call: the new one-launch get_mla_metadata (csrc/mla_metadata.cu) against its reference (GPU
# tests, then its cost as graph replays and eager calls), then the CUDA dense SPEC rows (and the skewed b32 row) as
# CUDA-graph replays without and with get_mla_metadata's balanced schedule (--scheduled: FlashMLA's calling
# convention, the API's path; stop 43 measured it 4-7% slower on the uniform h128 rows and 3.5x faster on the skewed
# one, before stop 45's kernels). SPEC.md §4's timer (--timer events) and the sink paths: stop47_device_call2.sh.
# `run` with command `bash docs/bench/stop48_device_call1.sh` (about 8 minutes at most: the timeouts below).
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16
SECONDS=0
python -m flashmla_ops.build > $OUT/build.log 2>&1; echo "build rc $?"; tail -3 $OUT/build.log
echo "=== built at ${SECONDS}s"
timeout 120 python -m pytest -q -m gpu tests/ops/test_metadata.py -x 2>&1 | tail -4
timeout 90 python docs/bench/stop48_metadata_time.py 2>&1 | grep -v Warning
echo "=== metadata at ${SECONDS}s"
for mode in plain scheduled; do
  flag=""; [ $mode = scheduled ] && flag="--scheduled"
  timeout 110 python scripts/bench_decode.py --backend cuda --no-baselines --settle 10 $flag \
    --out $OUT/dec_$mode > $OUT/dec_$mode.log 2>&1
  grep -E "^bf16|^fp8|rror" $OUT/dec_$mode.log | grep -v Warning | sed "s/^/$mode /"
  echo "=== dense $mode at ${SECONDS}s"
done
echo "=== done at ${SECONDS}s"
