#!/bin/bash
# Stop 51's second device call (the machine of call 1, still warm: its build kept in bench/ext): the reload's GPU
# tests (call 1's 60 s ran out while they compiled), then every other op GPU test on the tree of call 1.
# `run` with command `bash docs/bench/stop51_device_call2.sh`.
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16 TORCH_EXTENSIONS_DIR=$PWD/bench/ext
SECONDS=0
python -m flashmla_ops.build > $OUT/build.log 2>&1; echo "build rc $?"; tail -1 $OUT/build.log
echo "=== built at ${SECONDS}s"
timeout 120 python -m pytest -q tests/ops/test_triton_decode.py -k "latent_loading" > $OUT/tests_reload.log 2>&1
echo "reload tests rc $?"; grep -E "passed|failed|FAILED|Error" $OUT/tests_reload.log | tail -8
echo "=== reload tests at ${SECONDS}s"
DONE="test_extra_cache test_attn_sink test_cuda_sparse_decode test_cuda_decode"
timeout $((440 - SECONDS)) python -m pytest -q -m gpu --durations=5 tests/ops $(for f in $DONE; do
  echo --ignore=tests/ops/$f.py; done) > $OUT/tests_rest.log 2>&1
echo "other op tests rc $?"; grep -E "passed|failed|FAILED|ERROR" $OUT/tests_rest.log | tail -12
echo "=== done at ${SECONDS}s"
