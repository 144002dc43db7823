#!/bin/bash
# Stop 64 call 4 (H100): the model GPU tests after takes_grouped_mm's final form (the compiled CUDA-graph decode steps
# of batches above one take torch._grouped_mm inside dynamo's trace on Hopper) and the CPU-only inductor option.
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16 TORCH_EXTENSIONS_DIR=$PWD/bench/ext
SECONDS=0
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
timeout 420 python -m pytest -q -rfs -m gpu tests/models/test_generation.py tests/models/test_deepseek.py \
    > $OUT/model_gpu_tests.log 2>&1
echo "model GPU tests rc $? at ${SECONDS}s"; tail -5 $OUT/model_gpu_tests.log
