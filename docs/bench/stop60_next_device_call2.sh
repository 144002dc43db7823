#!/bin/bash
# For the next device session, on the H100 (`run` with kind nvidia-h100-x1, timeout_s 600): where the Triton kernels'
# time goes, which no device run has shown (stop 56 profiled the CUDA ones). By the SASS (Triton 3.6, sm_90), the
# sparse FP8 decode's step loop is 1337 instructions a thread, 8 warps: about 2.7k issue cycles a step on four
# schedulers, where b64 h64 takes about 12k cycles a step (106.9 us for 16 steps at 1980 MHz): neither its issue
# nor its DRAM bytes (86 MB gathered: 0.8 TB/s) bound it, so cutting the FP8 conversion's 384 instructions a step
# would not pay until the stalls are known. Nsight Compute on the Triton sparse decode rows b64 h64 and b128 h128,
# the dense h128 4k and b1 h128 32k rows and the sparse prefill h128 (docs/bench/stop56_device_call2.sh with
# BACKEND=triton), then the table (docs/bench/stop56_ncu_table.py).
# `run` with command `bash docs/bench/stop60_next_device_call2.sh`.
BACKEND=triton ROW_LIST="9 7 2 4 10" bash docs/bench/stop56_device_call2.sh
mkdir -p /tmp/ncu && tar -xzf $OUT/ncu.tgz -C /tmp/ncu
python docs/bench/stop56_ncu_table.py /tmp/ncu | tee $OUT/table.md
