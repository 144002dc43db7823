#!/bin/bash
# For the next device session, call 1 (prepared in stops 68-69): stop 69's script in its long form. Stop 69 ran it
# short once (59 s of device time left after it): its first test hit an illegal address, the -1 of a direct write made
# unsigned in that stop's metadata guards (for_each_piece), fixed after the call and checked on the CPU by
# tests/ops/test_schedule_host.py; no GPU test of stops 68-69 has passed on a GPU yet. In order: this stop's new GPU
# tests, the CUDA decode, reference and API tests, the FLASHMLA_DENSE_FP8_PAIRS experiment against the tree
# (scripts/ab_kernels.py: the CUDA decode tests on its kernels, then docs/bench/stop67_fp8_many_heads.py, ABBA), and
# the dense CUDA SPEC rows. `run` with command `bash docs/bench/next_device_call1.sh`.
bash docs/bench/stop69_device_call1.sh 590
