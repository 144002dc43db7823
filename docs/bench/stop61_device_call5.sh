#!/bin/bash
# Stop 61, call 5 (the session's last ~4 minutes of device time): the Triton dense SPEC rows and the sparse decode b64
# h64 row in fresh processes with the few-splits combine as landed. `run` with `bash docs/bench/stop61_device_call5.sh`,
# timeout_s 140.
export PYTHONPATH=$PWD:$PWD/scripts
SECONDS=0
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
timeout 80 python scripts/bench_decode.py --backend triton --no-baselines --settle 2 --out $OUT/decode_triton \
  > $OUT/decode_triton.log 2>&1
echo "bench_decode triton rc $? at ${SECONDS}s"; grep -E "^ *(bf16|fp8)" $OUT/decode_triton.log | head -8
timeout $((130 - SECONDS)) python scripts/bench_sparse.py --backend triton --no-reference --settle 2 --rows "b64 h64" \
  --out $OUT/sparse_triton > $OUT/sparse_triton.log 2>&1
echo "bench_sparse triton rc $? at ${SECONDS}s"; grep -E "^ *decode" $OUT/sparse_triton.log | head -3
