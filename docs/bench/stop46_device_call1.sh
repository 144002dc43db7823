#!/bin/bash
# Prepared in stop 46 (no device time was lent to it) for the next session's first device call: the kernels built
# ahead by the new `python -m flashmla_ops.build`, then every GPU op test, stop 45's and 46's new ones included
# (stop 46: the sink and the extra cache on the CUDA kernels, test_attn_sink.py and test_extra_cache.py; the prebuilt
# library is the one the ops load, test_packaging.py; the Triton FP8 decode at tile scales up to 2**120 with each e4m3
# decoding the GPU has; stop 45: the 8k-key top-k in a fresh process, the one-column transposed block table, the
# zero-block cache, misaligned KV rows).
# From the repository root: `run` with command `bash docs/bench/stop46_device_call1.sh` (no carry needed).
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16
SECONDS=0
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem,power.limit --format=csv
python -m flashmla_ops.build > $OUT/build.log 2>&1; echo "build rc $?"; tail -2 $OUT/build.log
echo "=== built at ${SECONDS}s"
timeout 420 python -m pytest -m gpu -q --maxfail=10 tests/ops > $OUT/tests.log 2>&1; echo "tests rc $?"
grep -E "^(FAILED|ERROR)" $OUT/tests.log | head -20; tail -3 $OUT/tests.log
echo "=== done at ${SECONDS}s"
