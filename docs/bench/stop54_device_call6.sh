#!/bin/bash
# Stop 54, call 6 (the budget's last minutes): the Triton sparse prefill with each tile's indices read a step early
# (TileConfig.lookahead, which prefill now honours) against its default on the two prefill SPEC rows; then the sparse
# prefill tests on the GPU (the lookahead's among them).
# `run` with command `bash docs/bench/stop54_device_call6.sh`.
export PYTHONPATH=$PWD:$PWD/scripts
SECONDS=0
timeout 150 python docs/bench/stop54_prefill_lookahead.py --rounds 2 --settle 3 > $OUT/prefill_ab.log 2>&1
echo "prefill A/B rc $? at ${SECONDS}s"; grep -E "round|Error|error" $OUT/prefill_ab.log
timeout 100 python -m pytest -q tests/ops/test_triton_sparse.py -k prefill > $OUT/tests_prefill.log 2>&1
echo "prefill tests rc $?"; grep -E "passed|failed|FAILED|Error" $OUT/tests_prefill.log | tail -6
echo "=== done at ${SECONDS}s"
