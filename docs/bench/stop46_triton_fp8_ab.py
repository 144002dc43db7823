"""Stop 46: the Triton FP8 dense decode with f16 products (up to 16 query rows) against a base revision of
flashmla_ops/triton/decode.py, both timed in one process, alternating rounds (settled CUDA-graph medians,
bench_decode.time_ms). The base module is loaded from a file beside the tree's package, e.g.

    git show 09f64fc:flashmla_ops/triton/decode.py > bench/decode_base.py
    PYTHONPATH=$PWD:$PWD/scripts python docs/bench/stop46_triton_fp8_ab.py bench/decode_base.py [rounds]
"""
import importlib.util
import sys

import torch

import bench_decode
from bench_decode import L2_BYTES, decode_bytes, make_inputs, time_ms
from flashmla_ops.kv_cache import D_QK, KV_LORA_RANK
from flashmla_ops.triton import decode as tree

SPEC = importlib.util.spec_from_file_location("flashmla_ops.triton.decode_base", sys.argv[1])
base = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(base)
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 2
SHAPES = [(128, 1, 16, 16384), (8, 1, 16, 32768), (1, 1, 16, 32768), (128, 2, 8, 4096)]  # batch, s_q, h_q, seqlen
device = bench_decode.bench_device("triton", "stop46_triton_fp8_ab.py")
for batch, s_q, h_q, seqlen in SHAPES:
    copies = max(1, min(8, -(-2 * L2_BYTES // decode_bytes(batch, s_q, h_q, seqlen, True))))
    sets, cache_seqlens = make_inputs(batch, s_q, h_q, [seqlen] * batch, True, device, copies)
    times = {"tree": [], "base": []}
    for round_index in range(ROUNDS):
        order = ("tree", "base") if round_index % 2 == 0 else ("base", "tree")
        for side in order:
            module = tree if side == "tree" else base

            def op(q, cache, block_table, module=module):
                return module.dense_decode(q, cache, block_table, cache_seqlens, KV_LORA_RANK, D_QK ** -0.5, s_q > 1,
                                           True)

            times[side].append(time_ms(op, sets) * 1e3)
    q, cache, block_table = sets[0]
    same = all(torch.equal(a, b) for a, b in zip(
        tree.dense_decode(q, cache, block_table, cache_seqlens, KV_LORA_RANK, D_QK ** -0.5, s_q > 1, True),
        base.dense_decode(q, cache, block_table, cache_seqlens, KV_LORA_RANK, D_QK ** -0.5, s_q > 1, True)))
    print(f"fp8 b{batch} s_q{s_q} h{h_q} {seqlen // 1024}k: tree " + ", ".join(f"{t:.1f}" for t in times["tree"])
          + " / base " + ", ".join(f"{t:.1f}" for t in times["base"]) + f" us; outputs bit-identical: {same}",
          flush=True)
    del sets
    torch.cuda.empty_cache()
