#!/bin/bash
# Prepared in stop 46 for the next session's third device call: the attention sink on the CUDA kernels (applied after
# them, stop 46) against the Triton kernels' in-kernel sink and against CUDA without a sink, then the Triton dense
# decode's SPEC rows (the README's Triton column after stop 46's FP8 change).
# `run` with command `bash docs/bench/stop46_device_call3.sh`.
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16
SECONDS=0
timeout 300 python docs/bench/stop46_sink_paths.py 2 2>&1 | grep -v Warning
echo "=== sink at ${SECONDS}s"
timeout 200 python scripts/bench_decode.py --backend triton --no-baselines --out $OUT/dec_triton > $OUT/bench.log 2>&1
grep -E "^bf16|^fp8|rror" $OUT/bench.log | grep -v Warning
echo "=== done at ${SECONDS}s"
