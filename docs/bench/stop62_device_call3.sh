#!/bin/bash
# Stop 62 call 3 (the session's last ~460 s of device time): the CUDA KV-cache tests (this stop's NaN / infinity
# change to fp8_layout.cuh's to_fp8; the first call of a fresh machine builds the extension), then the model GPU tests
# (compiled CUDA-graph generation against eager with generate's new default EOS, BF16 error at V2-Lite's widths).
# `run` with command `bash docs/bench/stop62_device_call3.sh`, timeout_s 330.
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16 TORCH_EXTENSIONS_DIR=$PWD/bench/ext
SECONDS=0
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
timeout 220 python -m pytest -q -rfs tests/ops/test_cuda_kv_cache.py > $OUT/kv_tests.log 2>&1
echo "CUDA KV-cache tests rc $? at ${SECONDS}s"; grep -E "passed|failed|FAILED|rror" $OUT/kv_tests.log | tail -6
timeout $((320 - SECONDS)) python -m pytest -q -rfs -m gpu tests/models > $OUT/model_tests.log 2>&1
echo "model GPU tests rc $? at ${SECONDS}s"; grep -E "passed|failed|FAILED|rror" $OUT/model_tests.log | tail -6
