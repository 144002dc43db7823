#!/bin/bash
# Stop 66 call 1: (1) the narrow kernel's output staged in shared memory and stored in 16-byte chunks (stop 65's
# docs/bench/stop65_narrow_staged_output.diff, applied to the tree) against main's scalar stores (bench/base66/csrc =
# git archive of HEAD's csrc, carried), the h16 SPEC rows in one process each side; (2) the GPU tests of the tree's
# kernels: the dense decode's, stop 65's sparse NaN tests (default path and Triton), the Triton KV write and dispatch;
# (3) on a -DFLASHMLA_PHASES build recording every CTA: whether a CTA's loop end follows its SM across runs
# (docs/bench/stop65_sm_spread.py) and the narrow kernel's epilogue marks (docs/bench/marks_b1.py).
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16 TORCH_EXTENSIONS_DIR=$PWD/bench/ext
SECONDS=0
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
timeout 260 python scripts/ab_kernels.py --base-csrc bench/base66/csrc --rounds 2 -- scripts/bench_decode.py \
    --backend cuda --no-baselines --settle 1 --rows "b8 h16,b128 h16" > $OUT/ab.log 2>&1
echo "ab rc $? at ${SECONDS}s"; grep -E "^(==|bf16|fp8)|ab_kernels|rounds?" $OUT/ab.log | head -40
PH="-DFLASHMLA_PHASES -DFLASHMLA_CTA_RECORD_STRIDE=1"
(FLASHMLA_EXTRA_CUDA_FLAGS="$PH" MAX_JOBS=8 python -m flashmla_ops.build > $OUT/build_phases.log 2>&1; \
 echo "phases build rc $?" >> $OUT/build_phases.log) &
BUILD=$!
timeout 150 python -m pytest -q -x -m gpu tests/ops/test_cuda_decode.py tests/ops/test_dispatch.py \
    tests/ops/test_triton_kv_cache.py > $OUT/tests_decode.log 2>&1
echo "tests rc $? at ${SECONDS}s"; tail -3 $OUT/tests_decode.log
timeout 90 python -m pytest -q -m gpu tests/ops/test_decode.py tests/ops/test_sparse_prefill.py \
    -k "reads_no_slot or reads_no_row" > $OUT/tests_nan.log 2>&1
echo "nan tests rc $? at ${SECONDS}s"; tail -2 $OUT/tests_nan.log
FLASHMLA_BACKEND=triton timeout 90 python -m pytest -q -m gpu tests/ops/test_decode.py tests/ops/test_sparse_prefill.py \
    -k "reads_no_slot or reads_no_row" > $OUT/tests_nan_triton.log 2>&1
echo "nan tests (triton) rc $? at ${SECONDS}s"; tail -2 $OUT/tests_nan_triton.log
wait $BUILD; tail -1 $OUT/build_phases.log; echo "at ${SECONDS}s"
export FLASHMLA_EXTRA_CUDA_FLAGS="$PH"
timeout 100 python docs/bench/stop65_sm_spread.py 8:32768:16 128:4096:16 > $OUT/sm_spread.log 2>&1
echo "sm spread rc $? at ${SECONDS}s"; cat $OUT/sm_spread.log | cut -c1-600
MARKS_SHAPES="8:32768:16,128:4096:16" timeout 80 python docs/bench/marks_b1.py > $OUT/marks.log 2>&1
echo "marks rc $? at ${SECONDS}s"; grep -v "^      " $OUT/marks.log | head -60
