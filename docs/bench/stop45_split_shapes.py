"""Stop 45: dense BF16 decode shapes whose CUDA kernel writes split partials (attend_pairs' kEarly path), and the
skewed batch through get_mla_metadata's balanced schedule; settled CUDA-graph medians (bench_decode.bench_config)."""
from bench_decode import bench_config, bench_device

device = bench_device("cuda", "q45b.py")
shapes = [(1, 1, 128, [32768], False), (1, 2, 128, [32768], False), (1, 1, 64, [32768], False),
          (4, 1, 128, [8192] * 4, False), (16, 1, 128, [8192] * 16, False), (8, 1, 64, [8192] * 8, False),
          (32, 1, 64, [16384] * 32, False), (32, 1, 128, [32768] + [512] * 31, True)]
for batch, s_q, h_q, seqlens, scheduled in shapes:
    row = bench_config(batch, s_q, h_q, seqlens, False, device, False, scheduled)
    name = f"b{batch} s_q{s_q} h{h_q} {seqlens[0] // 1024}k" + (" skewed scheduled" if scheduled else "")
    print(f"dense {name:32} {row['time_us']:8.1f} us {row['tflop_s']:7.1f} TFLOP/s  {row.get('sm_clock_mhz', '-')} MHz",
          flush=True)
