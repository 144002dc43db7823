"""Sparse decode with an extra cache on the CUDA kernel: one call of the extension, which launches the kernel over
each cache, the second launch's split partials after the first's, and merges both in one combine with the sink
(stop 50; stops 46-49 merged two calls' outputs by their LSEs in PyTorch). GPU (Hopper), against the reference with
topk lengths, a sink, BF16 and FP8 caches, queries that see only one cache or neither: forced to CUDA, and by
default (the path `decode.sparse_decode_path` picks). The CPU side (what the op hands the extension):
test_attn_sink.py."""
import pytest
import torch
from decode_inputs import DEVICE, HOPPER, SCALE, assert_decode_close, paged_cache, random_indices, sinks

from flashmla_ops import decode, reference
from flashmla_ops.kv_cache import D_QK, KV_LORA_RANK, PAGE_BLOCK_SIZE


def inputs(h_q, is_fp8, seed, batch=3, s_q=2, topk=600, extra_topk=90):
    """`batch` sequences of `s_q` queries over a main and an extra cache (`topk` and `extra_topk` indices): lengths in
    threes, (topk, 0, topk / 2) main and (extra_topk, 5 extra_topk / 9, 0) extra, so that sequence 1 sees no main
    token and sequence 2 no extra one; query (0, 0) sees neither (random_indices makes the first list all -1)."""
    generator = torch.Generator(DEVICE).manual_seed(seed)
    main_blocks, extra_blocks = 16, 3
    cache = paged_cache(main_blocks, is_fp8, generator, pad=0)
    extra_cache = paged_cache(extra_blocks, is_fp8, generator, pad=64)
    q = torch.randn(batch, s_q, h_q, D_QK, generator=generator, device=DEVICE).to(torch.bfloat16)
    indices = random_indices((batch, s_q, topk), main_blocks * PAGE_BLOCK_SIZE, generator)
    extra_indices = random_indices((batch, s_q, extra_topk), extra_blocks * PAGE_BLOCK_SIZE, generator)
    topk_length = torch.tensor([topk, 0, topk // 2] * batch, dtype=torch.int32, device=DEVICE)[:batch]
    extra_topk_length = torch.tensor([extra_topk, extra_topk * 5 // 9, 0] * batch, dtype=torch.int32,
                                     device=DEVICE)[:batch]
    return q, cache, indices, topk_length, extra_cache, extra_indices, extra_topk_length


@pytest.mark.gpu
@HOPPER
@pytest.mark.parametrize("h_q,is_fp8,with_sink", [(64, True, False), (128, True, True), (64, False, True)])
@pytest.mark.parametrize("batch,s_q,topk,extra_topk", [
    (3, 2, 600, 90),  # 5 + 1 splits: the few-splits combine
    (70, 1, 600, 90),  # 1 + 1 (70 or 140 CTAs a launch)
    (2, 2, 2048, 512),  # 16 + 4: the many-splits combine
])
@pytest.mark.parametrize("backend", ["cuda", "auto"])  # auto: CUDA comes first on Hopper (stop 51)
def test_sparse_decode_with_an_extra_cache(monkeypatch, cuda_calls, h_q, is_fp8, with_sink, batch, s_q, topk,
                                           extra_topk, backend):
    monkeypatch.setenv("FLASHMLA_BACKEND", backend)
    q, cache, indices, topk_length, extra_cache, extra_indices, extra_topk_length = inputs(
        h_q, is_fp8, h_q + is_fp8 + batch, batch, s_q, topk, extra_topk)
    sink = sinks(h_q, torch.Generator(DEVICE).manual_seed(9)) if with_sink else None
    out, lse = torch.ops.flashmla.sparse_decode(q, cache, indices, topk_length, extra_cache, extra_indices,
                                                extra_topk_length, None, None, KV_LORA_RANK, SCALE, is_fp8, sink)
    assert decode.sparse_decode_path(q, cache, extra_cache, KV_LORA_RANK, is_fp8) == "cuda"
    assert cuda_calls == ["sparse_decode"]  # one extension call over both caches
    want_out, want_lse = reference.sparse_decode(q, cache, indices, topk_length, extra_cache, extra_indices,
                                                 extra_topk_length, KV_LORA_RANK, SCALE, is_fp8, sink)
    assert_decode_close(out, lse, want_out, want_lse)
    assert torch.all(out[0, 0] == 0) and torch.all(torch.isposinf(lse[0, :, 0]))  # query (0, 0) sees nothing
    both = out[0, 1] if s_q > 1 else out[3, 0]  # a query that sees both caches
    assert torch.all(both[2:].abs().amax(-1) > 0)  # (head 1's sink, if any, is +inf: its rows 0)
