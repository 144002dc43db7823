#!/bin/bash
# For the next device session, on the H100 (`run` with kind nvidia-h100-x1, timeout_s 600), written and run on the CPU
# here (its sides under the interpreter), never on a GPU: docs/bench/stop60_partials_ab.py, the Triton split launches
# of two splits with f16 partials (decode.HALF_PARTIALS_FROM_SPLITS 2 against 8) on the sparse FP8 decode b64 h64 and
# the three dense SPEC rows of two splits, and that sparse row at three and four splits; then the whole Triton dense
# decode test file on the GPU, which stop 60's call 1 left unfinished (154 passed before its timeout). If a side
# wins on its rows, make it the default (HALF_PARTIALS_FROM_SPLITS; sparse.num_splits_for) and record it in
# docs/HISTORY.md and the README; else record it as not kept. `run` with command
# `bash docs/bench/stop60_next_device_call.sh`.
export PYTHONPATH=$PWD:$PWD/scripts
SECONDS=0
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
timeout 260 python docs/bench/stop60_partials_ab.py --rounds 2 --settle 1 > $OUT/partials_ab.log 2>&1
echo "partials A/B rc $? at ${SECONDS}s"; grep -E ": |err [^0-9]*[1-9]e-0[0-2]|inf" $OUT/partials_ab.log
timeout $((585 - SECONDS)) python -m pytest -q -rf tests/ops/test_triton_decode.py > $OUT/tests.log 2>&1
echo "Triton decode tests rc $? at ${SECONDS}s"; grep -E "passed|failed|FAILED|rror" $OUT/tests.log | tail -6
