#!/bin/bash
# Prepared in stop 48 for the next session's third device call: the models' decode step with and without `balanced`
# (one get_mla_metadata split a step shared by the dense layers), compiled, the V3 2-layer slice at full width with
# uniform contexts: the overhead that decides whether `decode_step` balances by default (stop48_device_call1.sh's
# --scheduled rows give the op's side and the skewed row).
# `run` with command `bash docs/bench/stop48_device_call3.sh`.
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16
SECONDS=0
python -m flashmla_ops.build > $OUT/build.log 2>&1; echo "build rc $?"
for flag in "" "--balanced"; do
  name=gen${flag:+_balanced}
  timeout 200 python scripts/bench_generate.py --model-preset v3-layers --batch 1,16,64 --context 4096 --steps 8 \
    --warmup 3 --backends ours-compiled $flag --out $OUT/$name > $OUT/$name.log 2>&1
  # the table's rows (stop 49: "ours|rror" | tail -4 kept only the speed-up lines, all "-" with one backend)
  grep -E "^ours-compiled +[0-9]|rror|failed|skipped" $OUT/$name.log | sed "s/^/${flag:-shape} /"
  echo "=== $name at ${SECONDS}s"
done
