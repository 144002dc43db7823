#!/bin/bash
# Stop 52's first device call: what stop 51 left un-run, and the CUDA kernels under compute-sanitizer for the first
# time. The CUDA SPEC rows on the kernels since the extra-cache change (DecodeParams::slots_per_z / first_slot place
# every uniform split's partial), then the Triton SPEC rows on the same card (the README's Triton column came from an
# H200 in stops 42-43), each bench in a fresh process; the models' GPU tests (not run since stop 50); then memcheck
# over every CUDA kernel (scripts/sanitize_ops.py: exact-size allocations, the caching allocator off).
# `run` with command `bash docs/bench/stop52_device_call1.sh`; then stop52_device_call2.sh.
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16 TORCH_EXTENSIONS_DIR=$PWD/bench/ext
SECONDS=0
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit --format=csv
python -m flashmla_ops.build > $OUT/build.log 2>&1; echo "build rc $?"; tail -2 $OUT/build.log
echo "=== built at ${SECONDS}s"
for backend in cuda triton; do
  timeout 120 python scripts/bench_decode.py --backend $backend --no-baselines --settle 10 \
    --out $OUT/decode_$backend > $OUT/decode_$backend.log 2>&1
  echo "dense $backend rc $?"; grep -E "^bf16|^fp8|rror" $OUT/decode_$backend.log | grep -v Warning
  echo "=== dense $backend at ${SECONDS}s"
  timeout 150 python scripts/bench_sparse.py --backend $backend --no-reference --settle 10 \
    --out $OUT/sparse_$backend > $OUT/sparse_$backend.log 2>&1
  echo "sparse $backend rc $?"; grep -E "^(decode|prefill)|rror" $OUT/sparse_$backend.log | grep -v Warning
  echo "=== sparse $backend at ${SECONDS}s"
done
timeout 200 python -m pytest -m gpu -q --durations=5 tests/models > $OUT/tests_models_gpu.log 2>&1
echo "model tests rc $?"; grep -E "passed|failed|FAILED|ERROR" $OUT/tests_models_gpu.log | tail -8
echo "=== model tests at ${SECONDS}s"
PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout $((590 - SECONDS)) compute-sanitizer --tool memcheck --error-exitcode 9 \
  --print-limit 20 python scripts/sanitize_ops.py --backend cuda > $OUT/memcheck_cuda.log 2>&1
echo "memcheck rc $?"; grep -vE "^(dense|sparse|quantize|write|indexer|get_mla)" $OUT/memcheck_cuda.log | tail -30
grep -cE " ok$" $OUT/memcheck_cuda.log
echo "=== done at ${SECONDS}s"
