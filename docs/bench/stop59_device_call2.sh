#!/bin/bash
# Stop 59, call 2: the Triton combine in column parts (combine_parts), its GPU tests, then its A/B against one part
# (docs/bench/stop59_combine_ab.py). `run` with `bash docs/bench/stop59_device_call2.sh`.
export PYTHONPATH=$PWD:$PWD/scripts
SECONDS=0
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
timeout 220 python -m pytest -q tests/ops/test_triton_decode.py tests/ops/test_triton_sparse.py -k \
  "column_parts or combine or wide or balanced or split or sparse_decode_matches or sparse_decode_gpu_grid" \
  > $OUT/tests.log 2>&1
echo "Triton combine tests rc $? at ${SECONDS}s"; grep -E "passed|failed|FAILED|rror" $OUT/tests.log | tail -8
timeout $((560 - SECONDS)) python docs/bench/stop59_combine_ab.py --rounds 2 --settle 1 > $OUT/combine_ab.log 2>&1
echo "combine A/B rc $? at ${SECONDS}s"; grep "max parts .:" $OUT/combine_ab.log
