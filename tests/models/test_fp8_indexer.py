"""V3.2 with the FP8 index cache scores its indexer as DeepSeek's release does: q and k rotated by the normalized
Hadamard matrix, then e4m3 with one power-of-two scale per row (the cache's rule), in prefill and in decode alike.

- The rotation is orthogonal (logits of unquantized rows unchanged) and its matrix is exact (+-1 entries).
- A token is scored the same whether it is the last token of a prefill or a decode step after that prefill: both take
  its rotated q in e4m3 against the keys as the FP8 cache holds them. Compared on the first layer, whose inputs are the
  same either way (deeper layers see attention outputs over a BF16 latent in prefill and the FP8 latent cache in
  decode). Scoring prefill with unquantized keys, as before this stop, moved these logits by 2.7e-2 of their largest.
"""
import pytest
import torch

from models import DeepseekConfig, PagedKVCache, decode_step, prefill, random_model, tiny_config

# float32 sums of the same e4m3 products in another order (the prefill and the paged op's chunks)
SAME_SCORE = 1e-5


def v32_model(seed):
    config = DeepseekConfig.from_dict(tiny_config("deepseek_v32"))
    return config, random_model(config, torch.float32, seed=seed)


def test_the_rotation_is_orthogonal_and_exact():
    _, model = v32_model(seed=0)
    indexer = model.model.layers[0].self_attn.indexer
    d = indexer.head_dim
    assert set(indexer.hadamard.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(indexer.hadamard @ indexer.hadamard.T, d * torch.eye(d))
    generator = torch.Generator().manual_seed(1)
    q, k = torch.randn(5, 3, d, generator=generator), torch.randn(7, d, generator=generator)
    torch.testing.assert_close(torch.einsum("thd,sd->ths", indexer.rotate(q), indexer.rotate(k)),
                               torch.einsum("thd,sd->ths", q, k), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_gains", [None, (1.0, 5.0, 0.3, 20.0)])
def test_prefill_and_decode_score_a_token_alike(monkeypatch, head_gains):
    """With `head_gains` the first layer's indexer heads' q are scaled apart (wq_b's rows per head), so that their
    e4m3 scales differ: each (token, head) row must be scored with its own scale in decode as in prefill (with
    alike heads, one scale serves all and a scale taken from the wrong head goes unseen)."""
    config, model = v32_model(seed=5)
    if head_gains is not None:
        wq_b = model.model.layers[0].self_attn.indexer.wq_b.weight
        with torch.no_grad():
            wq_b.view(config.index_n_heads, -1, wq_b.shape[1]).mul_(torch.tensor(head_gains)[:, None, None])
    generator = torch.Generator().manual_seed(6)
    tokens = torch.randint(2, config.vocab_size, (41,), generator=generator).tolist()
    assert config.index_topk < 40  # the indexer really selects
    recorded = []
    topk = torch.ops.flashmla.indexer_topk

    def record(logits, k, block_table):
        recorded.append(logits)
        return topk(logits, k, block_table)

    monkeypatch.setattr(torch.ops.flashmla, "indexer_topk", record)
    with torch.inference_mode():
        prefill(model, PagedKVCache(config, 4, 1, 64, kv_cache_dtype="fp8"), [tokens])
        whole = recorded[0][40, :41]  # the first layer's row of the last token: (s_q, s_kv) packed rows
        recorded.clear()
        cache = PagedKVCache(config, 4, 1, 64, kv_cache_dtype="fp8")
        prefill(model, cache, [tokens[:40]])
        recorded.clear()
        cache.extend_batch(1, 1)
        decode_step(model, cache, torch.tensor([[tokens[40]]]))
        step = recorded[0][0, 0, :41]  # (batch, s_q, capacity)
    assert torch.isfinite(whole).all() and torch.isfinite(step).all()
    error = ((whole - step).abs().max() / whole.abs().max()).item()
    assert error <= SAME_SCORE, f"the token's logits differ by {error:.3g} of the largest between prefill and decode"


def test_prefill_scores_each_prompt_in_query_chunks(monkeypatch):
    """V3.2 prefill scores each packed prompt's queries in chunks against the keys they can see, never the packed
    prompts' whole (T, T) logits: the same selections as the packed scoring (forced here to chunks of a few rows),
    in e4m3 and in the model's dtype, and no logits wider than the chunk's prompt."""
    import models.deepseek as deepseek
    from models.deepseek import PrefillMetadata

    config, model = v32_model(seed=7)
    attention = model.model.layers[1].self_attn
    generator = torch.Generator().manual_seed(8)
    lengths = (30, 1, 45)
    total = sum(lengths)
    q = torch.randn(total, config.index_n_heads, config.index_head_dim, generator=generator)
    k = torch.randn(total, config.index_head_dim, generator=generator)
    weights = torch.randn(total, config.index_n_heads, generator=generator)
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    k_start = torch.tensor([s for s, n in zip(starts, lengths) for _ in range(n)], dtype=torch.int32)
    k_end = torch.tensor([s + i + 1 for s, n in zip(starts, lengths) for i in range(n)], dtype=torch.int32)
    metadata = PrefillMetadata(torch.zeros(total, dtype=torch.int64), k_start, k_end, lengths)
    widths = []
    logits_op = torch.ops.flashmla.indexer_logits

    def record(q, k, *args):
        widths.append((q.shape[0], k.shape[0]))
        return logits_op(q, k, *args)

    for fp8 in (False, True):
        packed_q, packed_k, q_scale, k_scale = q, k, None, None
        if fp8:
            (packed_q, q_scale), (packed_k, k_scale) = deepseek.quantize_fp8_rows(q), deepseek.quantize_fp8_rows(k)
        whole = torch.ops.flashmla.indexer_logits(packed_q, packed_k, weights, k_start, k_end, q_scale, k_scale)
        want = torch.ops.flashmla.indexer_topk(whole, config.index_topk, None)
        monkeypatch.setattr(deepseek, "PREFILL_INDEX_LOGITS", 200)
        monkeypatch.setattr(torch.ops.flashmla, "indexer_logits", record)
        widths.clear()
        got = attention.prefill_indices(q, k, weights, metadata, fp8)
        monkeypatch.undo()
        assert torch.equal(got.sort(-1).values, want.sort(-1).values)
        assert max(rows * keys for rows, keys in widths) <= 200 + 45 and max(keys for _, keys in widths) <= 45
        assert len(widths) > len(lengths)


def test_fp8_scoring_takes_the_rotated_rows(monkeypatch):
    """With the FP8 index cache the first layer scores e4m3 of its indexer's q and k times H / sqrt(d), H the Sylvester
    Hadamard matrix built here on its own (H[i, j] = (-1) ** popcount(i & j)): the keys written to the cache and the
    queries of the prefill logits, bit for bit (the rotation is the one thing that tells them from unrotated rows:
    both sides of every other check in this file would lose it alike)."""
    from flashmla_ops.kv_cache import quantize_fp8_rows

    config, model = v32_model(seed=9)
    indexer = model.model.layers[0].self_attn.indexer
    d = indexer.head_dim
    rows = torch.arange(d)
    both = rows[:, None] & rows[None, :]
    popcount = sum((both >> bit) & 1 for bit in range(d.bit_length()))
    hadamard = (1 - 2 * (popcount % 2)).float()

    def rotated(x):
        return ((x.float() @ hadamard) * d ** -0.5).to(x.dtype)

    produced, written, scored = [], [], []
    forward = indexer.forward
    monkeypatch.setattr(indexer, "forward", lambda *args: produced.append(forward(*args)) or produced[-1])
    write, logits = torch.ops.flashmla.write_index_cache, torch.ops.flashmla.indexer_logits
    monkeypatch.setattr(torch.ops.flashmla, "write_index_cache",
                        lambda cache, k, slots: written.append(k) or write(cache, k, slots))
    monkeypatch.setattr(torch.ops.flashmla, "indexer_logits", lambda *args: scored.append(args) or logits(*args))
    generator = torch.Generator().manual_seed(10)
    tokens = torch.randint(2, config.vocab_size, (33,), generator=generator).tolist()
    with torch.inference_mode():
        prefill(model, PagedKVCache(config, 4, 1, 64, kv_cache_dtype="fp8"), [tokens])
    q, k, _ = produced[0]
    assert not torch.equal(rotated(k), k)
    assert torch.equal(written[0], rotated(k)), "the index cache is written from the rotated keys"
    q_codes, q_scale = quantize_fp8_rows(rotated(q))
    k_codes, k_scale = quantize_fp8_rows(rotated(k))
    got_q, got_k, _, _, _, got_q_scale, got_k_scale = scored[0]
    assert got_q.shape == q_codes.shape and got_k.shape == k_codes.shape
    for name, got, want in (("q", got_q, q_codes), ("k", got_k, k_codes), ("q_scale", got_q_scale, q_scale),
                            ("k_scale", got_k_scale, k_scale)):
        assert torch.equal(got.view(torch.uint8) if got.dtype == torch.float8_e4m3fn else got,
                           want.view(torch.uint8) if want.dtype == torch.float8_e4m3fn else want), name
