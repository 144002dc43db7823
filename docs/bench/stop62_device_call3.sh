#!/bin/bash
# Stop 62 call 3 (the session's last ~270 s of device time): the Triton KV-cache tests on the GPU (this stop's NaN /
# infinity fixes on the hardware e4m3 path), no extension build. `run` with command
# `bash docs/bench/stop62_device_call3.sh`, timeout_s 120.
export PYTHONPATH=$PWD:$PWD/scripts
SECONDS=0
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
timeout 100 python -m pytest -q -rfs tests/ops/test_triton_kv_cache.py > $OUT/triton_kv_tests.log 2>&1
echo "Triton KV-cache tests rc $? at ${SECONDS}s"; grep -E "passed|failed|FAILED|rror" $OUT/triton_kv_tests.log | tail -8
