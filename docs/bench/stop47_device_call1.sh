#!/bin/bash
# Stop 47's first device call: the kernels built ahead (`python -m flashmla_ops.build`), then every GPU test of the
# repository (ops and models: stops 45-47's new ones have not run on a GPU: the sink and extra cache on the CUDA
# kernels, the cache writes and paged reads with bad index values, the top-k slot past int32, the Triton FP8 range).
# `run` with command `bash docs/bench/stop47_device_call1.sh` (no carry needed).
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16
SECONDS=0
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem,power.limit --format=csv,noheader
python -m flashmla_ops.build > $OUT/build.log 2>&1; echo "build rc $?"; tail -2 $OUT/build.log
echo "=== built at ${SECONDS}s"
timeout 400 python -m pytest -m gpu -q --maxfail=25 -p no:cacheprovider tests > $OUT/tests.log 2>&1
echo "tests rc $?"
grep -E "^(FAILED|ERROR)" $OUT/tests.log | head -30; tail -3 $OUT/tests.log
echo "=== done at ${SECONDS}s"
