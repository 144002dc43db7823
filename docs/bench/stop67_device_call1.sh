#!/bin/bash
# Stop 67 call 1: the SPEC rows of both paths on main as it stands (the README's CUDA column is stop 56's, before
# stop 66's staged narrow output; its Triton column stop 62's), each bench in a fresh process, the indexer logits row of
# both; docs/bench/stop67_fp8_many_heads.py (the FP8 cache against BF16 at 64 and 128 query rows, CUDA); then, in the
# time left, the new Triton tests of rows past int32 offsets and the GPU tests that have not run since stop 63 (the
# models', the sparse, sink, extra-cache, KV-cache, indexer and metadata files).
# `run` with command `bash docs/bench/stop67_device_call1.sh`.
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
  timeout 90 python scripts/bench_indexer.py --backend $backend --no-reference --settle 5 \
    --rows "logits fp8 s_q" --out $OUT/indexer_$backend > $OUT/indexer_$backend.log 2>&1
  echo "indexer $backend rc $?"; grep -E "^ *logits|rror" $OUT/indexer_$backend.log | grep -v Warning
  echo "=== $backend at ${SECONDS}s"
done
timeout 100 python docs/bench/stop67_fp8_many_heads.py > $OUT/fp8_many_heads.log 2>&1
echo "fp8 many heads rc $? at ${SECONDS}s"; grep -vE "Warning|warn" $OUT/fp8_many_heads.log | tail -7
timeout $((480 - SECONDS)) python -m pytest -q -rf -m gpu tests/ops/test_triton_large_offsets.py tests/models \
  tests/ops/test_cuda_sparse_decode.py \
  tests/ops/test_cuda_sparse_prefill.py tests/ops/test_extra_cache.py tests/ops/test_attn_sink.py \
  tests/ops/test_cuda_kv_cache.py tests/ops/test_cuda_indexer_logits.py tests/ops/test_cuda_indexer_topk.py \
  tests/ops/test_metadata.py tests/ops/test_decode.py tests/ops/test_sparse_prefill.py tests/ops/test_indexer.py \
  tests/ops/test_kv_cache.py tests/ops/test_interface.py tests/ops/test_validation.py > $OUT/tests.log 2>&1
echo "tests rc $? at ${SECONDS}s"; grep -E "passed|failed|FAILED|rror" $OUT/tests.log | tail -12
