"""Sparse decode with an extra cache on the CUDA kernel: one launch over the main cache, one over the extra cache,
merged by their LSEs (`_attention.merge_attention`; stop 46). The op takes it with FLASHMLA_BACKEND=cuda, and by
default the Triton kernel's one pass over both caches, which the H100 ran 1.2x faster (stop 49). CPU: the merge of
the reference's two halves against the reference over both, queries that see only one cache or neither included.
GPU (Hopper): forced to CUDA the op calls the kernel twice and matches the reference, with topk lengths, a sink and
FP8; by default it calls no CUDA kernel and matches too."""
import pytest
import torch
from decode_inputs import DEVICE, HOPPER, SCALE, assert_decode_close, paged_cache, random_indices, sinks

from flashmla_ops import reference
from flashmla_ops._attention import merge_attention
from flashmla_ops.kv_cache import D_QK, KV_LORA_RANK, PAGE_BLOCK_SIZE


def inputs(h_q, is_fp8, seed):
    """Three sequences of two queries: 600 main and 90 extra indices; sequence 1 sees no main token, sequence 2 no
    extra token, query (0, 0) neither (random_indices makes the first list all -1 in both)."""
    generator = torch.Generator(DEVICE).manual_seed(seed)
    batch, s_q, main_blocks, extra_blocks = 3, 2, 16, 3
    cache = paged_cache(main_blocks, is_fp8, generator, pad=0)
    extra_cache = paged_cache(extra_blocks, is_fp8, generator, pad=64)
    q = torch.randn(batch, s_q, h_q, D_QK, generator=generator, device=DEVICE).to(torch.bfloat16)
    indices = random_indices((batch, s_q, 600), main_blocks * PAGE_BLOCK_SIZE, generator)
    extra_indices = random_indices((batch, s_q, 90), extra_blocks * PAGE_BLOCK_SIZE, generator)
    topk_length = torch.tensor([600, 0, 300], dtype=torch.int32, device=DEVICE)
    extra_topk_length = torch.tensor([90, 50, 0], dtype=torch.int32, device=DEVICE)
    return q, cache, indices, topk_length, extra_cache, extra_indices, extra_topk_length


@pytest.mark.parametrize("with_sink", [False, True])
def test_merged_halves_match_one_attention_over_both(with_sink):
    """With a sink (-inf, +inf and finite heads) merge_attention applies its factor with the weights."""
    q, cache, indices, topk_length, extra_cache, extra_indices, extra_topk_length = inputs(16, True, 1)
    sink = sinks(16, torch.Generator(DEVICE).manual_seed(2)) if with_sink else None
    main = reference.sparse_decode(q, cache, indices, topk_length, None, None, None, KV_LORA_RANK, SCALE, True)
    extra = reference.sparse_decode(q, extra_cache, extra_indices, extra_topk_length, None, None, None, KV_LORA_RANK,
                                    SCALE, True)
    out, lse = merge_attention(*main, *extra, sink)
    want_out, want_lse = reference.sparse_decode(q, cache, indices, topk_length, extra_cache, extra_indices,
                                                 extra_topk_length, KV_LORA_RANK, SCALE, True, sink)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert_decode_close(out, lse, want_out, want_lse)
    assert torch.isposinf(lse[0, :, 0]).all() and torch.all(out[0, 0] == 0)  # neither cache
    assert torch.isfinite(lse[1]).all() and torch.isfinite(lse[2]).all()  # one cache each
    assert torch.equal(lse[1], extra[1][1])
    if with_sink:
        assert torch.all(out[:, :, 1] == 0)  # the +inf sink's head
    else:
        assert torch.equal(out[1], extra[0][1])  # weight 1 on the only half seen


@pytest.mark.gpu
@HOPPER
@pytest.mark.parametrize("h_q,is_fp8,with_sink", [(64, True, False), (128, True, True), (64, False, True)])
@pytest.mark.parametrize("backend,calls", [("cuda", ["sparse_decode", "sparse_decode"]), ("auto", [])])
def test_sparse_decode_with_an_extra_cache(monkeypatch, cuda_calls, h_q, is_fp8, with_sink, backend, calls):
    monkeypatch.setenv("FLASHMLA_BACKEND", backend)
    q, cache, indices, topk_length, extra_cache, extra_indices, extra_topk_length = inputs(h_q, is_fp8, h_q + is_fp8)
    sink = sinks(h_q, torch.Generator(DEVICE).manual_seed(9)) if with_sink else None
    out, lse = torch.ops.flashmla.sparse_decode(q, cache, indices, topk_length, extra_cache, extra_indices,
                                                extra_topk_length, None, None, KV_LORA_RANK, SCALE, is_fp8, sink)
    assert cuda_calls == calls
    want_out, want_lse = reference.sparse_decode(q, cache, indices, topk_length, extra_cache, extra_indices,
                                                 extra_topk_length, KV_LORA_RANK, SCALE, is_fp8, sink)
    assert_decode_close(out, lse, want_out, want_lse)
