"""Stop 46: the three attention ops with an attention sink, on the CUDA kernels with the sink applied after them (the
new default on Hopper) against the Triton kernels' in-kernel sink (the path before stop 46), and the CUDA kernels
without a sink: what the sink's elementwise launches cost; and sparse decode with an extra cache (two CUDA
launches merged by their LSEs against Triton's one pass). From stop 50 the CUDA kernels take the sink themselves
(their rows' softmax denominators), so "cuda + sink" against "cuda, no sink" is what that costs. Settled CUDA-graph medians (bench_decode.time_ms),
each path forced with FLASHMLA_BACKEND, alternating rounds. From the repository root:

    PYTHONPATH=$PWD:$PWD/scripts python docs/bench/stop46_sink_paths.py [rounds [name substring]]
"""
import sys

import torch

import bench_decode
from bench_decode import forced_backend, make_inputs, time_ms
from bench_sparse import decode_inputs, prefill_inputs
from flashmla_ops.kv_cache import D_QK, KV_LORA_RANK

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 2
ONLY = sys.argv[2] if len(sys.argv) > 2 else ""  # only the rows whose name has it (stop 51: "extra")
SCALE = D_QK ** -0.5
device = bench_decode.bench_device("auto", "stop46_sink_paths.py")


def dense(batch, s_q, h_q, seqlen, is_fp8):
    sets, cache_seqlens = make_inputs(batch, s_q, h_q, [seqlen] * batch, is_fp8, device, 2)

    def run(q, cache, block_table, sink):
        return torch.ops.flashmla.dense_decode(q, cache, block_table, cache_seqlens, None, None, KV_LORA_RANK, SCALE,
                                               s_q > 1, is_fp8, sink)
    return run, sets


def sparse(batch, s_q, h_q, topk, is_fp8, extra_topk=0):
    """With `extra_topk`: that many indices into a second cache as well (the first `extra_topk` of another set's)."""
    sets = [decode_inputs(batch, s_q, h_q, topk, is_fp8, device) for _ in range(2)]
    if extra_topk:
        extras = [decode_inputs(batch, s_q, h_q, topk, is_fp8, device)[1:] for _ in range(2)]
        sets = [(q, cache, indices, extra_cache, extra_indices[..., :extra_topk].contiguous())
                for (q, cache, indices), (extra_cache, extra_indices) in zip(sets, extras)]

    def run(q, cache, indices, *extra_and_sink):
        *extra, sink = extra_and_sink
        extra_cache, extra_indices = extra or (None, None)
        return torch.ops.flashmla.sparse_decode(q, cache, indices, None, extra_cache, extra_indices, None, None, None,
                                                KV_LORA_RANK, SCALE, is_fp8, sink)
    return run, sets


def prefill(s_q, s_kv, h_q, topk):
    def run(q, kv, indices, sink):
        return torch.ops.flashmla.sparse_prefill(q, kv, indices, SCALE, KV_LORA_RANK, sink, None, 0)
    return run, [prefill_inputs(s_q, s_kv, h_q, topk, device)]


ROWS = [("dense bf16 b128 h16 4k", lambda: dense(128, 1, 16, 4096, False), 16),
        ("dense bf16 b128 h128 4k", lambda: dense(128, 1, 128, 4096, False), 128),
        ("dense bf16 b1 h128 32k", lambda: dense(1, 1, 128, 32768, False), 128),
        ("dense fp8 b128 h16 16k", lambda: dense(128, 1, 16, 16384, True), 16),
        ("sparse decode fp8 b128 h128", lambda: sparse(128, 1, 128, 2048, True), 128),
        ("sparse decode fp8 b64 h64", lambda: sparse(64, 1, 64, 2048, True), 64),
        ("sparse fp8 b128 h128 + extra 128", lambda: sparse(128, 1, 128, 2048, True, 128), 128),
        ("sparse fp8 b64 h64 + extra 512", lambda: sparse(64, 1, 64, 2048, True, 512), 64),
        ("sparse prefill h128", lambda: prefill(4096, 32768, 128, 2048), 128)]
for name, make, h_q in ROWS:
    if ONLY not in name:
        continue
    run, sets = make()
    sink = torch.randn(h_q, device=device)
    sides = {"cuda + sink": ("cuda", sink), "triton + sink": ("triton", sink), "cuda, no sink": ("cuda", None)}
    times = {side: [] for side in sides}
    for round_index in range(ROUNDS):
        order = list(sides) if round_index % 2 == 0 else list(sides)[::-1]
        for side in order:
            backend, side_sink = sides[side]
            with forced_backend(backend):
                times[side].append(time_ms(lambda *args: run(*args, side_sink), sets) * 1e3)
    print(f"{name:34}" + "; ".join(f"{side} " + ", ".join(f"{t:.1f}" for t in times[side]) for side in sides) + " us",
          flush=True)
    del sets
    torch.cuda.empty_cache()
