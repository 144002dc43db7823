"""Sparse prefill (torch.ops.flashmla.sparse_prefill) on varlen-packed batches against the float64 oracle."""
import math

import pytest
import torch

import mla_oracle as oracle

ops = torch.ops.flashmla


def packed_indices(seq_lens, topk, invalid_fraction=0.15):
    """Queries of a packed batch (one query per token, as in prefill) pick causal rows of their own sequence:
    sequence j occupies rows [start_j, start_j + len_j) of both q and kv. Adds -1s, indices >= s_kv, duplicates."""
    s_kv = sum(seq_lens)
    rows = []
    start = 0
    for length in seq_lens:
        for position in range(length):
            own = start + torch.randint(0, position + 1, (topk,))
            rows.append(own)
        start += length
    indices = torch.stack(rows).int()[:, None, :] if rows else torch.zeros(0, 1, topk, dtype=torch.int32)
    noise = torch.rand(indices.shape)
    indices[noise < invalid_fraction / 2] = -1
    indices[(noise >= invalid_fraction / 2) & (noise < invalid_fraction)] = s_kv + 3  # >= s_kv: no token
    if topk > 4:
        indices[..., 2] = indices[..., 4]
    if indices.shape[0] > 1:
        indices[1] = -1
        indices[-1, 0, ::2] = s_kv  # exactly s_kv is already out of range
    return indices


@pytest.mark.parametrize("seq_lens,h_q,topk,with_sink,with_topk_length,indexer_topk", [
    ([5, 70, 1], 16, 40, False, False, 0),
    ([33, 2], 128, 64, True, True, 16),
    ([1], 1, 1, False, False, 1),
    ([20, 9, 40], 16, 100, True, False, 70),
    ([3, 4], 16, 8, False, True, 20),  # indexer_topk > topk
])
def test_sparse_prefill(device, seq_lens, h_q, topk, with_sink, with_topk_length, indexer_topk):
    s_kv = sum(seq_lens)
    q = oracle.bf16(s_kv, h_q, oracle.D_QK, device=device)
    kv = oracle.bf16(s_kv, 1, oracle.D_QK, device=device)
    indices = packed_indices(seq_lens, topk)
    attn_sink = torch.randn(h_q) if with_sink else None
    topk_length = torch.randint(0, topk + 1, (s_kv,), dtype=torch.int32) if with_topk_length else None
    scale = 0.05
    out, max_logits, lse, lse_indexer = ops.sparse_prefill(
        q, kv, indices.to(device), scale, oracle.D_V, None if attn_sink is None else attn_sink.to(device),
        None if topk_length is None else topk_length.to(device), indexer_topk)
    ref = oracle.sparse_prefill(q.cpu(), kv.cpu(), indices, scale, oracle.D_V, attn_sink, topk_length, indexer_topk)
    ref_out, ref_max, ref_lse, ref_lse_indexer = ref
    assert out.shape == (s_kv, h_q, oracle.D_V) and out.dtype == torch.bfloat16
    assert max_logits.dtype == lse.dtype == torch.float32
    oracle.assert_attention_close(out, lse, ref_out, ref_lse)
    max_logits = max_logits.cpu().double()
    assert torch.equal(torch.isneginf(max_logits), torch.isneginf(ref_max))
    finite = torch.isfinite(ref_max)
    assert (max_logits[finite] - ref_max[finite]).abs().max() < 1e-4
    if indexer_topk:
        lse_indexer = lse_indexer.cpu().double()
        assert lse_indexer.shape == (s_kv, h_q)
        assert torch.equal(torch.isinf(lse_indexer), torch.isinf(ref_lse_indexer))
        finite = torch.isfinite(ref_lse_indexer)
        assert (lse_indexer[finite] - ref_lse_indexer[finite]).abs().max() < 1e-4
    else:
        assert lse_indexer.numel() == 0


def test_sparse_prefill_topk_lengths_outside_0_to_topk(device):
    """A topk_length past topk counts every index and one of 0 or below none (FlashMLA's mask `position >=
    topk_length`; a negative length is no count from the end): out 0, lse and the indexer LSE +inf, max_logits -inf
    there; the indexer LSE takes the first indexer_topk of the counted indices."""
    seq_lens, h_q, topk, indexer_topk = [6, 5], 16, 12, 5
    s_kv = sum(seq_lens)
    q = oracle.bf16(s_kv, h_q, oracle.D_QK, device=device)
    kv = oracle.bf16(s_kv, 1, oracle.D_QK, device=device)
    indices = packed_indices(seq_lens, topk, invalid_fraction=0)
    topk_length = torch.tensor([-1, topk + 1, 3, -7, 100, 0, 2 ** 31 - 1, -2 ** 31, 4, topk, -12], dtype=torch.int32)
    out, max_logits, lse, lse_indexer = ops.sparse_prefill(q, kv, indices.to(device), 0.05, oracle.D_V, None,
                                                           topk_length.to(device), indexer_topk)
    ref_out, ref_max, ref_lse, ref_lse_indexer = oracle.sparse_prefill(q.cpu(), kv.cpu(), indices, 0.05, oracle.D_V,
                                                                       None, topk_length, indexer_topk)
    oracle.assert_attention_close(out, lse, ref_out, ref_lse)
    none = topk_length <= 0
    assert torch.isposinf(lse.cpu()[none]).all() and (out.cpu()[none] == 0).all()
    for value, want in ((max_logits, ref_max), (lse_indexer, ref_lse_indexer)):
        value = value.cpu().double()
        assert torch.equal(torch.isposinf(value), torch.isposinf(want))
        assert torch.equal(torch.isneginf(value), torch.isneginf(want))
        finite = torch.isfinite(want)
        assert (value[finite] - want[finite]).abs().max() < 1e-4


def test_sparse_prefill_packed_equals_separate_calls(device):
    """One call over a packed batch gives each sequence what a call over that sequence alone gives."""
    seq_lens, h_q, topk = [30, 7, 12], 16, 24
    q = oracle.bf16(sum(seq_lens), h_q, oracle.D_QK, device=device)
    kv = oracle.bf16(sum(seq_lens), 1, oracle.D_QK, device=device)
    indices = packed_indices(seq_lens, topk, invalid_fraction=0)
    packed = ops.sparse_prefill(q, kv, indices.to(device), 0.04, oracle.D_V, None, None, 0)
    start = 0
    for length in seq_lens:
        rows = slice(start, start + length)
        alone = ops.sparse_prefill(q[rows], kv[rows], (indices[rows] - start).to(device), 0.04, oracle.D_V, None, None, 0)
        for packed_part, alone_part in zip(packed[:3], alone[:3]):
            assert torch.allclose(packed_part[rows].float(), alone_part.float(), rtol=1e-2, atol=1e-4)
        start += length


def test_sparse_prefill_reads_no_row_it_does_not_list(device):
    """kv rows no query lists hold NaN, row 0 among them: queries with -1s, indices >= s_kv and entries past
    topk_length (a missing key's row was gathered from row 0 and its zero weight times NaN made the reference's
    output NaN), the indexer LSE too."""
    seq_lens, h_q, topk = [12, 9], 16, 24
    s_kv = sum(seq_lens)
    q = oracle.bf16(s_kv, h_q, oracle.D_QK, device=device)
    kv = oracle.bf16(s_kv, 1, oracle.D_QK, device=device)
    indices = packed_indices(seq_lens, topk)
    listed = torch.unique(indices[(indices >= 0) & (indices < s_kv)]).long()
    unlisted = torch.ones(s_kv, dtype=torch.bool)
    unlisted[listed] = False
    indices[indices == 0] = -1  # row 0 is listed by none
    unlisted[0] = True
    kv[unlisted.to(device)] = float("nan")
    topk_length = torch.randint(0, topk + 1, (s_kv,), dtype=torch.int32)
    out, max_logits, lse, lse_indexer = ops.sparse_prefill(q, kv, indices.to(device), 0.05, oracle.D_V, None,
                                                           topk_length.to(device), 10)
    ref = oracle.sparse_prefill(q.cpu(), kv.cpu(), indices, 0.05, oracle.D_V, None, topk_length, 10)
    oracle.assert_attention_close(out, lse, ref[0], ref[2])
    for name, value, want in (("max_logits", max_logits, ref[1]), ("lse_indexer", lse_indexer, ref[3])):
        value = value.cpu().double()
        assert torch.equal(torch.isinf(value), torch.isinf(want)) and not value.isnan().any(), name
        finite = torch.isfinite(want)
        assert (value[finite] - want[finite]).abs().max() < 1e-4, name


def test_sparse_prefill_seqlen_zero(device):
    """Empty kv (s_kv = 0): every index is >= s_kv, so every query gets out = 0, lse = +inf, max_logits = -inf."""
    q = oracle.bf16(3, 16, oracle.D_QK, device=device)
    kv = oracle.bf16(0, 1, oracle.D_QK, device=device)
    indices = torch.tensor([[[-1, 0, 5]], [[-1, -1, -1]], [[2, 1, 0]]], dtype=torch.int32, device=device)
    out, max_logits, lse, _ = ops.sparse_prefill(q, kv, indices, 0.04, oracle.D_V, None, None, 0)
    assert (out == 0).all() and (lse == math.inf).all() and (max_logits == -math.inf).all()


def test_sparse_prefill_infinite_sinks(device):
    """Sinks of -inf, +inf and finite ones, with queries that list no valid row (out 0, lse +inf, max_logits -inf
    whatever the sink), against the oracle; the sink changes neither lse nor max_logits."""
    s_kv, h_q = 6, 4
    q, kv = oracle.bf16(s_kv, h_q, oracle.D_QK, device=device), oracle.bf16(s_kv, 1, oracle.D_QK, device=device)
    indices = packed_indices([s_kv], 8, invalid_fraction=0)
    indices[2] = -1
    indices[4, 0, ::2] = s_kv
    attn_sink = torch.tensor([float("-inf"), float("inf"), 0.0, 2.0])
    out, max_logits, lse, _ = ops.sparse_prefill(q, kv, indices.to(device), 0.05, oracle.D_V, attn_sink.to(device),
                                                 None, 0)
    ref_out, ref_max, ref_lse, _ = oracle.sparse_prefill(q.cpu(), kv.cpu(), indices, 0.05, oracle.D_V, attn_sink)
    oracle.assert_attention_close(out, lse, ref_out, ref_lse)
    assert torch.equal(torch.isinf(max_logits.cpu()), torch.isinf(ref_max))
    finite = torch.isfinite(ref_max)
    assert (max_logits.cpu().double()[finite] - ref_max[finite]).abs().max() < 1e-4
    assert (out[1:3] == 0).all() and (out[:, 1] == 0).all()


def test_sparse_prefill_float32_inputs_give_float32_outputs():
    """float32 q and kv run the reference in float32 (the op's docstring): float32 out, within float32 (not bfloat16)
    rounding of the oracle."""
    seq_lens, h_q = [20, 9], 4
    q, kv = torch.randn(sum(seq_lens), h_q, oracle.D_QK), torch.randn(sum(seq_lens), 1, oracle.D_QK)
    indices = packed_indices(seq_lens, 16)
    out, max_logits, lse, _ = ops.sparse_prefill(q, kv, indices, 0.05, oracle.D_V, None, None, 0)
    assert out.dtype == torch.float32
    ref_out, ref_max, ref_lse, _ = oracle.sparse_prefill(q, kv, indices, 0.05, oracle.D_V)
    oracle.assert_attention_close(out, lse, ref_out, ref_lse, out_rtol=1e-5)


def test_sparse_prefill_no_queries(device):
    q = oracle.bf16(0, 16, oracle.D_QK, device=device)
    kv = oracle.bf16(10, 1, oracle.D_QK, device=device)
    out, max_logits, lse, lse_indexer = ops.sparse_prefill(q, kv, torch.zeros(0, 1, 8, dtype=torch.int32, device=device),
                                                           0.04, oracle.D_V, None, None, 4)
    assert out.shape == (0, 16, oracle.D_V) and lse.shape == max_logits.shape == lse_indexer.shape == (0, 16)


def test_sparse_prefill_reference_ignores_index_order_and_padding():
    """The same causal selection, shuffled and padded to topk 64 or 192 with -1s, gives bit-identical outputs."""
    length, h_q = 40, 16
    q, kv = oracle.bf16(length, h_q, oracle.D_QK), oracle.bf16(length, 1, oracle.D_QK)
    results = []
    for topk in (64, 192):
        indices = torch.full((length, 1, topk), -1, dtype=torch.int32)
        for t in range(length):
            indices[t, 0, torch.randperm(topk)[:t + 1]] = torch.randperm(t + 1).int()
        results.append(ops.sparse_prefill(q, kv, indices, oracle.D_QK ** -0.5, oracle.D_V, None, None, 0)[:3])
    assert all(torch.equal(a, b) for a, b in zip(*results))
