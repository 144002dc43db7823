#!/bin/bash
# Stop 69, call 1: next_device_call1.sh and next_device_call3.sh (prepared in stop 68) in one call, as machine starts
# were scarce, most important first, each step cut to what is left of LIMIT seconds (the first argument, default 590).
# 1. This stop's new GPU tests: the indexer's relu keeping NaN, q with zero strides, metadata that is not
#    get_mla_metadata's (for_each_piece / combine_slots cut every value to its bounds).
# 2. The CUDA decode, reference and API GPU tests: stop 68's stale-schedule fix (for_each_piece) and the dense
#    reference under CUDA-graph capture, and every other test of the changed schedule code.
# 3. The FLASHMLA_DENSE_FP8_PAIRS experiment (built in the background since step 1) against the tree by
#    scripts/ab_kernels.py: the CUDA decode tests on its kernels, then docs/bench/stop67_fp8_many_heads.py, ABBA.
# 4. The dense CUDA SPEC rows.
# Steps 3-4 only where LIMIT is 500 or more; a shorter call runs steps 1-2's new tests only.
# `run` with command `bash docs/bench/stop69_device_call1.sh [LIMIT]`.
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16 TORCH_EXTENSIONS_DIR=$PWD/bench/ext
LIMIT=${1:-590}
SECONDS=0
left() { local t=$((LIMIT - SECONDS - $1)); echo $((t > 1 ? t : 1)); }  # timeout 0 would mean none
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit --format=csv
rm -rf bench/pairs && mkdir -p bench/pairs && cp -r csrc bench/pairs/
sed -i '1i #define FLASHMLA_DENSE_FP8_PAIRS' bench/pairs/csrc/dense_decode.cu
python -m flashmla_ops.build > $OUT/build.log 2>&1; echo "build rc $?"; tail -1 $OUT/build.log
echo "=== built at ${SECONDS}s"
NEW="keep_nan or broadcast_q or whatever_the_metadata or takes_any_metadata or ignores_the_metadata"
RESERVE=$((LIMIT >= 500 ? 200 : 10))  # for the experiment and the SPEC rows, where the call is long enough for them
if [ $RESERVE -eq 10 ]; then  # a short call: this stop's and stop 68's new tests, then the balanced schedules'
  STOP68="other_lengths or untracked_length_write or replays_in_cuda_graph or balanced"
  timeout $(left 5) python -m pytest -v -rf -m gpu tests/ops/test_cuda_decode.py \
    -k "whatever_the_metadata or takes_any_metadata or other_lengths or untracked_length_write" \
    > $OUT/tests_first.log 2>&1
  echo "first tests rc $? at ${SECONDS}s: $(grep -c " PASSED" $OUT/tests_first.log) PASSED"
  grep -E "FAILED|ERROR|passed|failed" $OUT/tests_first.log | tail -12
  timeout $(left 5) python -m pytest -v -rf -m gpu -k "$NEW or $STOP68" tests/ops/test_cuda_decode.py \
    tests/ops/test_cuda_sparse_decode.py tests/ops/test_cuda_indexer_logits.py tests/ops/test_indexer.py \
    tests/ops/test_decode.py tests/ops/test_triton_indexer.py tests/ops/test_triton_decode.py > $OUT/tests_new.log 2>&1
  echo "tests rc $? at ${SECONDS}s: $(grep -c " PASSED" $OUT/tests_new.log) PASSED"
  grep -E "FAILED|ERROR|passed|failed" $OUT/tests_new.log | tail -12
  exit 0
fi
if [ $RESERVE -gt 10 ]; then
  MAX_JOBS=12 python scripts/ab_kernels.py --base-csrc bench/pairs/csrc --side base > $OUT/pairs_build.log 2>&1 &
  pairs=$!
fi
timeout $(left $((RESERVE + 150))) python -m pytest -v -rf -m gpu -k "$NEW" tests/ops/test_cuda_decode.py \
  tests/ops/test_cuda_sparse_decode.py tests/ops/test_cuda_indexer_logits.py tests/ops/test_indexer.py \
  tests/ops/test_triton_indexer.py tests/ops/test_triton_decode.py > $OUT/tests_new.log 2>&1
echo "new tests rc $? at ${SECONDS}s"; grep -E "FAILED|ERROR|passed|failed" $OUT/tests_new.log | tail -12
timeout $(left $RESERVE) python -m pytest -v -rf -m gpu -x -k "not ($NEW)" tests/ops/test_cuda_decode.py \
  tests/ops/test_decode.py tests/ops/test_interface.py > $OUT/tests_cuda.log 2>&1
echo "cuda tests rc $? at ${SECONDS}s: $(grep -c " PASSED" $OUT/tests_cuda.log) PASSED"
grep -E "FAILED|ERROR|passed|failed" $OUT/tests_cuda.log | tail -8
[ $RESERVE -gt 10 ] || exit 0
wait $pairs; echo "pairs build rc $? at ${SECONDS}s"; tail -2 $OUT/pairs_build.log
timeout $(left 45) python scripts/ab_kernels.py --base-csrc bench/pairs/csrc --rounds 2 \
  --tests "-m gpu tests/ops/test_cuda_decode.py" -- docs/bench/stop67_fp8_many_heads.py > $OUT/ab_pairs.log 2>&1
echo "ab rc $? at ${SECONDS}s"
grep -E "^==|passed|failed|FAILED|^b[0-9]|ab_kernels|rror" $OUT/ab_pairs.log | grep -v Warning | tail -40
timeout $(left 3) python scripts/bench_decode.py --backend cuda --no-baselines --settle 3 --out $OUT/decode_cuda \
  > $OUT/decode_cuda.log 2>&1
echo "dense cuda rc $? at ${SECONDS}s"; grep -E "^bf16|^fp8|rror" $OUT/decode_cuda.log | grep -v Warning
