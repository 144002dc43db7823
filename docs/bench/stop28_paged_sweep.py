"""Paged indexer logits (the op, bf16 q, FP8 index cache, h_i 64) over batch sizes, contexts and s_q; CUDA-graph medians.

    PYTHONPATH=$PWD:$PWD/scripts python docs/bench/stop28_paged_sweep.py      # from the repository root, on a GPU
"""
import torch
from bench_decode import time_ms

from flashmla_ops.kv_cache import quantize_index_fp8_reference

torch.manual_seed(0)
for batch, keys, s_q in [(1, 32768, 1), (8, 32768, 1), (32, 32768, 1), (64, 32768, 1), (100, 32768, 1),
                         (128, 32768, 1), (128, 4096, 1), (64, 32768, 2), (128, 8192, 2),
                         (200, 8192, 1), (256, 8192, 1), (256, 8192, 2)]:
    print(f"paged-start b{batch} ctx{keys} s_q{s_q}", flush=True)
    blocks = keys // 64
    sets = []
    for _ in range(-(-(256 << 20) // (batch * keys * 132))):  # input sets beyond the 50 MB L2, rotated
        cache = quantize_index_fp8_reference(torch.randn(batch * blocks, 64, 128, device="cuda"))
        q = torch.randn(batch, s_q, 64, 128, device="cuda").bfloat16()
        sets.append((q, cache, torch.randn(batch, s_q, 64, device="cuda"),
                     torch.randperm(batch * blocks, device="cuda", dtype=torch.int32).view(batch, -1),
                     torch.full((batch,), keys, dtype=torch.int32, device="cuda"), None))
    ms = time_ms(torch.ops.flashmla.indexer_logits_paged, sets)
    gbs = batch * keys * 132 / ms / 1e6
    print(f"paged b{batch} ctx{keys} s_q{s_q}: {ms * 1e3:8.1f} us {gbs:6.0f} GB/s", flush=True)
