#!/bin/bash
# Prepared in stop 46 for the next session's second device call: the model GPU tests, then what stop 46's one kernel
# change (the Triton FP8 dense decode's f16 products, 1083 SASS instructions in the loop against 1078 for
# Triton 3.6, sm_90) costs, against main before it in one process.
# Before the call, on the CPU machine: git show 09f64fc:flashmla_ops/triton/decode.py > bench/decode_base.py
# `run` with command `bash docs/bench/stop46_device_call2.sh` and carry ["bench"].
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16
SECONDS=0
timeout 200 python -m pytest -m gpu -x -q tests/models > $OUT/tests_models.log 2>&1; echo "tests rc $?"
tail -3 $OUT/tests_models.log
echo "=== tests at ${SECONDS}s"
timeout 200 python docs/bench/stop46_triton_fp8_ab.py bench/decode_base.py 4 2>&1 | grep -v Warning
echo "=== A/B at ${SECONDS}s"
echo "=== done at ${SECONDS}s"
