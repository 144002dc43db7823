#!/bin/bash
# Stop 60, call 3 (`run` with kind nvidia-h100-x1): the Triton sparse decode's splits merged in the kernel against the
# combine launch (docs/bench/stop60_merge_ab.py), then the GPU tests of the merge, the Triton sparse decode's grid
# and CUDA-graph tests in the time left.
export PYTHONPATH=$PWD:$PWD/scripts
SECONDS=0
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
timeout 230 python docs/bench/stop60_merge_ab.py --rounds 2 --settle 1 > $OUT/merge_ab.log 2>&1
echo "merge A/B rc $? at ${SECONDS}s"; grep -E ": |err [^0]" $OUT/merge_ab.log
timeout $((470 - SECONDS)) python -m pytest -q -rf -m gpu tests/ops/test_triton_sparse.py \
  -k "merges or cuda_graph or decode_gpu_grid" > $OUT/tests.log 2>&1
echo "Triton sparse tests rc $? at ${SECONDS}s"; grep -E "passed|failed|FAILED|rror" $OUT/tests.log | tail -8
