#!/bin/bash
# Stop 65 call 2, not run (no device time was left): whether the narrow kernel's CTAs finish apart by the SM they
# run on (docs/bench/stop65_sm_spread.py on a build recording every CTA).
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16 TORCH_EXTENSIONS_DIR=$PWD/bench/ext
SECONDS=0
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
FLASHMLA_EXTRA_CUDA_FLAGS="-DFLASHMLA_PHASES -DFLASHMLA_CTA_RECORD_STRIDE=1" python -m flashmla_ops.build \
    > $OUT/build_phases.log 2>&1; echo "phases build rc $? at ${SECONDS}s"
FLASHMLA_EXTRA_CUDA_FLAGS="-DFLASHMLA_PHASES -DFLASHMLA_CTA_RECORD_STRIDE=1" timeout 90 \
    python docs/bench/stop65_sm_spread.py 8:32768:16 128:4096:16 > $OUT/sm_spread.log 2>&1
echo "sm spread rc $? at ${SECONDS}s"; cat $OUT/sm_spread.log
