#!/bin/bash
# Stop 58, call 2: the Triton dense decode GPU tests with the latent whole as Hopper's BF16 default at 64 rows
# (stop58_call1.log's A/B), then the Triton dense decode SPEC rows. `run` with `bash docs/bench/stop58_device_call2.sh`.
export PYTHONPATH=$PWD:$PWD/scripts
SECONDS=0
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
timeout 330 python -m pytest -q tests/ops/test_triton_decode.py tests/ops/test_triton_fitting.py > $OUT/tests.log 2>&1
echo "Triton decode tests rc $? at ${SECONDS}s"; grep -E "passed|failed|FAILED|rror" $OUT/tests.log | tail -8
timeout $((470 - SECONDS)) python scripts/bench_decode.py --backend triton --no-baselines --settle 3 \
  --out $OUT/decode_triton > $OUT/decode_triton.log 2>&1
echo "bench_decode triton rc $? at ${SECONDS}s"; grep -E "^ *(bf16|fp8)" $OUT/decode_triton.log | head -8
