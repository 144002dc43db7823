#!/bin/bash
# Stop 53, call 2 (one call: each cold start costs ~4 min of the budget). Built, then side by side:
# (a) the GPU op suite (stop 52's validation and C++ device checks had not run on a GPU);
# (b) initcheck over sanitize_ops.py (call 1 failed on torch.topk's scratch in the top-k reference, now on the CPU),
#     then stop 52's open racecheck report: main and a store_output synced by __syncthreads()
#     (docs/bench/stop52_store_syncthreads.diff) over b1 9000 (132 CTAs), [700, 3] (20) and 70 x 700 (140).
# `run` with command `bash docs/bench/stop53_device_call2.sh`.
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16 TORCH_EXTENSIONS_DIR=$PWD/bench/ext
SECONDS=0
python -m flashmla_ops.build > $OUT/build.log 2>&1; echo "build rc $?"; tail -1 $OUT/build.log
echo "=== built at ${SECONDS}s"
(timeout 430 python -m pytest -q -m gpu tests/ops --ignore=tests/ops/test_sanitizer.py > $OUT/tests_ops.log 2>&1
 echo "ops suite rc $? at ${SECONDS}s" > $OUT/ops_rc.txt) &
rm -rf bench/sst && mkdir -p bench/sst && cp -r csrc bench/sst/
patch -p1 -d bench/sst < docs/bench/stop52_store_syncthreads.diff > /dev/null
(FLASHMLA_CSRC=$PWD/bench/sst/csrc TORCH_EXTENSIONS_DIR=$PWD/bench/ext_sst python -m flashmla_ops.build \
   > $OUT/build_sst.log 2>&1; echo "sst build rc $? at ${SECONDS}s" >> $OUT/build_sst.log) &
sst_build=$!
timeout 200 python -m pytest -q -m gpu tests/ops/test_sanitizer.py -k initcheck > $OUT/tests_initcheck.log 2>&1
echo "initcheck test rc $? at ${SECONDS}s"; grep -E "passed|failed|ERROR SUMMARY" $OUT/tests_initcheck.log | tail -3
for variant in main sst; do
  [ $variant = sst ] && { wait $sst_build; tail -1 $OUT/build_sst.log; }
  for only in "bf16 s_q1 h128 [9000]" "bf16 s_q1 h128 [700, 3]" "bf16 s_q1 h128 [700] x 70"; do
    [ $SECONDS -gt 500 ] && { echo "skipped $variant | $only (at ${SECONDS}s)"; continue; }
    csrc=""; ext=$PWD/bench/ext; [ $variant = sst ] && { csrc=$PWD/bench/sst/csrc; ext=$PWD/bench/ext_sst; }
    FLASHMLA_CSRC=$csrc TORCH_EXTENSIONS_DIR=$ext PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 80 compute-sanitizer \
      --tool racecheck --print-limit 4 python scripts/sanitize_ops.py --backend cuda --only "$only" > $OUT/race.log 2>&1
    echo "$variant | $only | rc $? | $(grep -E 'RACECHECK SUMMARY' $OUT/race.log) | $(grep -cE ' ok$' $OUT/race.log) ok"
    grep -E "Race reported" $OUT/race.log | sed 's/(const flashmla[^)]*)[^+]*//' | sort | uniq -c | head -4
    cp $OUT/race.log "$OUT/race_${variant}_$(echo $only | tr -dc 'a-z0-9_')".log
  done
done
wait; cat $OUT/ops_rc.txt; grep -E "passed|failed|FAILED" $OUT/tests_ops.log | tail -12
echo "=== done at ${SECONDS}s"
