#!/bin/bash
# Prepared in stop 48 for the next session's second device call: every GPU test (stop 47's, stop 48's metadata
# kernel, exact-size poisoning and the models' balanced decode among them; stop 47's run of them all took ~400 s).
# `run` with command `bash docs/bench/stop48_device_call2.sh`; then stop49_device_call2b.sh, stop48_device_call3.sh.
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16
SECONDS=0
python -m flashmla_ops.build > $OUT/build.log 2>&1; echo "build rc $?"
echo "=== built at ${SECONDS}s"
# stop 49: the op tests only (the models' GPU tests are docs/bench/stop49_device_call2b.sh), so that stop 49's new
# GPU tests (continuation shapes) do not push the whole run past the 10-minute limit
timeout $((570 - SECONDS)) python -m pytest -m gpu -q --durations=10 tests/ops > $OUT/tests_gpu.log 2>&1
echo "tests rc $?"
grep -E "passed|failed|FAILED|ERROR" $OUT/tests_gpu.log | tail -15
echo "=== done at ${SECONDS}s"
