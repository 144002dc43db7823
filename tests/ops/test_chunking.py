"""The references bound their float32 temporaries by chunking (keys: online softmax; queries: row blocks). Realistic
sizes chunk only past ~32K keys, so here the chunk sizes are shrunk to force many chunks on small inputs, and the
results still match the one-softmax oracle. (The constants are looked up at call time; a rename fails loudly.)"""
import pytest
import torch

import mla_oracle as oracle
from flashmla_ops import _attention, decode, indexer, sparse_prefill

ops = torch.ops.flashmla


@pytest.fixture
def tiny_chunks(monkeypatch):
    monkeypatch.setattr(_attention, "ELEMENTS_PER_CHUNK", 1)         # 64 keys per chunk
    monkeypatch.setattr(decode, "TOKENS_PER_CHUNK", 3 * 576 * 40)    # a few query rows per chunk
    monkeypatch.setattr(sparse_prefill, "TOKENS_PER_CHUNK", 3 * 576 * 40)
    monkeypatch.setattr(indexer, "ELEMENTS_PER_CHUNK", 1)            # one query row per chunk


def test_dense_decode_many_key_chunks(tiny_chunks):
    lengths = [300, 0, 64, 129]
    cache_seqlens = torch.tensor(lengths, dtype=torch.int32)
    cache, flat_keys = oracle.paged_cache(12, fp8=True)
    block_table = oracle.block_table_for(lengths, 12)
    q = oracle.bf16(4, 3, 16, 576)
    out, lse = ops.dense_decode(q, cache, block_table, cache_seqlens, None, None, 512, 0.04, True, True, None)
    oracle.assert_attention_close(out, lse, *oracle.dense_decode(q, flat_keys, block_table, cache_seqlens, 0.04, 512, True))


def test_sparse_decode_many_chunks(tiny_chunks):
    cache, flat_keys = oracle.paged_cache(3, fp8=False)
    extra_cache, extra_flat_keys = oracle.paged_cache(1, fp8=False)
    indices = torch.randint(-1, 192, (2, 7, 150), dtype=torch.int32)
    indices[1, :, :80] = -1  # whole leading key chunks with nothing valid
    extra_indices = torch.randint(-1, 64, (2, 7, 20), dtype=torch.int32)
    q = oracle.bf16(2, 7, 4, 576)
    out, lse = ops.sparse_decode(q, cache, indices, None, extra_cache, extra_indices, None, None, None, 512, 0.04, False,
                                 None)
    ref = oracle.sparse_decode(q, flat_keys, indices, None, 0.04, 512, extra_flat_keys, extra_indices)
    oracle.assert_attention_close(out, lse, *ref)


def test_sparse_prefill_many_chunks(tiny_chunks):
    s_kv, topk = 30, 150
    q, kv = oracle.bf16(s_kv, 4, 576), oracle.bf16(s_kv, 1, 576)
    indices = torch.randint(-1, s_kv + 5, (s_kv, 1, topk), dtype=torch.int32)
    out, max_logits, lse, lse_indexer = ops.sparse_prefill(q, kv, indices, 0.05, 512, None, None, 100)
    ref_out, ref_max, ref_lse, ref_lse_indexer = oracle.sparse_prefill(q, kv, indices, 0.05, 512, indexer_topk=100)
    oracle.assert_attention_close(out, lse, ref_out, ref_lse)
    assert (max_logits.double() - ref_max).abs().max() < 1e-4
    assert (lse_indexer.double() - ref_lse_indexer).abs().max() < 1e-4


def test_indexer_logits_many_chunks(tiny_chunks):
    q, k, weights = oracle.bf16(9, 4, 32), oracle.bf16(40, 32), torch.randn(9, 4)
    k_start = torch.randint(0, 20, (9,), dtype=torch.int32)
    k_end = k_start + torch.randint(0, 21, (9,), dtype=torch.int32)
    logits = ops.indexer_logits(q, k, weights, k_start, k_end, None, None)
    ref = oracle.indexer_logits(q.double(), k.double(), weights, k_start, k_end)
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(logits), finite)
    assert (logits.double()[finite] - ref[finite]).abs().max() < 1e-4


@pytest.mark.parametrize("s_q", [5, 7, 20])
def test_cuda_sparse_prefill_launches_in_query_parts(monkeypatch, s_q):
    """Past CUDA_MAX_TOKENS queries (grid z) the CUDA sparse prefill launches part by part, each part's outputs going
    into the whole outputs as it ends (at most one part's besides them), each given the sink; the CPU reference
    stands in for the extension here."""
    launches = []

    class Extension:
        def sparse_prefill(self, q, kv, indices, topk_length, sm_scale, attn_sink):
            launches.append(q.shape[0])
            return sparse_prefill.sparse_prefill_reference(q, kv, indices, sm_scale, 512, attn_sink, topk_length,
                                                           0)[:3]

    monkeypatch.setattr(sparse_prefill._ext, "extension", lambda: Extension())
    monkeypatch.setattr(sparse_prefill, "CUDA_MAX_TOKENS", 7)
    q, kv = oracle.bf16(s_q, 4, 576), oracle.bf16(30, 1, 576)
    indices = torch.randint(-1, 30, (s_q, 1, 16), dtype=torch.int32)
    topk_length = torch.randint(0, 17, (s_q,), dtype=torch.int32)
    sink = torch.randn(4)
    got = sparse_prefill._cuda_sparse_prefill(q, kv, indices, 0.05, topk_length, sink)
    want = sparse_prefill.sparse_prefill_reference(q, kv, indices, 0.05, 512, sink, topk_length, 0)
    assert launches == [min(7, s_q - start) for start in range(0, s_q, 7)]
    for g, w in zip(got[:3], want[:3]):
        assert g.dtype == w.dtype and torch.equal(g, w)
