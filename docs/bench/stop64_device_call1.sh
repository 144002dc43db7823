#!/bin/bash
# Stop 64 call 1 (H100): stop 63's GPU loading test and the MoE experts' tests with the grouped-matmul rule, then the
# probe of the Triton FP8 dense decode with the latent tiles as a batch of 3-d products.
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16 TORCH_EXTENSIONS_DIR=$PWD/bench/ext
SECONDS=0
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
timeout 200 python -m pytest -q -rfs tests/models/test_loading.py tests/models/test_deepseek.py -k "loading or load or \
grouped or experts" > $OUT/loading_tests.log 2>&1
echo "loading tests rc $? at ${SECONDS}s"; grep -E "passed|failed|FAILED|rror" $OUT/loading_tests.log | tail -6
timeout 240 python docs/bench/stop64_fp8_tiles_probe.py > $OUT/tiles_probe.log 2>&1
echo "probe rc $? at ${SECONDS}s"; cat $OUT/tiles_probe.log | tail -20
