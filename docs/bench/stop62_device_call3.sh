#!/bin/bash
# Stop 62 call 3 (H100): the model GPU tests (compiled CUDA-graph generation against eager, BF16 error at V2-Lite's
# widths), then whole compiled decode steps at DeepSeek-V2-Lite's shapes with today's kernels (the README's H100
# end-to-end table is from 2026-11). `run` with command `bash docs/bench/stop62_device_call3.sh`, timeout_s 330 (the
# session's last ~460 s of device time).
export PYTHONPATH=$PWD:$PWD/scripts
SECONDS=0
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
timeout 200 python -m pytest -q -rfs -m gpu tests/models > $OUT/model_tests.log 2>&1
echo "model GPU tests rc $? at ${SECONDS}s"; grep -E "passed|failed|FAILED|rror" $OUT/model_tests.log | tail -6
timeout $((320 - SECONDS)) python scripts/bench_generate.py --model-preset v2-lite --batch 1,16,64 \
  --context 1024,32768 --steps 8 --warmup 3 --backends ours-compiled --out $OUT/generate \
  > $OUT/generate.log 2>&1
echo "bench_generate rc $? at ${SECONDS}s"; tail -25 $OUT/generate.log
