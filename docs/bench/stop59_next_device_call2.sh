#!/bin/bash
# For the next device session, on the H100 (`run` with kind nvidia-h100-x1, timeout_s 600): stop 59's Triton combine
# experiment, written and tested on the CPU here, never run on a GPU (docs/bench/stop59_triton_combine_lse_first.diff:
# the row's largest LSE first, in one step up to 128 splits, then the partials at their final weights, where the
# landed combine rescales every lane's row at each step; compiled for sm_90, its step loop is 435 instructions against
# 576 and the kernel 128 registers against 167, for one more dependent round of loads, the LSEs', before the first
# partials). Before the call, here: `git show HEAD:flashmla_ops/triton/decode.py > flashmla_ops/triton/_main_decode.py`
# (main's module, the A/B's `main` side; not committed). On the device it patches its copy of the tree, times it
# against main on the split rows (docs/bench/stop59_combine_ab.py), then runs the Triton decode and sparse GPU tests of
# the combine on it. `run` with command `bash docs/bench/stop59_next_device_call2.sh`.
export PYTHONPATH=$PWD:$PWD/scripts
SECONDS=0
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
test -f flashmla_ops/triton/_main_decode.py && patch -s -p1 < docs/bench/stop59_triton_combine_lse_first.diff || exit 1
timeout 200 python docs/bench/stop59_combine_ab.py --rounds 2 --settle 1 --parts 4 > $OUT/combine_ab.log 2>&1
echo "combine A/B rc $? at ${SECONDS}s"; grep ": op" $OUT/combine_ab.log
chosen="column_parts or combine or wide_batches or split_partials or sparse_decode_matches"
timeout $((585 - SECONDS)) python -m pytest -q -rf tests/ops/test_triton_decode.py tests/ops/test_triton_sparse.py \
  tests/ops/test_triton_compile.py -k "$chosen" > $OUT/tests.log 2>&1
echo "Triton combine tests rc $? at ${SECONDS}s"; grep -E "passed|failed|FAILED|rror" $OUT/tests.log | tail -6
