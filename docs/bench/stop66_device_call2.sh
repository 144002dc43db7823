#!/bin/bash
# Stop 66 call 2: the CUDA SPEC rows on main as it lands (the narrow kernel's staged output since call 1), each bench
# in a fresh process, then GPU test files not run since stop 63 in the time left (the device budget was nearly spent).
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16 TORCH_EXTENSIONS_DIR=$PWD/bench/ext
SECONDS=0
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit --format=csv
python -m flashmla_ops.build > $OUT/build.log 2>&1; echo "build rc $?"; tail -1 $OUT/build.log
echo "=== built at ${SECONDS}s"
timeout 90 python scripts/bench_decode.py --backend cuda --no-baselines --settle 10 \
  --out $OUT/decode_cuda > $OUT/decode_cuda.log 2>&1
echo "dense cuda rc $?"; grep -E "^bf16|^fp8|rror" $OUT/decode_cuda.log | grep -v Warning
timeout 90 python scripts/bench_sparse.py --backend cuda --no-reference --settle 10 \
  --out $OUT/sparse_cuda > $OUT/sparse_cuda.log 2>&1
echo "sparse cuda rc $?"; grep -E "^(decode|prefill)|rror" $OUT/sparse_cuda.log | grep -v Warning
echo "=== cuda at ${SECONDS}s"
timeout $((290 - SECONDS)) python -m pytest -q -m gpu tests/ops/test_cuda_sparse_decode.py \
  tests/ops/test_cuda_sparse_prefill.py tests/ops/test_extra_cache.py tests/ops/test_attn_sink.py \
  tests/ops/test_cuda_kv_cache.py > $OUT/tests.log 2>&1
echo "tests rc $? at ${SECONDS}s"; grep -E "passed|failed|FAILED|rror" $OUT/tests.log | tail -8
