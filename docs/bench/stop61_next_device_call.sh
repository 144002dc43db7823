#!/bin/bash
# For the next device session, on the H100 (`run` with kind nvidia-h100-x1, timeout_s 600): the whole Triton column of
# the README's SPEC table in fresh processes (its sparse h128 and prefill rows still come from stop 56), then the
# Triton sparse file's GPU tests whole (stop 61 ran its decode tests; its prefill tests last ran in stop 58).
# `run` with command `bash docs/bench/stop61_next_device_call.sh`.
export PYTHONPATH=$PWD:$PWD/scripts
SECONDS=0
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
timeout 150 python scripts/bench_decode.py --backend triton --no-baselines --settle 2 --out $OUT/decode_triton \
  > $OUT/decode_triton.log 2>&1
echo "bench_decode triton rc $? at ${SECONDS}s"; grep -E "^ *(bf16|fp8)" $OUT/decode_triton.log | head -8
timeout 150 python scripts/bench_sparse.py --backend triton --no-reference --settle 2 --out $OUT/sparse_triton \
  > $OUT/sparse_triton.log 2>&1
echo "bench_sparse triton rc $? at ${SECONDS}s"; grep -E "^ *(decode|prefill)" $OUT/sparse_triton.log | head -6
timeout $((590 - SECONDS)) python -m pytest -q -rf tests/ops/test_triton_sparse.py > $OUT/tests.log 2>&1
echo "Triton sparse tests rc $? at ${SECONDS}s"; grep -E "passed|failed|FAILED|rror" $OUT/tests.log | tail -6
