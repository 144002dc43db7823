#!/bin/bash
# Stop 61, call 3 (the H100): the Triton few-splits combine (decode._combine_few_kernel) against _combine_kernel on
# the SPEC rows of two splits (docs/bench/stop61_few_combine_ab.py), then its GPU tests: the Triton decode file's
# combine, wide-batch and split tests and the sparse decode's.
# `run` with command `bash docs/bench/stop61_device_call3.sh`.
export PYTHONPATH=$PWD:$PWD/scripts
SECONDS=0
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
timeout 300 python docs/bench/stop61_few_combine_ab.py --rounds 2 --settle 1 > $OUT/few_combine_ab.log 2>&1
echo "few combine A/B rc $? at ${SECONDS}s"; grep -E ": |err [^0-9]*[1-9]e-0[0-2]|inf|rror" $OUT/few_combine_ab.log
timeout $((590 - SECONDS)) python -m pytest -q -rf tests/ops/test_triton_decode.py tests/ops/test_triton_sparse.py \
  -k "combine or wide_batch or split or sparse_decode" > $OUT/tests.log 2>&1
echo "tests rc $? at ${SECONDS}s"; grep -E "passed|failed|FAILED|rror" $OUT/tests.log | tail -6
