#!/bin/bash
# Stop 62 call 1 (H100): docs/bench/stop62_fp8_transposed_probe.py (the FP8 dense decode's products transposed, in
# stripped kernels), then the Triton sparse SPEC rows in a fresh process (the README's h128 and prefill rows are
# stop 56's). `run` with command `bash docs/bench/stop62_device_call1.sh`, timeout_s 600.
export PYTHONPATH=$PWD:$PWD/scripts:$PWD/docs/bench
SECONDS=0
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
timeout 300 python docs/bench/stop62_fp8_transposed_probe.py > $OUT/probe.log 2>&1
echo "probe rc $? at ${SECONDS}s"; cat $OUT/probe.log | tail -25
timeout $((580 - SECONDS)) python scripts/bench_sparse.py --backend triton --no-reference --settle 2 \
  --out $OUT/sparse_triton > $OUT/sparse_triton.log 2>&1
echo "bench_sparse triton rc $? at ${SECONDS}s"; grep -E "^ *(decode|prefill)" $OUT/sparse_triton.log | head -8
