"""The attention sink on the CUDA paths: dense decode, sparse decode and sparse prefill run their sm_90a kernels
(written without a sink) and scale the output after them (`_attention.apply_attn_sink_`), where they went to Triton
before stop 46. CPU: that composition against the reference's sink, element by element. GPU (Hopper): each op with a
sink takes the CUDA kernel and matches the reference, empty rows and sinks of -inf included, and replays in a CUDA
graph."""
import pytest
import torch
from decode_inputs import (DEVICE, HOPPER, SCALE, assert_close, assert_decode_close, make_inputs,
                           packed_prefill_inputs, paged_cache, random_indices, sinks)

from flashmla_ops import reference
from flashmla_ops._attention import apply_attn_sink_
from flashmla_ops.kv_cache import D_QK, KV_LORA_RANK, PAGE_BLOCK_SIZE

@pytest.mark.parametrize("is_fp8", [False, True])
def test_sink_after_the_kernel_matches_the_sink_inside(is_fp8):
    """The reference's output without a sink (bf16), scaled by apply_attn_sink_, against the reference with it:
    within two bf16 ulps of each element (one rounding more: at most 1.5 ulps); rows that see nothing stay 0 with lse
    +inf."""
    generator = torch.Generator(DEVICE).manual_seed(3 + is_fp8)
    q, cache, block_table, cache_seqlens = make_inputs([90, 0, 2, 200], 2, 16, is_fp8, generator)
    sink = sinks(16, generator)
    out, lse = reference.dense_decode(q, cache, block_table, cache_seqlens, KV_LORA_RANK, SCALE, True, is_fp8)
    want_out, want_lse = reference.dense_decode(q, cache, block_table, cache_seqlens, KV_LORA_RANK, SCALE, True,
                                                is_fp8, sink)
    assert apply_attn_sink_(out, lse.transpose(1, 2), sink) is out
    assert torch.equal(lse, want_lse) and torch.isposinf(lse).any()
    two_ulps = want_out.float().abs() * 2.0 ** -6 + 2.0 ** -126
    assert torch.all((out.float() - want_out.float()).abs() <= two_ulps)
    assert torch.all(out[:, :, 0] == reference.dense_decode(q, cache, block_table, cache_seqlens, KV_LORA_RANK, SCALE,
                                                            True, is_fp8)[0][:, :, 0])  # sink -inf: unchanged
    assert torch.all(out[1] == 0) and torch.all(out[:, :, 1] == 0)


def test_no_sink_leaves_the_output_alone():
    out = torch.randn(2, 3, 4, 8).bfloat16()
    before = out.clone()
    assert apply_attn_sink_(out, torch.randn(2, 3, 4), None) is out
    assert torch.equal(out, before)


@pytest.mark.gpu
@HOPPER
@pytest.mark.parametrize("seqlens,s_q,h_q,is_fp8", [
    ([90, 0, 2, 700], 1, 16, False),  # the narrow kernel
    ([90, 0, 2, 700], 1, 16, True),
    ([129, 4096, 1], 2, 128, False),  # the wide kernel, two row tiles
    ([300, 65], 3, 64, True),
    ([32768], 1, 128, False),  # split partials and their combine
])
def test_dense_decode_with_a_sink_runs_the_cuda_kernel(cuda_calls, seqlens, s_q, h_q, is_fp8):
    generator = torch.Generator(DEVICE).manual_seed(len(seqlens) * 100 + h_q + is_fp8)
    q, cache, block_table, cache_seqlens = make_inputs(seqlens, s_q, h_q, is_fp8, generator)
    sink = sinks(h_q, generator)
    out, lse = torch.ops.flashmla.dense_decode(q, cache, block_table, cache_seqlens, None, None, KV_LORA_RANK, SCALE,
                                               True, is_fp8, sink)
    assert cuda_calls == ["dense_decode"]
    want_out, want_lse = reference.dense_decode(q, cache, block_table, cache_seqlens, KV_LORA_RANK, SCALE, True,
                                                is_fp8, sink)
    assert_decode_close(out, lse, want_out, want_lse)


@pytest.mark.gpu
@HOPPER
@pytest.mark.parametrize("h_q,is_fp8", [(64, True), (128, True), (64, False)])
def test_sparse_decode_with_a_sink_runs_the_cuda_kernel(cuda_calls, h_q, is_fp8):
    generator = torch.Generator(DEVICE).manual_seed(h_q + is_fp8)
    batch, s_q, topk, num_blocks = 3, 2, 600, 16
    cache = paged_cache(num_blocks, is_fp8, generator, pad=0)
    q = torch.randn(batch, s_q, h_q, D_QK, generator=generator, device=DEVICE).to(torch.bfloat16)
    indices = random_indices((batch, s_q, topk), num_blocks * PAGE_BLOCK_SIZE, generator)
    topk_length = torch.tensor([topk, 0, 100], dtype=torch.int32, device=DEVICE)  # sequence 1 sees nothing
    sink = sinks(h_q, generator)
    out, lse = torch.ops.flashmla.sparse_decode(q, cache, indices, topk_length, None, None, None, None, None,
                                                KV_LORA_RANK, SCALE, is_fp8, sink)
    assert cuda_calls == ["sparse_decode"]
    want_out, want_lse = reference.sparse_decode(q, cache, indices, topk_length, None, None, None, KV_LORA_RANK, SCALE,
                                                 is_fp8, sink)
    assert_close(out, lse, want_out, want_lse)
    assert torch.all(out[1] == 0) and torch.all(torch.isposinf(lse[1]))


@pytest.mark.gpu
@HOPPER
@pytest.mark.parametrize("h_q", [64, 128])
def test_sparse_prefill_with_a_sink_runs_the_cuda_kernel(cuda_calls, h_q):
    generator = torch.Generator(DEVICE).manual_seed(h_q)
    q, kv, indices, topk_length = packed_prefill_inputs([500, 77], h_q, 1000, True, generator)
    sink = sinks(h_q, generator)
    got = torch.ops.flashmla.sparse_prefill(q, kv, indices, SCALE, KV_LORA_RANK, sink, topk_length, 0)
    assert cuda_calls == ["sparse_prefill"]
    want = reference.sparse_prefill(q, kv, indices, SCALE, KV_LORA_RANK, sink, topk_length, 0)
    assert_close(got[0], got[2], want[0], want[2])
    assert torch.equal(torch.isinf(got[1]), torch.isinf(want[1]))


@pytest.mark.gpu
@HOPPER
def test_dense_decode_with_a_sink_replays_in_a_cuda_graph():
    generator = torch.Generator(DEVICE).manual_seed(5)
    q, cache, block_table, cache_seqlens = make_inputs([300, 20, 129], 1, 128, True, generator)
    sink = sinks(128, generator)

    def call():
        return torch.ops.flashmla.dense_decode(q, cache, block_table, cache_seqlens, None, None, KV_LORA_RANK, SCALE,
                                               False, True, sink)

    call()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = call()
    cache_seqlens.copy_(torch.tensor([300, 0, 200], device=DEVICE))
    sink.copy_(sinks(128, generator))
    graph.replay()
    torch.cuda.synchronize()
    want_out, want_lse = reference.dense_decode(q, cache, block_table, cache_seqlens, KV_LORA_RANK, SCALE, False, True,
                                                sink)
    assert_decode_close(out, lse, want_out, want_lse)
