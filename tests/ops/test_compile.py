"""torch.compile(fullgraph=True) over the ops: the graph holds them without breaks and gives eager's results."""
import torch

import mla_oracle as oracle

ops = torch.ops.flashmla
I32 = torch.int32


def decode_step(kv_cache, latent, rope, slot_mapping, q, block_table, cache_seqlens, indices, attn_sink):
    """Write the new tokens (FP8), then dense causal decode and sparse decode over the cache."""
    ops.write_kv_cache(kv_cache, latent, rope, slot_mapping, True)
    meta, num_splits = ops.get_mla_metadata(cache_seqlens, 4)
    dense_out, dense_lse = ops.dense_decode(q, kv_cache, block_table, cache_seqlens, meta, num_splits, 512, 0.04, True,
                                            True, attn_sink)
    sparse_out, sparse_lse = ops.sparse_decode(q, kv_cache, indices, None, None, None, None, None, None, 512, 0.04, True,
                                               None)
    return dense_out, dense_lse * 2, sparse_out, sparse_lse, ops.dequantize_kv_fp8(kv_cache[:1])


def prefill_step(q_index, k_index, weights, k_start, k_end, q, kv):
    """Indexer logits -> top-k -> sparse prefill over the selected rows."""
    logits = ops.indexer_logits(q_index, k_index, weights, k_start, k_end, None, None)
    indices = ops.indexer_topk(logits, 16, None)
    out, max_logits, lse, lse_indexer = ops.sparse_prefill(q, kv, indices[:, None, :], 0.05, 512, None, None, 8)
    return torch.sort(indices, dim=-1).values, out, max_logits, lse, lse_indexer


def assert_same(compiled, eager):
    for c, e in zip(compiled, eager):
        assert c.shape == e.shape and c.dtype == e.dtype
        assert torch.equal(torch.isinf(c), torch.isinf(e))
        assert torch.allclose(c.float(), e.float(), rtol=1e-3, atol=1e-3, equal_nan=False)


def test_compiled_decode_step_matches_eager():
    cache, _ = oracle.paged_cache(4, fp8=True, pad=656)
    lengths = [100, 1, 64]
    args = (oracle.bf16(5, 512), oracle.bf16(5, 64), torch.tensor([99, -1, 0, 200, 63], dtype=I32),
            oracle.bf16(3, 2, 16, 576), oracle.block_table_for(lengths, 4), torch.tensor(lengths, dtype=I32),
            torch.randint(-1, 256, (3, 2, 40), dtype=I32), torch.randn(16))
    eager_cache, compiled_cache = cache.clone(), cache.clone()
    eager = decode_step(eager_cache, *args)
    compiled = torch.compile(decode_step, fullgraph=True)(compiled_cache, *args)
    assert_same(compiled, eager)
    assert torch.equal(compiled_cache, eager_cache), "the compiled write mutates the cache like eager"
    assert not torch.equal(compiled_cache, cache)


def test_compiled_prefill_step_matches_eager():
    s = 50
    args = (oracle.bf16(s, 4, 32), oracle.bf16(s, 32), torch.rand(s, 4), torch.zeros(s, dtype=I32),
            torch.arange(1, s + 1, dtype=I32), oracle.bf16(s, 16, 576), oracle.bf16(s, 1, 576))
    eager = prefill_step(*args)
    compiled = torch.compile(prefill_step, fullgraph=True)(*args)
    assert_same(compiled, eager)
