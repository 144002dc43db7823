#!/bin/bash
# Stop 59, call 3: the Triton combine in column parts and one pass per lane against main's (stop59_combine_ab.py,
# with main's module written to flashmla_ops/triton/_main_decode.py before the call), then the Triton tests of the
# combine and of the launches it serves. `run` with `bash docs/bench/stop59_device_call3.sh`.
export PYTHONPATH=$PWD:$PWD/scripts
SECONDS=0
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
timeout 300 python docs/bench/stop59_combine_ab.py --rounds 2 --settle 1 > $OUT/combine_ab.log 2>&1
echo "combine A/B rc $? at ${SECONDS}s"; grep ": op" $OUT/combine_ab.log
chosen="column_parts or combine or wide or balanced_schedule or split or sparse_decode_matches or gpu_grid"
timeout $((570 - SECONDS)) python -m pytest -q -rf tests/ops/test_triton_decode.py tests/ops/test_triton_sparse.py \
  -k "$chosen or strided or never_reads" > $OUT/tests.log 2>&1
echo "Triton combine tests rc $? at ${SECONDS}s"; grep -E "passed|failed|FAILED|rror" $OUT/tests.log | tail -8
