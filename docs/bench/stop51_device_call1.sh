#!/bin/bash
# Stop 51's first device call (few machines were lent: the most needed first). The extra-cache change
# (docs/bench/stop50_extra_cache_one_combine.diff, applied: uniform splits' partial slots from slots_per_z /
# first_slot) with its tests, stop 50's refactored sink tests (never run on a GPU) and the CUDA decode tests; the
# Triton FP8 dense decode with P V's latent reloaded (LaunchConfig.reload) against the prefetch default, its tests
# first; the extra-cache rows (CUDA in one extension call against Triton's one pass).
# `run` with command `bash docs/bench/stop51_device_call1.sh`; then stop51_device_call2.sh.
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16 TORCH_EXTENSIONS_DIR=$PWD/bench/ext
SECONDS=0
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv
python -m flashmla_ops.build > $OUT/build.log 2>&1; echo "build rc $?"; tail -2 $OUT/build.log
echo "=== built at ${SECONDS}s"
timeout 200 python -m pytest -q -m gpu --durations=5 tests/ops/test_extra_cache.py tests/ops/test_attn_sink.py \
  tests/ops/test_cuda_sparse_decode.py tests/ops/test_cuda_decode.py > $OUT/tests_cuda.log 2>&1
echo "cuda tests rc $?"; grep -E "passed|failed|FAILED|Error" $OUT/tests_cuda.log | tail -12
echo "=== cuda tests at ${SECONDS}s"
timeout 60 python -m pytest -q tests/ops/test_triton_decode.py -k "latent_loading" > $OUT/tests_reload.log 2>&1
echo "reload tests rc $?"; grep -E "passed|failed|FAILED|Error" $OUT/tests_reload.log | tail -8
echo "=== reload tests at ${SECONDS}s"
timeout 150 python docs/bench/stop51_triton_reload.py 2 2>&1 | grep -v Warning | tee $OUT/reload.log
echo "=== reload timed at ${SECONDS}s"
timeout $((590 - SECONDS)) python docs/bench/stop46_sink_paths.py 2 extra 2>&1 | grep -v Warning | tee $OUT/extra.log
echo "=== done at ${SECONDS}s"
