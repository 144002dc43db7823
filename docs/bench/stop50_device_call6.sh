#!/bin/bash
# Stop 50's sixth device call: sparse decode with an extra cache in one extension call (the kernel launched over each
# cache, the second launch's split partials after the first's, one combine with the sink; csrc/dense_decode.cu
# run_decode's ExtraCache), and every uniform split's partial slot now from slots_per_z / first_slot. Its GPU tests
# and the sink and sparse kernel tests (every combine path), then the sink paths with and without an extra cache.
# `run` with command `bash docs/bench/stop50_device_call6.sh`.
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16
SECONDS=0
python -m flashmla_ops.build > $OUT/build.log 2>&1; echo "build rc $?"; tail -2 $OUT/build.log
echo "=== built at ${SECONDS}s"
timeout 150 python -m pytest -q -m gpu tests/ops/test_extra_cache.py tests/ops/test_attn_sink.py \
  tests/ops/test_cuda_sparse_decode.py > $OUT/tests.log 2>&1
echo "tests rc $?"; grep -E "passed|failed|FAILED|Error" $OUT/tests.log | tail -12
echo "=== tests at ${SECONDS}s"
timeout 90 python docs/bench/stop46_sink_paths.py 1 2>&1 | grep -v Warning
echo "=== done at ${SECONDS}s"
