"""Where a split row's time goes inside a CUDA-graph replay (the way bench_decode.py and bench_sparse.py time the
SPEC rows): torch.profiler (CUPTI) over 20 replays of one op call, each kernel's duration and the gap between the
decode kernel's end and the combine's start, against the replay's span (the first kernel's start to the last one's
end) and bench's graph median. Rows: the split SPEC rows of the CUDA path (dense b8 h16 32k and b1 h128 32k, sparse
FP8 decode b64 h64), and b128 h16 4k (no split) beside them. From the repository root on a Hopper GPU (stop 65):

    PYTHONPATH=$PWD:$PWD/scripts python docs/bench/stop65_split_costs.py
"""
import statistics
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import flashmla_ops
from bench_decode import make_inputs, time_ms
from bench_sparse import row_op
from flashmla_ops.kv_cache import D_QK, KV_LORA_RANK

DEVICE = torch.device("cuda")


def dense_row(batch, h_q, seqlen):
    sets, seqlens = make_inputs(batch, 1, h_q, [seqlen] * batch, False, DEVICE, 2)

    def run(q, cache, table):
        return torch.ops.flashmla.dense_decode(q, cache, table, seqlens, None, None, KV_LORA_RANK, D_QK ** -0.5,
                                               False, False, None)
    return run, sets


def sparse_row(batch, h_q):
    make, run, _, _ = row_op("decode", batch, 1, h_q, 2048, True, DEVICE)
    return run, [make(), make()]


def replay_kernels(run, sets, replays=20):
    """Per replay: [(kernel name, start us, end us)] in order, from CUPTI (the profiler's microseconds)."""
    run(*sets[0])
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(*sets[0])
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    kernels = sorted((event.time_range.start, event.time_range.end, event.name) for event in prof.events()
                     if event.device_type == torch.autograd.DeviceType.CUDA and "Memcpy" not in event.name)
    per_replay = len(kernels) // replays
    return [[(name, start, end) for start, end, name in kernels[i * per_replay:(i + 1) * per_replay]]
            for i in range(replays)]


def main():
    rows = [("dense b8 h16 32k", *dense_row(8, 16, 32768)), ("dense b1 h128 32k", *dense_row(1, 128, 32768)),
            ("sparse fp8 b64 h64", *sparse_row(64, 64)), ("dense b128 h16 4k", *dense_row(128, 16, 4096))]
    print(torch.cuda.get_device_name(), torch.__version__, "paths:", flashmla_ops.backend("dense_decode", DEVICE),
          flashmla_ops.backend("sparse_decode", DEVICE))
    for name, run, sets in rows:
        median_us = time_ms(run, sets) * 1e3
        replays = replay_kernels(run, sets)
        names = [kernel[0][:60] for kernel in replays[0]]
        print(f"== {name}: graph median {median_us:.1f} us (bench's timing); {len(names)} kernels a replay")
        for k, kernel_name in enumerate(names):
            durations = [replay[k][2] - replay[k][1] for replay in replays]
            print(f"   kernel {k} {kernel_name}: median {statistics.median(durations):.2f} us, "
                  f"min {min(durations):.2f}, max {max(durations):.2f}")
            if k > 0:
                gaps = [replay[k][1] - replay[k - 1][2] for replay in replays]
                print(f"   gap before kernel {k}: median {statistics.median(gaps):.2f} us")
        spans = [replay[-1][2] - replay[0][1] for replay in replays]
        print(f"   span first start .. last end: median {statistics.median(spans):.2f} us")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
