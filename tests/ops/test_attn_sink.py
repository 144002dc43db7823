"""The attention sink on the CUDA paths: dense decode, sparse decode and sparse prefill hand the sinks to their sm_90a
kernels, which put them in each row's softmax denominator where the row is normalised for the output (a piece's own
store, or the combine of split partials; `sink_denominator` in csrc/decode_common.cuh). Before stop 50 the output
was scaled after the kernels by elementwise launches (13-54 us a decode call on the H100, stop 49). CPU: the ops hand
the sink to the extension (a stand-in computing the reference), with an extra cache too (one call: the extension's
combine merges both caches' launches). GPU (Hopper): every way a kernel normalises a row, against the reference; a
head whose sink is -inf equals the output without a sink bit for bit, a head whose sink is +inf is 0; the op replays
in a CUDA graph."""
import pytest
import torch
from decode_inputs import (DEVICE, HOPPER, SCALE, assert_close, assert_decode_close, make_inputs,
                           packed_prefill_inputs, sinks, sparse_decode_inputs)

from flashmla_ops import _ext, decode, reference, sparse_prefill
from flashmla_ops._attention import sink_factor
from flashmla_ops.kv_cache import KV_LORA_RANK


class ReferenceExtension:
    """The CUDA extension's sparse functions computed by the reference, recording the sink (and the extra cache) of
    each call."""

    def __init__(self):
        self.sinks, self.extra_caches = [], []

    def sparse_decode(self, q, cache, indices, topk_length, scale, is_fp8, num_splits, attn_sink=None,
                      extra_kv_cache=None, extra_indices=None, extra_topk_length=None, extra_num_splits=1):
        self.sinks.append(attn_sink)
        self.extra_caches.append(extra_kv_cache)
        return reference.sparse_decode(q, cache, indices, topk_length, extra_kv_cache, extra_indices,
                                       extra_topk_length, KV_LORA_RANK, scale, is_fp8, attn_sink)

    def sparse_prefill(self, q, kv, indices, topk_length, scale, attn_sink=None):
        self.sinks.append(attn_sink)
        return reference.sparse_prefill(q, kv, indices, scale, KV_LORA_RANK, attn_sink, topk_length, 0)[:3]


def test_cuda_sparse_paths_hand_the_sink_to_the_kernel(monkeypatch):
    """The sink (a strided view: the kernels read it contiguous) goes to the one call of sparse decode, with an extra
    cache too (the extension merges both caches' launches in its combine), and to each launch of sparse prefill."""
    generator = torch.Generator(DEVICE).manual_seed(11)
    extension = ReferenceExtension()
    monkeypatch.setattr(_ext, "extension", lambda: extension)
    monkeypatch.setattr(decode, "cuda_num_splits", lambda *args: 2)  # (asks the GPU its SM count)
    sink = torch.stack([sinks(16, generator), torch.zeros(16, device=DEVICE)], 1)[:, 0]
    assert not sink.is_contiguous()
    q, cache, indices = sparse_decode_inputs(3, 2, 16, 200, False, generator, num_blocks=6, pad=0)
    got = decode._cuda_sparse_decode(q, cache, indices, None, SCALE, False, sink)
    assert extension.sinks[-1].is_contiguous() and torch.equal(extension.sinks[-1], sink)
    want = reference.sparse_decode(q, cache, indices, None, None, None, None, KV_LORA_RANK, SCALE, False, sink)
    assert all(torch.equal(g, w) for g, w in zip(got, want))

    monkeypatch.setattr(decode, "sparse_decode_path", lambda *args: "cuda")
    _, extra_cache, extra_indices = sparse_decode_inputs(3, 2, 16, 70, False, generator, num_blocks=2, pad=64)
    out, lse = torch.ops.flashmla.sparse_decode(q, cache, indices, None, extra_cache, extra_indices, None, None, None,
                                                KV_LORA_RANK, SCALE, False, sink)
    assert torch.equal(extension.sinks[-1], sink) and extension.extra_caches[-1] is extra_cache
    want_out, want_lse = reference.sparse_decode(q, cache, indices, None, extra_cache, extra_indices, None,
                                                 KV_LORA_RANK, SCALE, False, sink)
    assert_decode_close(out, lse, want_out, want_lse)

    q, kv, indices, topk_length = packed_prefill_inputs([30, 7], 16, 64, True, generator)
    got = sparse_prefill._cuda_sparse_prefill(q, kv, indices, SCALE, topk_length, sink)
    assert torch.equal(extension.sinks[-1], sink)
    want = reference.sparse_prefill(q, kv, indices, SCALE, KV_LORA_RANK, sink, topk_length, 0)
    assert all(torch.equal(g, w) for g, w in zip(got[:3], want[:3]))


def sinks_near(lse, h_q, generator):
    """Per-head sinks within a few units of the typical finite LSE of `lse` (so that every finite one scales its head's
    rows by a visible factor; sinks() draws them around 3, which at 32k tokens, LSE ~11, moves out by ~1e-3), head 0's
    -inf (no sink), head 1's +inf and head 2's 1e4 (past exp2's float range): those heads' rows 0."""
    typical = lse[torch.isfinite(lse)].median()
    sink = typical + torch.randn(h_q, generator=generator, device=DEVICE) * 2
    sink[0], sink[1], sink[2] = float("-inf"), float("inf"), 1e4
    return sink


def check_sink_heads(run, reference_with, h_q, generator, by_head=lambda lse: lse.transpose(1, 2),
                     check=assert_decode_close):
    """`run(sink)` (the op's out and lse) with sinks_near the LSEs of `run(None)`: against `reference_with(sink)`;
    every element the output without a sink times sigmoid(lse - sink) (`sink_factor`) within the two bf16 roundings
    (half an ulp each, 2**-8 relative at most) and float32 rounding of its row's scale; head 0 (-inf) the output
    without a sink bit for bit; the same lse. `by_head(lse)` puts lse's heads last, as out's are but for its value
    columns."""
    plain_out, plain_lse = run(None)
    sink = sinks_near(plain_lse, h_q, generator)
    out, lse = run(sink)
    check(out, lse, *reference_with(sink))
    assert torch.equal(lse, plain_lse)
    assert torch.equal(out[..., 0, :], plain_out[..., 0, :])
    scaled = plain_out.float() * sink_factor(by_head(plain_lse), sink)[..., None]
    # the combines sum weighted partials in float32: an element where they cancel (1e-7 in a row of 1, measured on
    # the H100) is off by float32 rounding of the row's scale, not of its own
    row_scale = scaled.abs().amax(-1, keepdim=True)
    bound = 2.0 ** -7 * torch.maximum(out.float().abs(), scaled.abs()) + 2.0 ** -20 * row_scale
    assert torch.all((out.float() - scaled).abs() <= bound), (out.float() - scaled).abs().max()
    assert torch.all(out[..., 1:3, :] == 0)


def check_dense_sink_heads(q, cache, block_table, cache_seqlens, is_fp8, generator, schedule=(None, None)):
    """check_sink_heads on causal dense decode through the op (`schedule`: get_mla_metadata's, or none)."""
    def run(sink):
        return torch.ops.flashmla.dense_decode(q, cache, block_table, cache_seqlens, *schedule, KV_LORA_RANK, SCALE,
                                               True, is_fp8, sink)

    def reference_with(sink):
        return reference.dense_decode(q, cache, block_table, cache_seqlens, KV_LORA_RANK, SCALE, True, is_fp8, sink)

    check_sink_heads(run, reference_with, q.shape[2], generator)


SHORT = [1, 70, 0, 129, 64, 200, 3] * 20  # 140 sequences: as many CTAs as SMs or more, so no split (an H100 has 132)


@pytest.mark.gpu
@HOPPER
@pytest.mark.parametrize("seqlens,s_q,h_q,is_fp8", [
    (SHORT, 1, 16, False),  # the narrow kernel, each piece to out
    (SHORT, 1, 16, True),
    ([90, 0, 2, 700], 1, 16, False),  # narrow, few splits
    ([90, 0, 2, 700], 1, 16, True),
    ([32768, 5], 1, 16, False),  # narrow, many splits
    (SHORT, 1, 64, False),  # the wide kernel, each piece to out
    (SHORT, 1, 64, True),
    (SHORT, 2, 64, False),  # two row tiles a sequence
    (SHORT[:50], 1, 64, False),  # wide, two splits
    ([129, 4096, 1], 2, 128, False),  # wide, 9 to 15 splits: combine_kernel
    ([300, 65], 3, 64, True),  # wide, few splits
    ([32768, 5], 1, 128, False),  # wide, many splits
])
def test_dense_decode_with_a_sink_runs_the_cuda_kernel(cuda_calls, seqlens, s_q, h_q, is_fp8):
    generator = torch.Generator(DEVICE).manual_seed(len(seqlens) * 100 + s_q * 10 + h_q + is_fp8)
    check_dense_sink_heads(*make_inputs(seqlens, s_q, h_q, is_fp8, generator), is_fp8, generator)
    assert cuda_calls == ["dense_decode", "dense_decode"]


@pytest.mark.gpu
@HOPPER
@pytest.mark.parametrize("parts", [3, 40])
@pytest.mark.parametrize("s_q,h_q,is_fp8", [(1, 16, False), (1, 128, False), (1, 64, True), (3, 64, False)])
def test_dense_decode_with_a_sink_on_a_balanced_schedule(cuda_calls, parts, s_q, h_q, is_fp8):
    """get_mla_metadata's parts: sequences over several parts (the combine) and in one (the piece's own store; at s_q 3
    h_q 64 on the wide kernel without early refills)."""
    generator = torch.Generator(DEVICE).manual_seed(parts + s_q + h_q + is_fp8)
    q, cache, block_table, cache_seqlens = make_inputs([1000, 3, 0, 64, 65, 4097, 1], s_q, h_q, is_fp8, generator)
    check_dense_sink_heads(q, cache, block_table, cache_seqlens, is_fp8, generator,
                           reference.get_mla_metadata(cache_seqlens, parts))
    assert cuda_calls == ["dense_decode", "dense_decode"]


@pytest.mark.gpu
@HOPPER
@pytest.mark.parametrize("batch,h_q,is_fp8", [(3, 64, True), (3, 128, True), (3, 64, False),
                                              (70, 64, True)])  # 140 CTAs: each piece to out
def test_sparse_decode_with_a_sink_runs_the_cuda_kernel(cuda_calls, batch, h_q, is_fp8):
    generator = torch.Generator(DEVICE).manual_seed(batch + h_q + is_fp8)
    q, cache, indices = sparse_decode_inputs(batch, 2, h_q, 600, is_fp8, generator, num_blocks=16, pad=0)
    topk_length = torch.randint(0, 601, (batch,), generator=generator, device=DEVICE, dtype=torch.int32)
    topk_length[1] = 0  # sequence 1 sees nothing

    def run(sink):
        return torch.ops.flashmla.sparse_decode(q, cache, indices, topk_length, None, None, None, None, None,
                                                KV_LORA_RANK, SCALE, is_fp8, sink)

    def reference_with(sink):
        return reference.sparse_decode(q, cache, indices, topk_length, None, None, None, KV_LORA_RANK, SCALE, is_fp8,
                                       sink)

    check_sink_heads(run, reference_with, h_q, generator, check=assert_close)
    assert cuda_calls == ["sparse_decode", "sparse_decode"]
    out, lse = run(sinks(h_q, generator))
    assert torch.all(out[1] == 0) and torch.all(torch.isposinf(lse[1]))


@pytest.mark.gpu
@HOPPER
@pytest.mark.parametrize("h_q", [64, 128])
def test_sparse_prefill_with_a_sink_runs_the_cuda_kernel(cuda_calls, h_q):
    generator = torch.Generator(DEVICE).manual_seed(h_q)
    q, kv, indices, topk_length = packed_prefill_inputs([500, 77], h_q, 1000, True, generator)
    plain = torch.ops.flashmla.sparse_prefill(q, kv, indices, SCALE, KV_LORA_RANK, None, topk_length, 0)

    def run(sink):
        got = torch.ops.flashmla.sparse_prefill(q, kv, indices, SCALE, KV_LORA_RANK, sink, topk_length, 0)
        assert torch.equal(got[1], plain[1])  # max_logits: the sink is not a logit
        return got[0], got[2]

    def reference_with(sink):
        want = reference.sparse_prefill(q, kv, indices, SCALE, KV_LORA_RANK, sink, topk_length, 0)
        return want[0], want[2]

    check_sink_heads(run, reference_with, h_q, generator, by_head=lambda lse: lse, check=assert_close)
    assert cuda_calls == ["sparse_prefill"] * 3


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
    sink[2] = 1e4  # past exp2's float range: that head's rows 0
    graph.replay()
    torch.cuda.synchronize()
    want_out, want_lse = reference.dense_decode(q, cache, block_table, cache_seqlens, KV_LORA_RANK, SCALE, False, True,
                                                sink)
    assert_decode_close(out, lse, want_out, want_lse)
    assert torch.all(out[:, :, 2] == 0)
