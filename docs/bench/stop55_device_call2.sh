#!/bin/bash
# Stop 55, call 2: the sparse prefill with each tile's indices read a step early as its default where the logits are
# apart (Hopper, 64 heads): the A/B again (stop54_prefill_lookahead.py: "default" is the former default, "lookahead"
# the new one), then the prefill tests and stop 55's integer-decoding test on the GPU in the time left (~7 minutes in
# all on a warm machine). `run` with command `bash docs/bench/stop55_device_call2.sh`.
export PYTHONPATH=$PWD:$PWD/scripts
SECONDS=0
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
timeout 150 python docs/bench/stop54_prefill_lookahead.py --rounds 2 --settle 3 > $OUT/prefill_ab.log 2>&1
echo "prefill A/B rc $? at ${SECONDS}s"; grep -E "round|Error" $OUT/prefill_ab.log
timeout $((380 - SECONDS)) python -m pytest -q tests/ops/test_triton_sparse.py \
  -k "prefill or integer_decoding or reads_indices" > $OUT/tests.log 2>&1
echo "tests rc $? at ${SECONDS}s"; grep -E "passed|failed|FAILED|Error" $OUT/tests.log | tail -8
