#!/bin/bash
# Written in stop 52 for the next device session (not run: the budget was spent): the GPU tests of what stop 52
# added after its device calls. The Triton write_index_cache (the op's default on GPUs now) and the models over it,
# the CUDA kernels under memcheck and initcheck over sanitize_ops.py's 99 cases (tests/ops/test_sanitizer.py). Then,
# in calls of their own, `python -m pytest -q -m gpu tests/ops --ignore=tests/ops/test_sanitizer.py` (~6 min) and
# docs/bench/stop52_next_racecheck.sh.
# `run` with command `bash docs/bench/stop52_next_gpu_tests.sh`.
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16 TORCH_EXTENSIONS_DIR=$PWD/bench/ext
SECONDS=0
python -m flashmla_ops.build > $OUT/build.log 2>&1; echo "build rc $?"; tail -1 $OUT/build.log
echo "=== built at ${SECONDS}s"
timeout 200 python -m pytest -q -m gpu tests/ops/test_triton_kv_cache.py tests/models > $OUT/tests_new.log 2>&1
echo "kv-cache and model tests rc $?"; grep -E "passed|failed|FAILED|Error" $OUT/tests_new.log | tail -8
echo "=== at ${SECONDS}s"
timeout 300 python -m pytest -q -m gpu tests/ops/test_sanitizer.py > $OUT/tests_sanitizer.log 2>&1
echo "sanitizer tests rc $?"
grep -E "passed|failed|FAILED|ERROR SUMMARY|Invalid|Uninit" $OUT/tests_sanitizer.log | tail -8
echo "=== at ${SECONDS}s"
echo "=== done at ${SECONDS}s"
