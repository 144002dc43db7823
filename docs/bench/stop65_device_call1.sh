#!/bin/bash
# Stop 65 call 1 (ran on an H200: no H100 came): where the split rows' time goes. The extension's build, then
# per-kernel durations and gaps inside CUDA-graph replays (docs/bench/stop65_split_costs.py), then a -DFLASHMLA_PHASES
# build recording every CTA's milestones (docs/bench/marks_b1.py) at b8 h16 32k and b128 h16 4k (the narrow kernel)
# and b1 h128 32k (the wide kernel). The split-costs script has since printed the paths the ops take as well.
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16 TORCH_EXTENSIONS_DIR=$PWD/bench/ext
SECONDS=0
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
python -m flashmla_ops.build > $OUT/build.log 2>&1; echo "build rc $? at ${SECONDS}s"
timeout 150 python docs/bench/stop65_split_costs.py > $OUT/split_costs.log 2>&1
echo "split costs rc $? at ${SECONDS}s"; cat $OUT/split_costs.log
export FLASHMLA_EXTRA_CUDA_FLAGS="-DFLASHMLA_PHASES -DFLASHMLA_CTA_RECORD_STRIDE=1"
python -m flashmla_ops.build > $OUT/build_phases.log 2>&1; echo "phases build rc $? at ${SECONDS}s"
MARKS_SHAPES="8:32768:16,128:4096:16,1:32768:128" timeout 120 python docs/bench/marks_b1.py > $OUT/marks.log 2>&1
echo "marks rc $? at ${SECONDS}s"; grep -v "^      " $OUT/marks.log | head -80
