#!/bin/bash
# Stop 54, call 4: with the logits apart, 64-row tiles at 16 warps (four warpgroups: 64 x 16 of the logits and 128 of
# P V's columns each, 128 registers a thread; compiled for sm_90: 36-128 bytes of spills) against the new default's 8,
# on the Triton SPEC rows; then the apart tests on the GPU, at 8 and 16 warps.
# `run` with command `bash docs/bench/stop54_device_call4.sh`.
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16 TORCH_EXTENSIONS_DIR=$PWD/bench/ext
SECONDS=0
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
(python -m flashmla_ops.build > $OUT/build.log 2>&1; echo "build rc $?" >> $OUT/build.log) &
timeout 300 python docs/bench/stop54_apart_ab.py --rounds 2 --settle 5 --wide > $OUT/wide_ab.log 2>&1
echo "wide A/B rc $? at ${SECONDS}s"; grep -E "round|Error|error" $OUT/wide_ab.log | tail -40
wait; tail -1 $OUT/build.log
timeout $((570 - SECONDS)) python -m pytest -q tests/ops/test_triton_decode.py tests/ops/test_triton_sparse.py -k apart \
  > $OUT/tests_apart.log 2>&1
echo "apart tests rc $?"; grep -E "passed|failed|FAILED|Error" $OUT/tests_apart.log | tail -8
echo "=== done at ${SECONDS}s"
