#!/bin/bash
# Stop 57, call 1: the Triton SPEC rows under the launch configs of docs/bench/stop57_triton_ab.py (each checked
# against the reference op first; main's dense kernel from flashmla_ops/triton/_main_decode.py, written from git
# before the call as the A/B's docstring says, not committed), then the Triton decode and sparse GPU tests of the new configs. `run` with
# command `bash docs/bench/stop57_device_call1.sh` and timeout_s 480 (TOTAL=SECONDS for a shorter call: the A/B gets
# six tenths of it, printing each row as it is timed).
export PYTHONPATH=$PWD:$PWD/scripts
SECONDS=0
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
timeout $((${TOTAL:-465} * 6 / 10)) python docs/bench/stop57_triton_ab.py --settle 3 > $OUT/ab.log 2>&1
echo "A/B rc $? at ${SECONDS}s"; grep -v -i warn $OUT/ab.log
TRITON_TESTS="tests/ops/test_triton_decode.py tests/ops/test_triton_sparse.py"
# (no -m gpu: on a GPU machine these files' tests all run on the GPU, and few of them carry the gpu mark)
timeout $((${TOTAL:-465} - SECONDS)) python -m pytest -q $TRITON_TESTS -k "whole or apart or deep" \
  > $OUT/tests_new.log 2>&1
echo "new-config tests rc $? at ${SECONDS}s"; grep -E "passed|failed|FAILED|rror" $OUT/tests_new.log | tail -6
