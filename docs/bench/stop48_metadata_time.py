"""Stop 48: what get_mla_metadata costs a decode step, the CUDA kernel (csrc/mla_metadata.cu, one launch) against the
reference's ~95 small kernels, as CUDA-graph replays (bench_decode.time_ms) and as eager calls (host dispatch
included, CUDA events around 200 calls). From the repository root:

    PYTHONPATH=$PWD:$PWD/scripts python docs/bench/stop48_metadata_time.py
"""
import torch

import bench_decode
from bench_decode import time_ms
from flashmla_ops.decode import get_mla_metadata_reference

device = bench_decode.bench_device("auto", "stop48_metadata_time.py")
bench_decode.SETTLE_S = 0  # launch-latency-bound: the clock hardly matters
ROWS = [("b128 uniform 4k, 132 parts", [4096] * 128, 132),
        ("b128 uniform 4k, 66 parts", [4096] * 128, 66),
        ("b32 skewed (32k + 31 x 512), 132 parts", [32768] + [512] * 31, 132),
        ("b1 32k, 66 parts", [32768], 66),
        ("b1024 mixed, 132 parts", [512 + 97 * i % 8000 for i in range(1024)], 132)]


def eager_us(fn, calls=200):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls * 1e3


for name, lengths, parts in ROWS:
    cache_seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    kernel = lambda: torch.ops.flashmla.get_mla_metadata(cache_seqlens, parts)  # noqa: E731
    ref = lambda: get_mla_metadata_reference(cache_seqlens, parts)  # noqa: E731
    same = all(torch.equal(a, b) for a, b in zip(kernel(), ref()))
    graph_us = [time_ms(lambda: f(), [()]) * 1e3 for f in (kernel, ref)]
    eager = [eager_us(f) for f in (kernel, ref)]
    print(f"{name}: graph replay kernel {graph_us[0]:.1f} us, reference {graph_us[1]:.1f} us; eager kernel "
          f"{eager[0]:.1f} us, reference {eager[1]:.1f} us; equal {same}", flush=True)
