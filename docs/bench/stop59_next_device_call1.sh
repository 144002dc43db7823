#!/bin/bash
# For the next device session, on the H100 (`run` with kind nvidia-h100-x1, timeout_s 600): stop 59's two CUDA
# combine experiments, compiled here and never run, each against this tree's kernels (scripts/ab_kernels.py, every
# side checked by the CUDA decode tests first):
# - cp (docs/bench/stop59_cuda_combine_prefetch.diff): combine_weights loads the partials' scales with the LSEs (one
#   round of loads where it took two), and the many-splits combine issues its first group of partial loads before it
#   works out the weights, whose loads and barriers they then overlap (in the SASS the first group's eight LDG.64
#   come before the first BAR.SYNC);
# - bm (docs/bench/stop59_cuda_balanced_many_splits.diff): a balanced schedule (the FlashMLA API's path, with
#   get_mla_metadata's parts) of at least 16 parts a sequence takes the many-splits combine, where every balanced
#   schedule took the one-CTA-a-row combine_kernel (stop 19: 8.7 of 44 us at b1 h128 32k on the H200 for a uniform
#   split, before the many-splits kernel).
# Timed on the split rows (b1 h128 32k: 66 splits, b8 h16 32k: 33), split by shape and with --scheduled. Then the
# Triton decode file's GPU tests in the time left. `run` with command `bash docs/bench/stop59_next_device_call1.sh`;
# stop59_next_device_call2.sh has the Triton experiment.
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=8 TORCH_EXTENSIONS_DIR=$PWD/bench/ext
SECONDS=0
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
for side in cp:combine_prefetch bm:balanced_many_splits; do
  mkdir -p bench/${side%%:*} && rm -rf bench/${side%%:*}/csrc && cp -r csrc bench/${side%%:*}/ \
    && patch -s -d bench/${side%%:*} -p1 < docs/bench/stop59_cuda_${side#*:}.diff || exit 1
done
bases="--base-csrc bench/cp/csrc --base-csrc bench/bm/csrc"
timeout 400 python scripts/ab_kernels.py $bases --rounds 2 --tests "tests/ops/test_cuda_decode.py" \
  -- scripts/bench_decode.py --no-baselines --settle 3 --rows "b1 h128,b8 h16" > $OUT/ab.log 2>&1
echo "combine A/B rc $? at ${SECONDS}s"; grep -E "^(==|bf16)|passed|failed" $OUT/ab.log
timeout $((520 - SECONDS)) python scripts/ab_kernels.py $bases --rounds 2 \
  -- scripts/bench_decode.py --no-baselines --settle 3 --rows "b1 h128,b8 h16" --scheduled > $OUT/ab_scheduled.log 2>&1
echo "combine A/B, scheduled, rc $? at ${SECONDS}s"; grep -E "^(==|bf16)" $OUT/ab_scheduled.log
timeout $((585 - SECONDS)) python -m pytest -q tests/ops/test_triton_decode.py > $OUT/tests.log 2>&1
echo "Triton decode tests rc $? at ${SECONDS}s"; grep -E "passed|failed|FAILED|rror" $OUT/tests.log | tail -6
