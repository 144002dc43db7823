"""Stop 67: the dense decode over the FP8 cache at 64 and 128 query rows (DeepSeek V3 with data-parallel attention:
every GPU runs all 128 heads of its own batch), next to the BF16 cache on the same shapes, on the CUDA path. Not SPEC
rows (SPEC.md §5's FP8 row has 16 heads); the FP8 cache at 64+ rows runs the wide kernel's `attend_piece`.

    PYTHONPATH=$PWD:$PWD/scripts python docs/bench/stop67_fp8_many_heads.py
"""
import torch

import bench_decode
from flashmla_ops.kv_cache import FP8_BYTES

SHAPES = [(128, 1, 128, 4096), (32, 1, 128, 4096), (1, 1, 128, 32768), (64, 1, 64, 4096), (128, 2, 64, 4096)]


def main():
    bench_decode.apply_timing_arguments(bench_decode.argparse.Namespace(settle=5, timer="graph"))
    device = bench_decode.bench_device("cuda", "stop67_fp8_many_heads.py", ("dense_decode",))
    print(f"{torch.cuda.get_device_name()}; FP8 row bytes {FP8_BYTES}")
    print(f"{'shape':24} {'bf16 us':>8} {'fp8 us':>8} {'fp8/bf16':>8} {'bf16 TFLOP/s':>12} {'fp8 GB/s':>9}")
    for batch, s_q, h_q, seqlen in SHAPES:
        times = {}
        for is_fp8 in (False, True):
            row = bench_decode.bench_config(batch, s_q, h_q, [seqlen] * batch, is_fp8, device, False)
            times[is_fp8] = row
        bf16, fp8 = times[False], times[True]
        name = f"b{batch} s_q{s_q} h{h_q} {seqlen // 1024}k"
        print(f"{name:24} {bf16['time_us']:8.1f} {fp8['time_us']:8.1f} {fp8['time_us'] / bf16['time_us']:8.2f} "
              f"{bf16['tflop_s']:12.1f} {fp8['gb_s']:9.0f}  {fp8['path']}{bench_decode.clock_note(fp8)}")


if __name__ == "__main__":
    main()
