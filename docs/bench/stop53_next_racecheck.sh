#!/bin/bash
# Written in stop 53 for a next device session (not run): racecheck's reports in store_output<true> come at b1 9000
# (66 splits x 2 row tiles = 132 CTAs, one an SM) and 70 x 700 (140), with named barrier 1 or __syncthreads() alike
# (stop 53 call 2), never at [700, 3] (20 CTAs). [4500] split by shape runs the same kernel over pieces of the same
# size at 70 CTAs, scheduled at 132: reports at 70 too point at the kernel's hand-offs (the TMA writes into the Q tile
# that stages the rows, the early refills), reports at 132 alone at the number of CTAs (CTAs following others on an
# SM under the sanitizer).
# `run` with command `bash docs/bench/stop53_next_racecheck.sh`.
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16 TORCH_EXTENSIONS_DIR=$PWD/bench/ext
SECONDS=0
python -m flashmla_ops.build > $OUT/build.log 2>&1; echo "build rc $? at ${SECONDS}s"
for only in "bf16 s_q1 h128 [4500] by shape" "bf16 s_q1 h128 [4500] scheduled" "bf16 s_q1 h128 [9000] by shape"; do
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 120 compute-sanitizer --tool racecheck --print-limit 4 \
    python scripts/sanitize_ops.py --only "$only" > $OUT/race.log 2>&1
  echo "$only | rc $? | $(grep -E 'RACECHECK SUMMARY' $OUT/race.log) | $(grep -cE ' ok$' $OUT/race.log) ok"
  cp $OUT/race.log "$OUT/race_$(echo $only | tr -dc 'a-z0-9_').log"
done
echo "=== done at ${SECONDS}s"
