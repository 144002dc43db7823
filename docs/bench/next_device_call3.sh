#!/bin/bash
# Prepared in stop 68 (not yet run): the FLASHMLA_DENSE_FP8_PAIRS experiment, dense decode over the FP8 cache through
# attend_pairs (each warpgroup gathering and widening its own block, as the sparse FP8 decode does) instead of
# attend_piece, against main by scripts/ab_kernels.py: a copy of csrc with the macro defined is the base side, both
# sides build in parallel, the CUDA decode tests run on the experiment's kernels first (every dense FP8 test of the
# wide kernel then runs it), then docs/bench/stop67_fp8_many_heads.py in ABBA rounds, each run in a fresh process.
# Compiled in stop 68 without a GPU: the default build's SASS is unchanged; the experiment's dense FP8 kernels take
# 254-255 registers, 8 bytes of spills with partials. `run` with command `bash docs/bench/next_device_call3.sh`.
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16 TORCH_EXTENSIONS_DIR=$PWD/bench/ext
SECONDS=0
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit --format=csv
rm -rf bench/pairs && mkdir -p bench/pairs && cp -r csrc bench/pairs/
sed -i '1i #define FLASHMLA_DENSE_FP8_PAIRS' bench/pairs/csrc/dense_decode.cu
timeout 570 python scripts/ab_kernels.py --base-csrc bench/pairs/csrc --rounds 2 \
  --tests "-m gpu tests/ops/test_cuda_decode.py" -- docs/bench/stop67_fp8_many_heads.py > $OUT/ab_pairs.log 2>&1
echo "ab rc $? at ${SECONDS}s"
grep -E "^==|passed|failed|FAILED|^b[0-9]|ab_kernels|rror" $OUT/ab_pairs.log | grep -v Warning | tail -40
