#!/bin/bash
# Prepared in stop 68 (not yet run): the FLASHMLA_DENSE_FP8_PAIRS experiment, dense decode over the FP8 cache through
# attend_pairs (each warpgroup gathering and widening its own block, as the sparse FP8 decode does) instead of
# attend_piece. Its build in its own extension directory beside main's; the CUDA decode tests on it (every dense FP8
# test of the wide kernel then runs the experiment); then docs/bench/stop67_fp8_many_heads.py on main and on it,
# alternating, two rounds (each in a fresh process). Compiled in stop 68 without a GPU: the default build's SASS is
# unchanged; the experiment's dense FP8 kernels take 254-255 registers, 8 bytes of spills with partials.
# `run` with command `bash docs/bench/next_device_call3.sh`.
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16
SECONDS=0
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit --format=csv
side() {  # side main|pairs command...: the command on that side's build
  local name=$1; shift
  if [ "$name" = pairs ]; then
    FLASHMLA_EXTRA_CUDA_FLAGS=-DFLASHMLA_DENSE_FP8_PAIRS TORCH_EXTENSIONS_DIR=$PWD/bench/ext_pairs "$@"
  else
    TORCH_EXTENSIONS_DIR=$PWD/bench/ext "$@"
  fi
}
side main python -m flashmla_ops.build > $OUT/build_main.log 2>&1 &
side pairs python -m flashmla_ops.build > $OUT/build_pairs.log 2>&1; echo "pairs build rc $?"; wait
echo "=== built at ${SECONDS}s"; tail -1 $OUT/build_main.log
side pairs timeout 240 python -m pytest -v -rf -m gpu -x tests/ops/test_cuda_decode.py > $OUT/tests_pairs.log 2>&1
echo "pairs tests rc $? at ${SECONDS}s: $(grep -c " PASSED" $OUT/tests_pairs.log) PASSED"
grep -E "FAILED|ERROR|passed|failed" $OUT/tests_pairs.log | tail -8
for round in 1 2; do
  for name in main pairs; do
    side $name timeout 100 python docs/bench/stop67_fp8_many_heads.py > $OUT/fp8_${name}_$round.log 2>&1
    echo "== $name round $round rc $? at ${SECONDS}s"; grep -vE "Warning|warn" $OUT/fp8_${name}_$round.log | tail -6
  done
done
