#!/bin/bash
# Prepared in stop 48 for the next session's second device call: every GPU test (stop 47's, stop 48's metadata
# kernel, exact-size poisoning and the models' balanced decode among them; stop 47's run of them all took ~400 s).
# `run` with command `bash docs/bench/stop48_device_call2.sh`; then stop48_device_call3.sh.
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16
SECONDS=0
python -m flashmla_ops.build > $OUT/build.log 2>&1; echo "build rc $?"
echo "=== built at ${SECONDS}s"
timeout $((570 - SECONDS)) python -m pytest -m gpu -q tests > $OUT/tests_gpu.log 2>&1; echo "tests rc $?"
grep -E "passed|failed|FAILED|ERROR" $OUT/tests_gpu.log | tail -15
echo "=== done at ${SECONDS}s"
