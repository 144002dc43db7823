#!/bin/bash
# Stop 61, call 2 (the H100): the Triton kernels of six SPEC rows under Nsight Compute (stop 60's
# docs/bench/stop60_next_device_call2.sh with the FP8 dense h16 row added: sparse decode b64 h64 and b128 h128, dense
# h128 4k, b1 h128 32k and fp8 h16 16k, sparse prefill h128), while the CUDA kernels build beside it; then the CUDA
# top-k's GPU test of stop 60 (signed zeros and NaNs ranked as the reference ranks them), never run before.
# `run` with command `bash docs/bench/stop61_device_call2.sh`.
export PYTHONPATH=$PWD:$PWD/scripts TORCH_EXTENSIONS_DIR=$PWD/bench/ext
SECONDS=0
(MAX_JOBS=6 python -m flashmla_ops.build > $OUT/build.log 2>&1; echo "build rc $? at ${SECONDS}s" >> $OUT/build.log) &
NCU_END=430 BACKEND=triton ROW_LIST="9 7 2 4 6 10" bash docs/bench/stop56_device_call2.sh
mkdir -p /tmp/ncu && tar -xzf $OUT/ncu.tgz -C /tmp/ncu
python docs/bench/stop56_ncu_table.py /tmp/ncu > $OUT/table.md 2>&1; cat $OUT/table.md
wait; tail -1 $OUT/build.log
timeout $((590 - SECONDS)) python -m pytest -q -rf tests/ops/test_cuda_indexer_topk.py > $OUT/topk_tests.log 2>&1
echo "top-k tests rc $? at ${SECONDS}s"; tail -3 $OUT/topk_tests.log
