#!/bin/bash
# Stop 56, call 2 (an H100): every CUDA SPEC row under Nsight Compute, one row a process
# (docs/bench/stop56_ncu_rows.py), its kernels replayed with the caches flushed between passes (ncu's default), the
# clocks left alone. Raw metrics of the SpeedOfLight, ComputeWorkloadAnalysis, MemoryWorkloadAnalysis and
# WarpStateStats sections plus the DRAM / L2 bytes and, where this ncu has them, the tensor pipes' (wgmma) activity;
# docs/bench/stop56_ncu_table.py reads the CSVs. `run` with command `bash docs/bench/stop56_device_call2.sh`
# (`BACKEND=triton bash ...` profiles the Triton kernels instead, without building the CUDA ones; stop 56 ran the CUDA
# ones; `ROW_LIST="9 7"` profiles those rows of `python docs/bench/stop56_ncu_rows.py --list` alone).
export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16 TORCH_EXTENSIONS_DIR=$PWD/bench/ext
SECONDS=0
if [ "${BACKEND:-cuda}" = cuda ]; then python -m flashmla_ops.build > $OUT/build.log 2>&1; echo "build rc $?"; fi
ncu --version | tail -1
ncu --query-metrics --chip gh100 > $OUT/ncu_metrics.txt 2>&1
grep -iE "gmma|tensor_op|pipe_tensor" $OUT/ncu_metrics.txt | head -30
METRICS=dram__bytes_read.sum,dram__bytes_write.sum,lts__t_bytes.sum,gpu__time_duration.sum,sm__cycles_active.avg
for m in sm__pipe_tensor_op_gmma_cycles_active sm__inst_executed_pipe_tensor_op_gmma \
         sm__pipe_shared_cycles_active l1tex__data_pipe_lsu_wavefronts_mem_shared; do
  grep -qE "^$m " $OUT/ncu_metrics.txt && METRICS=$METRICS,$m.sum,$m.avg.pct_of_peak_sustained_active
done
echo "metrics: $METRICS"
for row in ${ROW_LIST:-$(python docs/bench/stop56_ncu_rows.py --list | cut -d' ' -f1)}; do
  timeout $((${NCU_END:-560} - SECONDS)) ncu --clock-control none --profile-from-start off --csv --page raw \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
    --section WarpStateStats --metrics $METRICS \
    python docs/bench/stop56_ncu_rows.py --row $row --backend ${BACKEND:-cuda} \
    > $OUT/ncu_row$row.csv 2> $OUT/ncu_row$row.err
  echo "row $row rc $? at ${SECONDS}s: $(grep -h '^row' $OUT/ncu_row$row.csv $OUT/ncu_row$row.err | head -1)"
done
tar -czf $OUT/ncu.tgz -C $OUT $(cd $OUT && ls ncu_row*) && rm $OUT/ncu_row*  # one file back
