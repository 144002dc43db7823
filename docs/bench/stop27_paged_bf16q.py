"""The model's decode path: bf16 index q against the FP8 index cache, b128 h64 ctx32k, s_q 1, the op on each backend.

    PYTHONPATH=$PWD:$PWD/scripts python docs/bench/stop27_paged_bf16q.py      # from the repository root, on a GPU
"""
import os

import torch
from bench_decode import time_ms

from flashmla_ops.indexer import indexer_logits_paged_path
from flashmla_ops.kv_cache import quantize_index_fp8_reference

rows, keys, h_i = 128, 32768, 64
blocks = keys // 64
cache = quantize_index_fp8_reference(torch.randn(rows * blocks, 64, 128, device="cuda"))
q = torch.randn(rows, 1, h_i, 128, device="cuda").bfloat16()
args = (q, cache, torch.randn(rows, 1, h_i, device="cuda"),
        torch.randperm(rows * blocks, device="cuda", dtype=torch.int32).view(rows, -1),
        torch.full((rows,), keys, dtype=torch.int32, device="cuda"), None)
for backend in ("cuda", "triton"):
    os.environ["FLASHMLA_BACKEND"] = backend
    ms = time_ms(torch.ops.flashmla.indexer_logits_paged, [args])
    print(f"bf16 q, fp8 cache b128 h64 ctx32k: {indexer_logits_paged_path(q, cache)} {ms * 1e3:.1f} us")
