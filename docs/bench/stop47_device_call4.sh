#!/bin/bash
# Prepared in stop 47 for a later device call: every CUDA SPEC row timed by SPEC.md §4's method (`--timer events`:
# triton.testing.do_bench's median of single eager calls, FlashMLA's way), and the dense rows also as CUDA-graph
# replays in the same call (the README's way), so that the README can give the events figure beside each graph one.
# The first op builds the extension where call 1's prebuilt one is gone (~3 min; `python -m flashmla_ops.build`).
# `run` with command `bash docs/bench/stop47_device_call4.sh`.
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16
SECONDS=0
python -m flashmla_ops.build 2>&1 | tail -2
echo "=== built at ${SECONDS}s"
for timer in graph events; do
  timeout 120 python scripts/bench_decode.py --backend cuda --no-baselines --timer $timer \
    --out $OUT/dec_$timer > $OUT/dec_$timer.log 2>&1
  grep -E "^bf16|^fp8|rror" $OUT/dec_$timer.log | grep -v Warning | sed "s/^/$timer /"
done
echo "=== dense at ${SECONDS}s"
timeout 120 python scripts/bench_sparse.py --backend cuda --no-reference --timer events --out $OUT/sparse_events \
  > $OUT/sparse_events.log 2>&1
grep -E "^(decode|prefill)|rror" $OUT/sparse_events.log | grep -v Warning
timeout 80 python scripts/bench_indexer.py --no-reference --rows "logits fp8 s_q" --timer events \
  --out $OUT/indexer_events > $OUT/indexer_events.log 2>&1
grep -E "^logits|rror" $OUT/indexer_events.log | grep -v Warning
echo "=== done at ${SECONDS}s"
