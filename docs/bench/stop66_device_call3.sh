#!/bin/bash
# Stop 66 call 3 (what was left of the device budget): the CUDA SPEC rows on main as it lands, each bench in a fresh
# process (call 2's script without its tests).
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16 TORCH_EXTENSIONS_DIR=$PWD/bench/ext
SECONDS=0
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
python -m flashmla_ops.build > $OUT/build.log 2>&1; echo "build rc $? at ${SECONDS}s"
timeout 60 python scripts/bench_decode.py --backend cuda --no-baselines --settle 10 \
  --out $OUT/decode_cuda > $OUT/decode_cuda.log 2>&1
echo "dense cuda rc $? at ${SECONDS}s"; grep -E "^bf16|^fp8|rror" $OUT/decode_cuda.log | grep -v Warning
timeout 60 python scripts/bench_sparse.py --backend cuda --no-reference --settle 10 \
  --out $OUT/sparse_cuda > $OUT/sparse_cuda.log 2>&1
echo "sparse cuda rc $? at ${SECONDS}s"; grep -E "^(decode|prefill)|rror" $OUT/sparse_cuda.log | grep -v Warning
