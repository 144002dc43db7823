#!/bin/bash
# Stop 52's second device call: the other compute-sanitizer tools over scripts/sanitize_ops.py (initcheck: reads of
# memory no one wrote, e.g. a combine reading a split slot no CTA stored; synccheck; racecheck on a few cases of each
# kernel, it is slow), and the Triton kernels under memcheck.
# `run` with command `bash docs/bench/stop52_device_call2.sh`.
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16 TORCH_EXTENSIONS_DIR=$PWD/bench/ext PYTORCH_NO_CUDA_MEMORY_CACHING=1
SECONDS=0
python -m flashmla_ops.build > $OUT/build.log 2>&1; echo "build rc $?"; tail -2 $OUT/build.log
echo "=== built at ${SECONDS}s"
sanitize() {  # tool, backend, log name, timeout, more arguments of sanitize_ops.py
  timeout $4 compute-sanitizer --tool $1 --error-exitcode 9 --print-limit 20 \
    python scripts/sanitize_ops.py --backend $2 "${@:5}" > $OUT/$3.log 2>&1
  echo "$3 rc $?"; grep -vE "^(dense|sparse|quantize|write|indexer|get_mla)" $OUT/$3.log | tail -25
  echo "$(grep -cE ' ok$' $OUT/$3.log) cases ok; === $3 at ${SECONDS}s"
}
sanitize initcheck cuda initcheck_cuda 170
sanitize synccheck cuda synccheck_cuda 100
sanitize racecheck cuda racecheck_cuda 120 --only "[700, 3]"
sanitize racecheck cuda racecheck_sparse 100 --only "b3 s_q1 h100"
sanitize memcheck triton memcheck_triton $((590 - SECONDS))
echo "=== done at ${SECONDS}s"
