"""Edge cases of the Triton dense decode, sparse decode and sparse prefill kernels against the reference: on the GPU,
and on the CPU under Triton's interpreter.

Head counts off the 16-row tiles (1, 3, 17, 65), topk 1 and 5, queries that see no token (lengths below s_q, every
length 0, every index -1 or past the cache, topk_length 0) with the attention sink, a block table with -1 past each
sequence's blocks, all-duplicate indices, out-of-range indices (no token, exactly as -1), lengths and indexer_topk
above topk, an extra cache with nothing counted, empty batches. Outputs are poisoned before each kernel call; LSE,
max_logits and the indexer LSE are compared too.
"""
import pytest
import torch

triton_decode = pytest.importorskip("flashmla_ops.triton.decode", exc_type=ImportError)
from decode_inputs import (DEVICE, assert_decode_close, make_inputs, poisoned, sinks,  # noqa: E402
                           sparse_decode_inputs)
from test_triton_decode import run_and_compare  # noqa: E402
from test_triton_sparse import (SCALE, assert_close, packed_prefill_inputs, paged_cache,  # noqa: E402
                                prefill_and_compare, random_indices, run_decode, run_prefill)

from flashmla_ops import reference  # noqa: E402
from flashmla_ops.kv_cache import D_QK, KV_LORA_RANK, PAGE_BLOCK_SIZE  # noqa: E402
from flashmla_ops.triton import sparse as triton_sparse  # noqa: E402

INT32_MAX = 2 ** 31 - 1


def decode_and_compare(q, cache, block_table, cache_seqlens, causal, is_fp8, attn_sink=None):
    """The dense decode kernel (outputs poisoned first) against the reference; returns its out and lse."""
    args = (q, cache, block_table, cache_seqlens, KV_LORA_RANK, D_QK ** -0.5, causal, is_fp8, attn_sink)
    out, lse = poisoned(triton_decode.dense_decode, *args)
    assert_decode_close(out, lse, *reference.dense_decode(*args))
    return out, lse


def sparse_decode_and_compare(*args):
    """The sparse decode kernel on sparse_decode's arguments (outputs poisoned first) against the reference."""
    out, lse = poisoned(triton_sparse.sparse_decode, *args)
    assert_close(out, lse, *reference.sparse_decode(*args))
    return out, lse


# ---------------------------------------------------------------- dense decode


@pytest.mark.parametrize("h_q", [1, 3, 17, 65])
@pytest.mark.parametrize("is_fp8", [False, True])
def test_triton_dense_decode_head_counts_off_the_row_tiles(h_q, is_fp8):
    """h_q 1, 3, 17 and 65 at causal s_q 2 with the sink: the last row tile runs past s_q * h_q, and a tile holds the
    rows of both query positions (each row's position and head from its index)."""
    run_and_compare([1, 70, 130], 2, h_q, causal=True, is_fp8=is_fp8, sink=True)


@pytest.mark.parametrize("is_fp8", [False, True])
def test_triton_dense_decode_causal_s_q_3_h_q_3(is_fp8):
    """Causal s_q 3 over h_q 3: the 9 rows of one tile are three positions of three heads, each position with its own
    visible length (a sequence of 2 tokens included: its first position sees none)."""
    run_and_compare([2, 64, 130], 3, 3, causal=True, is_fp8=is_fp8, sink=False)


@pytest.mark.parametrize("is_fp8", [False, True])
def test_triton_dense_decode_lengths_below_s_q_with_sink(is_fp8):
    """Causal s_q 4 over lengths 0, 1 and 3 (and 70): the first positions see no token, out 0 and lse +inf whatever
    the sink, the later ones one to three tokens, sink applied."""
    run_and_compare([0, 1, 3, 70], 4, 16, causal=True, is_fp8=is_fp8, sink=True)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("is_fp8", [False, True])
def test_triton_dense_decode_all_lengths_zero_with_sink(causal, is_fp8):
    """Every sequence empty: out exactly 0 and lse +inf everywhere, the sink notwithstanding."""
    out, lse, _ = run_and_compare([0, 0, 0], 2, 16, causal=causal, is_fp8=is_fp8, sink=True)
    assert torch.all(out == 0) and torch.all(torch.isposinf(lse))


@pytest.mark.parametrize("is_fp8", [False, True])
def test_triton_dense_decode_block_table_with_unused_minus_one_tail(is_fp8):
    """A block table 8 entries wider than the longest sequence needs, -1 in every entry past each sequence's last
    block, with the sink: the table's width allows more splits than the tokens fill (on the interpreter four, the
    later ones starting past the sequence's end), and no -1 entry is followed."""
    generator = torch.Generator(DEVICE).manual_seed(21 + is_fp8)
    seqlens = [1, 130]
    q, cache, block_table, cache_seqlens = make_inputs(seqlens, 2, 16, is_fp8, generator)
    wide = torch.full((len(seqlens), block_table.shape[1] + 8), -1, dtype=torch.int32, device=DEVICE)
    for b, length in enumerate(seqlens):
        used = -(-length // PAGE_BLOCK_SIZE)
        wide[b, :used] = block_table[b, :used]
    attn_sink = torch.randn(16, generator=generator, device=DEVICE)
    decode_and_compare(q, cache, wide, cache_seqlens, True, is_fp8, attn_sink)


@pytest.mark.parametrize("batch,s_q", [(0, 1), (2, 0)])
@pytest.mark.parametrize("is_fp8", [False, True])
def test_triton_dense_decode_empty_batch_and_no_queries(batch, s_q, is_fp8):
    """Batch 0 or s_q 0: no rows to compute, outputs of the reference's shapes and dtypes."""
    q, cache, block_table, cache_seqlens = make_inputs([70, 1], 1, 16, is_fp8, torch.Generator(DEVICE).manual_seed(3))
    out, lse = decode_and_compare(q[:batch, :s_q], cache, block_table[:batch], cache_seqlens[:batch], True, is_fp8)
    assert out.shape == (batch, s_q, 16, KV_LORA_RANK) and out.dtype == torch.bfloat16
    assert lse.shape == (batch, 16, s_q) and lse.dtype == torch.float32


@pytest.mark.parametrize("is_fp8", [False, True])
def test_triton_dense_decode_infinite_sinks(is_fp8):
    """Sinks of -inf (no sink) and +inf (out 0) next to finite ones, lengths 0 and up, split and not: no NaN for the
    queries that see nothing, where sigmoid(lse - sink) is sigmoid(inf - inf)."""
    generator = torch.Generator(DEVICE).manual_seed(61 + is_fp8)
    q, cache, block_table, cache_seqlens = make_inputs([0, 5, 300], 2, 16, is_fp8, generator)
    attn_sink = sinks(16, generator)
    out, _ = decode_and_compare(q, cache, block_table, cache_seqlens, True, is_fp8, attn_sink)
    assert torch.all(out[:, :, 1] == 0) and torch.all(out[0] == 0)


@pytest.mark.parametrize("is_fp8", [False, True])
def test_triton_dense_decode_cache_without_blocks(is_fp8):
    """A cache of no blocks (every length 0): the kernel gets one zero block to point at and reads nothing; out 0,
    lse +inf (the op sent this case to the reference before stop 46)."""
    generator = torch.Generator(DEVICE).manual_seed(71 + is_fp8)
    q, cache, _, _ = make_inputs([1], 2, 16, is_fp8, generator)
    q = q.expand(3, -1, -1, -1).contiguous()
    empty = cache[:0]
    out, lse = decode_and_compare(q, empty, torch.zeros(3, 1, dtype=torch.int32, device=DEVICE),
                                  torch.zeros(3, dtype=torch.int32, device=DEVICE), True, is_fp8)
    assert torch.all(out == 0) and torch.all(torch.isposinf(lse))


# ---------------------------------------------------------------- sparse decode


@pytest.mark.parametrize("topk,extra_topk", [(1, 0), (5, 0), (1, 4), (5, 5)])
@pytest.mark.parametrize("is_fp8", [False, True])
def test_triton_sparse_decode_topk_1_and_5(topk, extra_topk, is_fp8):
    """topk 1 and 5 (one key tile, mostly masked), with topk_length (0 for a sequence), alone and with an extra cache
    of 4 or 5 indices (lengths 1 and 2) and the sink."""
    run_decode(3, 2, 16, topk, extra_topk, True, is_fp8, sink=extra_topk > 0)


@pytest.mark.parametrize("h_q", [1, 3, 17, 65])
@pytest.mark.parametrize("is_fp8", [False, True])
def test_triton_sparse_decode_head_counts_off_the_head_tiles(h_q, is_fp8):
    """h_q 1, 3, 17 and 65 with the sink: the last head tile runs past h_q (65: two 64-head tiles); on the interpreter
    up to 64 heads split over two programs and combined."""
    run_decode(1, 2, h_q, 200, 0, True, is_fp8, sink=True)


@pytest.mark.parametrize("with_extra", [False, True])
@pytest.mark.parametrize("is_fp8", [False, True])
def test_triton_sparse_decode_all_indices_minus_one_with_sink(with_extra, is_fp8):
    """Every index -1 (and every extra index): out exactly 0 and lse +inf for every query, the sink notwithstanding,
    one query split over several programs."""
    generator = torch.Generator(DEVICE).manual_seed(31 + 2 * with_extra + is_fp8)
    q, cache, _ = sparse_decode_inputs(1, 1, 16, 1, is_fp8, generator)
    indices = torch.full((1, 1, 200), -1, dtype=torch.int32, device=DEVICE)
    extra = (None, None, None)
    if with_extra:
        extra = (paged_cache(2, is_fp8, generator, pad=0), torch.full((1, 1, 30), -1, dtype=torch.int32,
                                                                      device=DEVICE), None)
    attn_sink = torch.randn(16, generator=generator, device=DEVICE)
    out, lse = sparse_decode_and_compare(q, cache, indices, None, *extra, KV_LORA_RANK, SCALE, is_fp8, attn_sink)
    assert torch.all(out == 0) and torch.all(torch.isposinf(lse))


@pytest.mark.parametrize("is_fp8", [False, True])
def test_triton_sparse_decode_all_duplicate_indices(is_fp8):
    """Every entry of a query's list the same slot (one slot per sequence): each copy counts, so out is that key's
    latent and lse its logit plus log(count); 130 copies (split over programs) and 7 within topk_length."""
    generator = torch.Generator(DEVICE).manual_seed(41 + is_fp8)
    q, cache, _ = sparse_decode_inputs(2, 1, 16, 1, is_fp8, generator)
    slots = torch.randint(0, 3 * PAGE_BLOCK_SIZE, (2, 1, 1), generator=generator, device=DEVICE, dtype=torch.int32)
    topk_length = torch.tensor([130, 7], dtype=torch.int32, device=DEVICE)
    sparse_decode_and_compare(q, cache, slots.expand(2, 1, 130).contiguous(), topk_length, None, None, None,
                              KV_LORA_RANK, SCALE, is_fp8)


def out_of_range(indices, num_slots, generator):
    """`indices` with each -1 replaced by an index that names no slot of a `num_slots` cache: num_slots, a block past
    it, 2**31 - 1, -2 or -2**31."""
    garbage = torch.tensor([num_slots, num_slots + PAGE_BLOCK_SIZE, INT32_MAX, -2, -2 ** 31], dtype=torch.int32,
                           device=DEVICE)
    pick = torch.randint(0, len(garbage), indices.shape, generator=generator, device=DEVICE)
    return torch.where(indices == -1, garbage[pick], indices)


@pytest.mark.parametrize("is_fp8", [False, True])
def test_triton_sparse_decode_out_of_range_indices_are_no_token(is_fp8):
    """Indices >= the cache's slots (the extra cache's: also slots of the larger main cache), 2**31 - 1 and < -1 where
    the lists hold -1, in the main and the extra cache, split over programs: no token, the same out and lse bit for
    bit as with -1 there (that call against the reference)."""
    generator = torch.Generator(DEVICE).manual_seed(51 + is_fp8)
    q, cache, indices = sparse_decode_inputs(2, 1, 16, 150, is_fp8, generator)
    extra_cache = paged_cache(2, is_fp8, generator, pad=0)
    extra_indices = random_indices((2, 1, 40), 2 * PAGE_BLOCK_SIZE, generator, 0.3)
    topk_length = torch.tensor([150, 77], dtype=torch.int32, device=DEVICE)
    extra_topk_length = torch.tensor([40, 3], dtype=torch.int32, device=DEVICE)
    attn_sink = torch.randn(16, generator=generator, device=DEVICE)
    tail = (KV_LORA_RANK, SCALE, is_fp8, attn_sink)
    out, lse = sparse_decode_and_compare(q, cache, indices, topk_length, extra_cache, extra_indices, extra_topk_length,
                                         *tail)
    bad_indices = out_of_range(indices, 3 * PAGE_BLOCK_SIZE, generator)
    bad_extra_indices = out_of_range(extra_indices, 2 * PAGE_BLOCK_SIZE, generator)
    assert (bad_indices < -1).any() and (bad_extra_indices == INT32_MAX).any()
    bad_out, bad_lse = poisoned(triton_sparse.sparse_decode, q, cache, bad_indices, topk_length, extra_cache,
                                bad_extra_indices, extra_topk_length, *tail)
    assert torch.equal(bad_out, out) and torch.equal(bad_lse, lse)


@pytest.mark.parametrize("lengths", ["zero", "negative", "above_topk"])
@pytest.mark.parametrize("with_extra", [False, True])
@pytest.mark.parametrize("is_fp8", [False, True])
def test_triton_sparse_decode_topk_length_zero_and_above_topk(lengths, with_extra, is_fp8):
    """topk_length (and extra_topk_length) 0 or negative (-1, -2**31: no count from the end) for every sequence: every
    query empty, out 0 and lse +inf with the sink; above topk (topk + 1, 2**31 - 1): the whole list counts."""
    generator = torch.Generator(DEVICE).manual_seed(61 + 4 * (lengths == "zero") + 2 * with_extra + is_fp8)
    q, cache, indices = sparse_decode_inputs(2, 1, 16, 100, is_fp8, generator)
    length_of = {"zero": lambda topk: [0, 0], "negative": lambda topk: [-1, -INT32_MAX - 1],
                 "above_topk": lambda topk: [topk + 1, INT32_MAX]}[lengths]
    topk_length = torch.tensor(length_of(100), dtype=torch.int32, device=DEVICE)
    extra = (None, None, None)
    if with_extra:
        extra = (paged_cache(2, is_fp8, generator, pad=0),
                 random_indices((2, 1, 20), 2 * PAGE_BLOCK_SIZE, generator, 0.1),
                 torch.tensor(length_of(20), dtype=torch.int32, device=DEVICE))
    attn_sink = torch.randn(16, generator=generator, device=DEVICE)
    out, lse = sparse_decode_and_compare(q, cache, indices, topk_length, *extra, KV_LORA_RANK, SCALE, is_fp8,
                                         attn_sink)
    if lengths != "above_topk":
        assert torch.all(out == 0) and torch.all(torch.isposinf(lse))


@pytest.mark.parametrize("is_fp8", [False, True])
def test_triton_sparse_decode_extra_topk_length_zero(is_fp8):
    """An extra cache whose extra_topk_length is 0 for every sequence: only the main keys count (on the interpreter
    the second of two splits holds the extra tiles alone and sees nothing); one sequence's topk_length 0 too, so it
    sees nothing at all."""
    generator = torch.Generator(DEVICE).manual_seed(71 + is_fp8)
    q, cache, indices = sparse_decode_inputs(2, 1, 16, 130, is_fp8, generator)
    extra_cache = paged_cache(2, is_fp8, generator, pad=0)
    extra_indices = random_indices((2, 1, 100), 2 * PAGE_BLOCK_SIZE, generator, 0.1)
    topk_length = torch.tensor([130, 0], dtype=torch.int32, device=DEVICE)
    extra_topk_length = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    attn_sink = torch.randn(16, generator=generator, device=DEVICE)
    out, lse = sparse_decode_and_compare(q, cache, indices, topk_length, extra_cache, extra_indices, extra_topk_length,
                                         KV_LORA_RANK, SCALE, is_fp8, attn_sink)
    assert torch.all(out[1] == 0) and torch.all(torch.isposinf(lse[1]))


@pytest.mark.parametrize("is_fp8", [False, True])
def test_triton_sparse_decode_split_starting_among_the_extra_tiles(is_fp8):
    """One main key tile and three extra ones, split over programs (two on the interpreter's 4 SMs, four on a GPU):
    a split that starts past the extra cache's first tile reads the extra keys from its own first tile on (from the
    extra cache's first, it counted tiles twice). Query (0, 0) sees nothing, with sinks of -inf and +inf too."""
    generator = torch.Generator(DEVICE).manual_seed(75 + is_fp8)
    q, cache, indices = sparse_decode_inputs(1, 2, 16, PAGE_BLOCK_SIZE, is_fp8, generator)
    extra_cache = paged_cache(3, is_fp8, generator, pad=0)
    extra_indices = random_indices((1, 2, 3 * PAGE_BLOCK_SIZE - 2), 3 * PAGE_BLOCK_SIZE, generator, 0.1)
    multiprocessors, _ = triton_sparse.device_limits(q.device)
    splits = triton_sparse.num_splits_for(2, 4, multiprocessors)  # 2 programs (queries) of 16 heads, 4 key tiles
    assert any(split * -(-4 // splits) > 1 for split in range(splits))  # a split's first tile past the main one
    sparse_decode_and_compare(q, cache, indices, None, extra_cache, extra_indices, None, KV_LORA_RANK, SCALE, is_fp8,
                              sinks(16, generator))


# ---------------------------------------------------------------- sparse prefill


@pytest.mark.parametrize("topk", [1, 5, 70])
@pytest.mark.parametrize("with_topk_length", [False, True])
def test_triton_sparse_prefill_topk_1_5_70(topk, with_topk_length):
    """topk 1 and 5 (one mostly masked key tile) and 70 (a second, nearly empty one), with the sink and the indexer
    LSE over the first half of the list."""
    run_prefill([5, 3], 16, topk, (topk + 1) // 2, with_topk_length, True)


@pytest.mark.parametrize("h_q", [1, 3, 17])
def test_triton_sparse_prefill_head_counts_with_sink(h_q):
    """h_q 1, 3 and 17 with the sink: the last head tile runs past h_q."""
    run_prefill([5, 3], h_q, 40, 16, True, True)


@pytest.mark.parametrize("with_sink", [False, True])
def test_triton_sparse_prefill_all_indices_past_kv(with_sink):
    """Every index >= s_kv (s_kv, s_kv + 1, 2**31 - 1): every query empty, out 0, lse and the indexer LSE +inf,
    max_logits -inf, the sink notwithstanding (+inf too: sigmoid(lse - sink) would be NaN)."""
    generator = torch.Generator(DEVICE).manual_seed(81 + with_sink)
    q, kv, _, _ = packed_prefill_inputs([5, 3], 16, 70, False, generator)
    past = torch.tensor([8, 9, INT32_MAX], dtype=torch.int32, device=DEVICE)
    indices = past[torch.randint(0, 3, (8, 1, 70), generator=generator, device=DEVICE)]
    attn_sink = sinks(16, generator) if with_sink else None  # -inf and +inf among them
    out, max_logits, lse, lse_indexer = prefill_and_compare(q, kv, indices, 0.05, KV_LORA_RANK, attn_sink, None, 30)
    assert torch.all(out == 0) and torch.all(torch.isposinf(lse)) and torch.all(torch.isneginf(max_logits))
    assert torch.all(torch.isposinf(lse_indexer))


@pytest.mark.parametrize("lengths", ["zero", "negative", "above_topk"])
def test_triton_sparse_prefill_topk_length_zero_and_above_topk(lengths):
    """topk_length 0 or negative (-1, -2**31: no count from the end) for every query: every query empty (out 0, lse
    +inf, max_logits -inf) with the sink; above topk (topk + 1, 2**31 - 1): the whole list counts."""
    generator = torch.Generator(DEVICE).manual_seed(91 + (lengths == "zero"))
    q, kv, indices, _ = packed_prefill_inputs([5, 3], 16, 70, False, generator)
    if lengths == "zero":
        topk_length = torch.zeros(8, dtype=torch.int32, device=DEVICE)
    elif lengths == "negative":
        topk_length = torch.tensor([-1, -INT32_MAX - 1] * 4, dtype=torch.int32, device=DEVICE)
    else:
        topk_length = torch.tensor([71, INT32_MAX] * 4, dtype=torch.int32, device=DEVICE)
    attn_sink = torch.randn(16, generator=generator, device=DEVICE)
    out, max_logits, lse, _ = prefill_and_compare(q, kv, indices, 0.05, KV_LORA_RANK, attn_sink, topk_length, 30)
    if lengths != "above_topk":
        assert torch.all(out == 0) and torch.all(torch.isposinf(lse)) and torch.all(torch.isneginf(max_logits))


@pytest.mark.parametrize("indexer_topk", [71, INT32_MAX])
def test_triton_sparse_prefill_indexer_topk_above_topk(indexer_topk):
    """indexer_topk above topk 70 (71, 2**31 - 1): the indexer LSE over every counted index, the LSE's value."""
    run_prefill([5, 3], 16, 70, indexer_topk, True, True)


def test_triton_launchers_refuse_value_widths_their_kernels_do_not_write():
    """The kernels store 512 value columns whatever the output's width: a launcher given another (the ops never
    do: they send such widths to the reference) wrote past its output (heap corruption) or left columns unset."""
    from flashmla_ops.triton import decode as triton_decode, sparse as triton_sparse

    q = torch.zeros(1, 1, 16, 576, dtype=torch.bfloat16)
    cache = torch.zeros(1, 64, 1, 576, dtype=torch.bfloat16)
    table, lengths = torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="head_dim_v 512"):
        triton_decode.dense_decode(q, cache, table, lengths, 256, 0.1, False, False)
    indices = torch.zeros(1, 1, 64, dtype=torch.int32)
    with pytest.raises(ValueError, match="d_v 512"):
        triton_sparse.sparse_decode(q, cache, indices, None, None, None, None, 576, 0.1, False)
    with pytest.raises(ValueError, match="d_v 512"):
        triton_sparse.sparse_prefill(q[0], cache[0], indices[0], 0.1, d_v=256)
