#!/bin/bash
# Stop 65's call 3, not run (no device time was left): the narrow kernel's output staged in shared memory and stored
# in 16-byte chunks (the wide kernel's store_output scheme) against main's scalar stores, then the dense decode GPU
# tests on the tree's kernels (built by the A/B). Before it: `git apply docs/bench/stop65_narrow_staged_output.diff`
# and `mkdir -p bench/base65 && git archive HEAD csrc | tar -x -C bench/base65` (carried: run's carry bench/base65).
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16 TORCH_EXTENSIONS_DIR=$PWD/bench/ext
SECONDS=0
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
timeout 200 python scripts/ab_kernels.py --base-csrc bench/base65/csrc --rounds 2 -- scripts/bench_decode.py \
    --backend cuda --no-baselines --settle 1 --rows "b8 h16,b128 h16 4k" > $OUT/ab.log 2>&1
echo "ab rc $? at ${SECONDS}s"; grep -E "^(==|bf16|fp8)|ab_kernels" $OUT/ab.log | head -40
timeout $((250 - SECONDS)) python -m pytest -q -x -m gpu tests/ops/test_cuda_decode.py tests/ops/test_attn_sink.py \
    tests/ops/test_decode.py > $OUT/cuda_decode_tests.log 2>&1
echo "tests rc $? at ${SECONDS}s"; tail -3 $OUT/cuda_decode_tests.log
