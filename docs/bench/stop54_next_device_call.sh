#!/bin/bash
# Written in stop 54 for the next device session (not run): the three Triton experiments stop 54 left untimed, in one
# call of ~6-8 minutes on a warm H100 (a cold start adds 2-4). It changes only the device's copy of the tree:
#   1. the sparse prefill's indices a step early (TileConfig.lookahead, opt-in), default against it;
#   2. docs/bench/stop54_prefetch_page_ahead.diff (the FP8 h16 row's page two tiles ahead) against the tree's kernel:
#      stop54_lookahead_ab.py with the tree's decode.py as its base;
#   3. docs/bench/stop54_wide_latent.diff (a BF16 cache's latent as one 512-wide product): stop54_apart_ab.py
#      --flip wide_latent on the dense h128 rows;
# then the Triton decode and prefill tests with both diffs (the review's GPU parametrizations among them, which
# have not run on a GPU either, and stop 55's test of the sparse decode's integer e4m3 decoding).
# `run` with command `bash docs/bench/stop54_next_device_call.sh`.
export PYTHONPATH=$PWD:$PWD/scripts
SECONDS=0
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
timeout 120 python docs/bench/stop54_prefill_lookahead.py --rounds 2 --settle 3 > $OUT/prefill_ab.log 2>&1
echo "prefill lookahead A/B rc $? at ${SECONDS}s"; grep -E "round|Error" $OUT/prefill_ab.log
cp flashmla_ops/triton/decode.py docs/bench/stop54_decode_base.py
patch -p1 --no-backup-if-mismatch < docs/bench/stop54_prefetch_page_ahead.diff > $OUT/patch.log 2>&1 &&
  patch -p1 --no-backup-if-mismatch < docs/bench/stop54_wide_latent.diff >> $OUT/patch.log 2>&1
echo "patches rc $?"
timeout 120 python docs/bench/stop54_lookahead_ab.py --rounds 2 --settle 3 > $OUT/page_ahead_ab.log 2>&1
echo "page-ahead A/B rc $? at ${SECONDS}s"; grep -E "round .*fp8|Error" $OUT/page_ahead_ab.log
timeout 120 python docs/bench/stop54_apart_ab.py --rounds 2 --settle 3 --flip wide_latent > $OUT/wide_ab.log 2>&1
echo "wide-latent A/B rc $? at ${SECONDS}s"; grep -E "round|Error" $OUT/wide_ab.log
timeout $((570 - SECONDS)) python -m pytest -q tests/ops/test_triton_decode.py tests/ops/test_triton_sparse.py \
  -k "wide_latent or apart or prefetch or latent_loading or prefill or gpu_grid or integer_decoding" > $OUT/tests.log 2>&1
echo "tests rc $?"; grep -E "passed|failed|FAILED|Error" $OUT/tests.log | tail -8
echo "=== done at ${SECONDS}s"
