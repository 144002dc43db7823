#!/bin/bash
# Stop 50's first device call: the attention sink inside the CUDA kernels (csrc/decode_common.cuh sink_denominator:
# each row's softmax denominator where it is normalised for out, in a piece's store or the combine). Its GPU tests and
# stop 49's never-run extra-cache test, then the sink paths (stop46_sink_paths.py: CUDA + sink, Triton + sink, CUDA
# without; before this stop CUDA + sink cost 13-54 us a decode call, stop 49 call 4), then the CUDA SPEC rows as
# CUDA-graph replays (dense and sparse; the kernels without a sink check a null pointer per row more than before).
# `run` with command `bash docs/bench/stop50_device_call1.sh` (about 9 minutes at most: the timeouts below); then
# stop48_device_call2.sh (every op GPU test).
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16
SECONDS=0
python -m flashmla_ops.build > $OUT/build.log 2>&1; echo "build rc $?"; tail -3 $OUT/build.log
echo "=== built at ${SECONDS}s"
timeout 150 python -m pytest -q -m gpu tests/ops/test_attn_sink.py tests/ops/test_extra_cache.py \
  > $OUT/tests_sink.log 2>&1
echo "sink tests rc $?"; grep -E "passed|failed|FAILED|ERROR|Error" $OUT/tests_sink.log | tail -12
echo "=== sink tests at ${SECONDS}s"
timeout 130 python docs/bench/stop46_sink_paths.py 1 2>&1 | grep -v Warning | tee $OUT/sink_paths.log
echo "=== sink paths at ${SECONDS}s"
timeout 110 python scripts/bench_decode.py --backend cuda --no-baselines --settle 10 --out $OUT/dec_graph \
  > $OUT/dec_graph.log 2>&1
grep -E "^bf16|^fp8|rror" $OUT/dec_graph.log | grep -v Warning
echo "=== dense at ${SECONDS}s"
timeout 100 python scripts/bench_sparse.py --backend cuda --no-reference --settle 10 --out $OUT/sparse_graph \
  > $OUT/sparse_graph.log 2>&1
grep -E "^(decode|prefill)|rror" $OUT/sparse_graph.log | grep -v Warning
echo "=== done at ${SECONDS}s"
