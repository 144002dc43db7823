#!/bin/bash
# Stop 54, call 5: the Triton dense decode with each step's block-table lookup made a step early (a loop-carried
# scalar, decode._table_page; 64-row tiles at two stages) against the kernel before it, on the dense SPEC rows in one
# process (docs/bench/stop54_lookahead_ab.py); then the Triton dense decode GPU tests on it.
# `run` with command `bash docs/bench/stop54_device_call5.sh`.
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16 TORCH_EXTENSIONS_DIR=$PWD/bench/ext
SECONDS=0
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
(python -m flashmla_ops.build > $OUT/build.log 2>&1; echo "build rc $?" >> $OUT/build.log) &
timeout 240 python docs/bench/stop54_lookahead_ab.py --rounds 2 --settle 5 > $OUT/lookahead_ab.log 2>&1
echo "lookahead A/B rc $? at ${SECONDS}s"; grep -E "round|Error|error" $OUT/lookahead_ab.log | tail -30
wait; tail -1 $OUT/build.log
timeout $((560 - SECONDS)) python -m pytest -q tests/ops/test_triton_decode.py tests/ops/test_triton_fitting.py \
  > $OUT/tests_decode.log 2>&1
echo "triton decode tests rc $?"; grep -E "passed|failed|FAILED|Error" $OUT/tests_decode.log | tail -8
echo "=== done at ${SECONDS}s"
