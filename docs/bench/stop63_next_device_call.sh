#!/bin/bash
# For the next device session. On the H100, `run` with command `bash docs/bench/stop63_next_device_call.sh`,
# timeout_s 300: the GPU test that stop 63 wrote after its last call (an FP8 checkpoint loaded onto the GPU, dequantized
# there, equals the CPU load bit for bit), with the rest of the loading and MoE model tests beside it.
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16 TORCH_EXTENSIONS_DIR=$PWD/bench/ext
SECONDS=0
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
timeout 240 python -m pytest -q -rfs tests/models/test_loading.py tests/models/test_deepseek.py -k "loading or load or \
grouped or experts" > $OUT/loading_tests.log 2>&1
echo "loading tests rc $? at ${SECONDS}s"; grep -E "passed|failed|FAILED|rror" $OUT/loading_tests.log | tail -6
