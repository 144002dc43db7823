#!/bin/bash
# Stop 47's second device call: the CUDA SPEC rows as CUDA-graph replays and by SPEC.md §4's method (--timer events)
# in one process each (the dense kernels' page and length clamps of stop 47 are in both), then stop 46's sink and
# extra-cache paths (CUDA + sink after the kernel, Triton's in-kernel sink, CUDA without). The first op builds the
# kernels where the machine is fresh (~3 min). `run` with command `bash docs/bench/stop47_device_call2.sh`.
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16
SECONDS=0
python -m flashmla_ops.build > $OUT/build.log 2>&1; echo "build rc $?"
echo "=== built at ${SECONDS}s"
for timer in graph events; do
  timeout 110 python scripts/bench_decode.py --backend cuda --no-baselines --timer $timer --settle 10 \
    --out $OUT/dec_$timer > $OUT/dec_$timer.log 2>&1
  grep -E "^bf16|^fp8|rror" $OUT/dec_$timer.log | grep -v Warning | sed "s/^/$timer /"
  echo "=== dense $timer at ${SECONDS}s"
done
timeout 100 python scripts/bench_sparse.py --backend cuda --no-reference --timer events --settle 10 \
  --out $OUT/sparse_events > $OUT/sparse_events.log 2>&1
grep -E "^(decode|prefill)|rror" $OUT/sparse_events.log | grep -v Warning | sed "s/^/events /"
echo "=== sparse at ${SECONDS}s"
timeout 120 python docs/bench/stop46_sink_paths.py 1 2>&1 | grep -v Warning
echo "=== done at ${SECONDS}s"
