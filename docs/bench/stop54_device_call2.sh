#!/bin/bash
# Stop 54, call 2: the GPU suite but the Triton decode, sparse and fitting tests (call 1 ran them), with stop 53's last
# test changes (unseen sparse rows held to 0, captured-kernel checks counting the capture's calls only, test_decode's
# and test_bf16_error's path assertions) that had not run on a GPU; then stop 53's racecheck comparison
# (docs/bench/stop53_next_racecheck.sh: [4500] by shape at 70 CTAs against 132).
# `run` with command `bash docs/bench/stop54_device_call2.sh`.
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16 TORCH_EXTENSIONS_DIR=$PWD/bench/ext
SECONDS=0
python -m flashmla_ops.build > $OUT/build.log 2>&1; echo "build rc $? at ${SECONDS}s"
timeout $((470 - SECONDS)) python -m pytest -q -m gpu tests --ignore=tests/ops/test_triton_decode.py \
  --ignore=tests/ops/test_triton_sparse.py --ignore=tests/ops/test_triton_fitting.py \
  --ignore=tests/ops/test_sanitizer.py > $OUT/tests_rest.log 2>&1
echo "GPU suite rc $?"; grep -E "passed|failed|FAILED|Error" $OUT/tests_rest.log | tail -12
echo "=== at ${SECONDS}s"
for only in "bf16 s_q1 h128 [4500] by shape" "bf16 s_q1 h128 [4500] scheduled"; do
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 50 compute-sanitizer --tool racecheck --print-limit 4 \
    python scripts/sanitize_ops.py --only "$only" > $OUT/race.log 2>&1
  echo "$only | rc $? | $(grep -E 'RACECHECK SUMMARY' $OUT/race.log) | $(grep -cE ' ok$' $OUT/race.log) ok"
  cp $OUT/race.log "$OUT/race_$(echo $only | tr -dc 'a-z0-9_').log"
done
echo "=== done at ${SECONDS}s"
