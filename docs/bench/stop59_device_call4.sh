#!/bin/bash
# Stop 59, call 4: the combine as landed (one pass per lane, column parts only below one row an SM, no more lanes
# than splits) against main's (flashmla_ops/triton/_main_decode.py written before the call), the Triton dense SPEC
# rows, then the combine's GPU tests. `run` with `bash docs/bench/stop59_device_call4.sh`.
export PYTHONPATH=$PWD:$PWD/scripts
SECONDS=0
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
timeout 110 python docs/bench/stop59_combine_ab.py --rounds 2 --settle 1 --parts 4 > $OUT/combine_ab.log 2>&1
echo "combine A/B rc $? at ${SECONDS}s"; grep ": op" $OUT/combine_ab.log
timeout 45 python scripts/bench_decode.py --backend triton --no-baselines --settle 3 --rows "b1 h128,b8 h16" \
  --out $OUT/decode_triton > $OUT/decode_triton.log 2>&1
echo "bench_decode triton rc $? at ${SECONDS}s"; grep -E "^ *(bf16|fp8)" $OUT/decode_triton.log | head -8
timeout $((300 - SECONDS)) python -m pytest -q -rf tests/ops/test_triton_decode.py tests/ops/test_triton_sparse.py \
  -k "column_parts or combine or wide_batches or split_partials or sparse_decode_matches" > $OUT/tests.log 2>&1
echo "Triton combine tests rc $? at ${SECONDS}s"; grep -E "passed|failed|FAILED|rror" $OUT/tests.log | tail -8
