#!/bin/bash
# Stop 62 call 2 (H100): stop 61's prepared script less the sparse bench (call 1 ran it): the Triton dense SPEC rows
# in a fresh process, then the Triton sparse file's GPU tests whole (stop 61 ran its decode tests; its prefill tests
# last ran in stop 58). `run` with command `bash docs/bench/stop62_device_call2.sh`, timeout_s 600.
export PYTHONPATH=$PWD:$PWD/scripts
SECONDS=0
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
timeout 150 python scripts/bench_decode.py --backend triton --no-baselines --settle 2 --out $OUT/decode_triton \
  > $OUT/decode_triton.log 2>&1
echo "bench_decode triton rc $? at ${SECONDS}s"; grep -E "^ *(bf16|fp8)" $OUT/decode_triton.log | head -8
timeout $((590 - SECONDS)) python -m pytest -q -rf tests/ops/test_triton_sparse.py > $OUT/tests.log 2>&1
echo "Triton sparse tests rc $? at ${SECONDS}s"; grep -E "passed|failed|FAILED|rror" $OUT/tests.log | tail -6
