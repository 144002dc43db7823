#!/bin/bash
# Written in stop 52 for the next device session (not run): what stop 52's open racecheck report is. racecheck found
# 37 hazards in store_output<true> (across its named barrier 1) on dense bf16 h128 b1 9000 tokens (132 CTAs) and none
# on [700, 3] (20 CTAs) with the same kernel instantiation. Here: (1) main on both again, and on 70 sequences of 700
# (140 CTAs: more than the SMs, CTAs following others on an SM, as b1 9000 may under the sanitizer); (2) a build whose
# store_output syncs with __syncthreads() (docs/bench/stop52_store_syncthreads.diff) on the same cases. Hazards on (2)
# too point at racecheck (or at something outside the barrier); none on (2) and some on (1), at barrier 1's use.
# `run` with command `bash docs/bench/stop52_next_racecheck.sh`.
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16 TORCH_EXTENSIONS_DIR=$PWD/bench/ext
SECONDS=0
rm -rf bench/sst && mkdir -p bench/sst && cp -r csrc bench/sst/
patch -p1 -d bench/sst < docs/bench/stop52_store_syncthreads.diff
python -m flashmla_ops.build > $OUT/build.log 2>&1 &
FLASHMLA_CSRC=$PWD/bench/sst/csrc python -m flashmla_ops.build > $OUT/build_sst.log 2>&1
wait; echo "builds at ${SECONDS}s"; tail -1 $OUT/build.log; tail -1 $OUT/build_sst.log
for variant in main sst; do
  csrc=""; [ $variant = sst ] && csrc=$PWD/bench/sst/csrc
  for only in "bf16 s_q1 h128 [9000]" "bf16 s_q1 h128 [700, 3]" "bf16 s_q1 h128 [700] x 70"; do
    FLASHMLA_CSRC=$csrc PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 100 compute-sanitizer --tool racecheck \
      --print-limit 4 python scripts/sanitize_ops.py --backend cuda --only "$only" > $OUT/race.log 2>&1
    echo "$variant | $only | rc $? | $(grep -E 'RACECHECK SUMMARY' $OUT/race.log) | $(grep -cE ' ok$' $OUT/race.log) ok"
    grep -E "Race reported" $OUT/race.log | sed 's/(const flashmla[^)]*)[^+]*//' | sort | uniq -c | head -4
  done
done
echo "=== done at ${SECONDS}s"
