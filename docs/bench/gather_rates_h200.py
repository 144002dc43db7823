"""Stop 44: the per-SM fill rate of gathered 72 KB stages by cp.async, by TMA per (row, tile) and by TMA multicast in
a cluster of two (docs/bench/gather_rates_h200.cu says what each mode does), and of cp.async fills by 2, 4 or 8 warps
with one or two in flight a CTA. Prints, per cache size and mode, the time of a launch (median of 20), the bytes each
SM received per cycle at the clock given, and TB/s received and read from L2. From the repository root on a Hopper
GPU: `python docs/bench/gather_rates_h200.py` (stop 44 ran it as bench/gather_rates.py, calls 2 and 5)."""
import statistics

import torch
from torch.utils.cpp_extension import load

ext = load(name="gather_rates", sources=["docs/bench/gather_rates_h200.cu"],
           extra_cuda_cflags=["-O3", "-gencode=arch=compute_90a,code=sm_90a", "-std=c++17"], verbose=False)
SMS = torch.cuda.get_device_properties(0).multi_processor_count
CLOCK = 1.98e9
STAGE = 9 * 64 * 128
BLOCKS = 64
NAMES = {0: "cp.async 128 threads", 1: "TMA per line, 32 lanes", 2: "TMA per line, 128 threads",
         3: "TMA 64 consecutive rows", 4: "TMA per line multicast x2"}


def timed(fn, reps=20):
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


for rows in (32768, 1 << 20):
    kv = torch.randint(0, 256, (rows, 1152), dtype=torch.uint8, device="cuda")
    # pairs of CTAs gather the same rows (a query's two row tiles); mode 4 takes one index set per pair
    distinct = torch.randint(0, rows, (SMS // 2, BLOCKS, 64), dtype=torch.int32, device="cuda")
    paired = distinct.repeat_interleave(2, dim=0).contiguous()
    dumps = {}
    for mode in range(5):
        indices = distinct if mode == 4 else paired
        dump = torch.zeros(2, STAGE, dtype=torch.uint8, device="cuda")
        ext.gather(mode, kv, indices, dump)
        torch.cuda.synchronize()
        dumps[mode] = dump
        empty = torch.empty(0, dtype=torch.uint8, device="cuda")
        us = timed(lambda: ext.gather(mode, kv, indices, empty))
        received = SMS * BLOCKS * STAGE
        from_l2 = received / 2 if mode == 4 else received
        rate = received / (us * 1e-6)
        print(f"rows {rows:8d} mode {mode} {NAMES[mode]:28s} {us:8.1f} us  received {rate / SMS / CLOCK:5.1f} "
              f"B/cycle/SM  ({rate / 1e12:.2f} TB/s; L2 reads {rate * from_l2 / received / 1e12:.2f} TB/s)", flush=True)
    for mode in (1, 2, 4):
        print(f"rows {rows:8d} mode {mode} layout equals cp.async's: {torch.equal(dumps[mode], dumps[0])}")
    # the layout check means something only if the dump is not trivially zero
    print("dump nonzero:", bool(dumps[0].any()))
    for warps, streams in ((2, 1), (2, 2), (4, 1), (4, 2), (8, 1)):
        us = timed(lambda: ext.cp_async_fills(warps, streams, kv, paired))
        received = SMS * BLOCKS * STAGE
        print(f"rows {rows:8d} cp.async fills of {warps} warps, {streams} in flight: {us:8.1f} us  received "
              f"{received / (us * 1e-6) / SMS / CLOCK:5.1f} B/cycle/SM", flush=True)
