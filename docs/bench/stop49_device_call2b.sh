#!/bin/bash
# Prepared in stop 49: the models' GPU tests (CUDA-graph decode, continuations over bf16 and FP8 caches through the
# decode kernels, generation), after stop48_device_call2.sh ran the op tests; the 2-GPU NCCL cases skip on one GPU.
# `run` with command `bash docs/bench/stop49_device_call2b.sh`; then stop48_device_call3.sh.
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16
SECONDS=0
python -m flashmla_ops.build > $OUT/build.log 2>&1; echo "build rc $?"
echo "=== built at ${SECONDS}s"
timeout $((570 - SECONDS)) python -m pytest -m gpu -q --durations=10 tests/models > $OUT/tests_models_gpu.log 2>&1
echo "tests rc $?"
grep -E "passed|failed|FAILED|ERROR" $OUT/tests_models_gpu.log | tail -15
echo "=== done at ${SECONDS}s"
