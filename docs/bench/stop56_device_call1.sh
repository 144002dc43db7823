#!/bin/bash
# Stop 56, call 1 (an H100): the SPEC rows of both paths on the kernels as they land (the README's H100 table: the
# CUDA column was stop 52's, the Triton one stop 54's, and stop 55 changed the Triton sparse prefill's default), each
# bench in a fresh process; stop 55's prefill A/B (stop54_prefill_lookahead.py: "default" is the former default,
# "lookahead" the landed one); then the Triton prefill tests and stop 55's integer-decoding test on the GPU in the time
# left. `run` with command `bash docs/bench/stop56_device_call1.sh`.
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
timeout 150 python docs/bench/stop54_prefill_lookahead.py --rounds 2 --settle 3 > $OUT/prefill_ab.log 2>&1
echo "prefill A/B rc $? at ${SECONDS}s"; grep -E "round|rror" $OUT/prefill_ab.log
timeout $((570 - SECONDS)) python -m pytest -q tests/ops/test_triton_sparse.py \
  -k "prefill or integer_decoding or reads_indices" > $OUT/tests.log 2>&1
echo "tests rc $? at ${SECONDS}s"; grep -E "passed|failed|FAILED|rror" $OUT/tests.log | tail -8
