#!/bin/bash
# Prepared in stop 68 (no device time that session) for the next device session, call 1: the GPU tests of what
# changed without a GPU, then the SPEC rows of both paths against the README's (stop 67's) to show nothing slowed.
# - for_each_piece (csrc/decode_common.cuh): a sequence's last piece of a balanced schedule runs to the sequence's end,
#   so metadata made for other lengths no longer leaves grown sequences' blocks unread (the new
#   test_cuda_dense_decode_schedule_made_for_other_lengths and test_flashmla_api_schedule_reused_after_an_untracked_
#   length_write, then the whole CUDA and Triton decode files, the kernels' every other test of the balanced schedule);
# - the dense reference under CUDA-graph capture (test_float32_dense_decode_replays_in_cuda_graph, test_decode.py).
# `run` with command `bash docs/bench/next_device_call1.sh`.
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16 TORCH_EXTENSIONS_DIR=$PWD/bench/ext
SECONDS=0
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit --format=csv
python -m flashmla_ops.build > $OUT/build.log 2>&1; echo "build rc $?"; tail -1 $OUT/build.log
echo "=== built at ${SECONDS}s"
timeout 300 python -m pytest -v -rf -m gpu -x tests/ops/test_cuda_decode.py tests/ops/test_decode.py \
  tests/ops/test_interface.py > $OUT/tests_cuda.log 2>&1
echo "cuda tests rc $? at ${SECONDS}s: $(grep -c " PASSED" $OUT/tests_cuda.log) PASSED"
grep -E "FAILED|ERROR|passed|failed" $OUT/tests_cuda.log | tail -8
for backend in cuda triton; do
  timeout 120 python scripts/bench_decode.py --backend $backend --no-baselines --settle 10 \
    --out $OUT/decode_$backend > $OUT/decode_$backend.log 2>&1
  echo "dense $backend rc $? at ${SECONDS}s"; grep -E "^bf16|^fp8|rror" $OUT/decode_$backend.log | grep -v Warning
done
timeout $((580 - SECONDS)) python -m pytest -v -rf -m gpu tests/ops/test_triton_decode.py > $OUT/tests_triton.log 2>&1
echo "triton tests rc $? at ${SECONDS}s: $(grep -c " PASSED" $OUT/tests_triton.log) PASSED"
grep -E "FAILED|ERROR|passed|failed" $OUT/tests_triton.log | tail -8
