#!/bin/bash
# Stop 66 call 2: the SPEC rows of both paths on main as it lands (the narrow kernel's staged output since call 1),
# each bench in a fresh process, then GPU test files not run since stop 63 in the time left.
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16 TORCH_EXTENSIONS_DIR=$PWD/bench/ext
SECONDS=0
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit --format=csv
python -m flashmla_ops.build > $OUT/build.log 2>&1; echo "build rc $?"; tail -1 $OUT/build.log
echo "=== built at ${SECONDS}s"
for backend in cuda triton; do
  timeout 120 python scripts/bench_decode.py --backend $backend --no-baselines --settle 10 \
    --out $OUT/decode_$backend > $OUT/decode_$backend.log 2>&1
  echo "dense $backend rc $?"; grep -E "^bf16|^fp8|rror" $OUT/decode_$backend.log | grep -v Warning
  timeout 150 python scripts/bench_sparse.py --backend $backend --no-reference --settle 10 \
    --out $OUT/sparse_$backend > $OUT/sparse_$backend.log 2>&1
  echo "sparse $backend rc $?"; grep -E "^(decode|prefill)|rror" $OUT/sparse_$backend.log | grep -v Warning
  echo "=== $backend at ${SECONDS}s"
done
timeout $((400 - SECONDS)) python -m pytest -q -m gpu tests/ops/test_cuda_sparse_decode.py \
  tests/ops/test_cuda_sparse_prefill.py tests/ops/test_extra_cache.py tests/ops/test_attn_sink.py \
  tests/ops/test_cuda_kv_cache.py tests/ops/test_interface.py > $OUT/tests.log 2>&1
echo "tests rc $? at ${SECONDS}s"; grep -E "passed|failed|FAILED|rror" $OUT/tests.log | tail -8
