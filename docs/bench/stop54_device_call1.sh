#!/bin/bash
# Stop 54, call 1: the Triton kernels with the logits masked apart (common.mask_logits_apart, the new Hopper default at
# 64 rows) timed against the same tiles without it on the Triton SPEC rows, then the Triton GPU tests (their grids now
# take it by default on Hopper; stop 53's per-row check had not run on them). Call 2 runs the rest of the GPU suite.
# `run` with command `bash docs/bench/stop54_device_call1.sh`.
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16 TORCH_EXTENSIONS_DIR=$PWD/bench/ext
SECONDS=0
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
(python -m flashmla_ops.build > $OUT/build.log 2>&1; echo "build rc $?" >> $OUT/build.log) &
timeout 220 python docs/bench/stop54_apart_ab.py --rounds 2 --settle 5 > $OUT/apart_ab.log 2>&1
echo "apart A/B rc $? at ${SECONDS}s"; grep -E "round|Error|error" $OUT/apart_ab.log | tail -40
wait; tail -2 $OUT/build.log; echo "=== built at ${SECONDS}s"
timeout $((585 - SECONDS)) python -m pytest -q -m gpu tests/ops/test_triton_decode.py tests/ops/test_triton_sparse.py \
  tests/ops/test_triton_fitting.py > $OUT/tests_triton.log 2>&1
echo "triton tests rc $?"; grep -E "passed|failed|FAILED|Error" $OUT/tests_triton.log | tail -8
echo "=== done at ${SECONDS}s"
