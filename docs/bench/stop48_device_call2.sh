#!/bin/bash
# Prepared in stop 48 for the next session's second device call (after stop48_device_call1.sh, which builds the
# kernels and times get_mla_metadata and the dense rows with and without its split): every GPU test (stop 47's,
# stop 48's metadata kernel, poisoning and the models' balanced decode among them), then the models' decode step with
# and without `balanced` (one get_mla_metadata split a step shared by the layers), compiled, V3 2-layer slice at full
# width: the overhead on uniform batches that decides whether `decode_step` balances by default.
# `run` with command `bash docs/bench/stop48_device_call2.sh`.
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16
SECONDS=0
python -m flashmla_ops.build > $OUT/build.log 2>&1; echo "build rc $?"
timeout 330 python -m pytest -m gpu -q -x tests > $OUT/tests_gpu.log 2>&1; echo "tests rc $?"
tail -4 $OUT/tests_gpu.log
echo "=== tests at ${SECONDS}s"
for flag in "" "--balanced"; do
  timeout 90 python scripts/bench_generate.py --model-preset v3-layers --batch 1,16,64 --context 4096 --steps 8 \
    --warmup 3 --backends ours-compiled $flag --out $OUT/gen${flag:+_balanced} > $OUT/gen${flag:+_balanced}.log 2>&1
  grep -E "ours|rror" $OUT/gen${flag:+_balanced}.log | tail -4 | sed "s/^/${flag:-shape} /"
done
echo "=== done at ${SECONDS}s"
