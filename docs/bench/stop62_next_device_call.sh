#!/bin/bash
# For the next device session. On the H100, `run` with command `bash docs/bench/stop62_next_device_call.sh`,
# timeout_s 600: the CUDA KV-cache tests (stop 62's call 4 ran them: 43 passed; here they build the extension first),
# the model GPU tests (stop 62's call 5 ran test_generation.py's: 18 passed; the others, BF16 error at V2-Lite's widths
# among them, have not run since stop 34), then whole compiled decode steps at DeepSeek-V2-Lite's shapes with today's
# kernels (the README's H100 end-to-end table is from 2026-11).
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16 TORCH_EXTENSIONS_DIR=$PWD/bench/ext
SECONDS=0
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
timeout 240 python -m pytest -q -rfs tests/ops/test_cuda_kv_cache.py > $OUT/kv_tests.log 2>&1
echo "CUDA KV-cache tests rc $? at ${SECONDS}s"; grep -E "passed|failed|FAILED|rror" $OUT/kv_tests.log | tail -6
timeout 200 python -m pytest -q -rfs -m gpu tests/models > $OUT/model_tests.log 2>&1
echo "model GPU tests rc $? at ${SECONDS}s"; grep -E "passed|failed|FAILED|rror" $OUT/model_tests.log | tail -6
timeout $((585 - SECONDS)) python scripts/bench_generate.py --model-preset v2-lite --batch 1,16,64 \
  --context 1024,32768 --steps 8 --warmup 3 --backends ours-compiled --out $OUT/generate > $OUT/generate.log 2>&1
echo "bench_generate rc $? at ${SECONDS}s"; tail -20 $OUT/generate.log
