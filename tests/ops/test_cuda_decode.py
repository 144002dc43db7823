"""The sm_90a CUDA dense decode kernels, BF16 and FP8 cache, against the reference, on Hopper: csrc/dense_decode.cu
("wide", any number of query rows) and csrc/dense_decode_narrow.cu ("narrow", up to 16 query rows), each on the shapes
it takes.

Fresh random inputs per case, outputs poisoned (the allocator's next blocks filled with NaN), LSE compared, lengths
mixed in one batch (0, 1, 63, 64, 65, non-multiples of the page, one long among short), query rows that are not a
multiple of the 64-row tile (h_q 1, 8 x s_q 3, 48 x s_q 2), one to four row tiles, causal s_q 1..4, forced split
counts (1, several, more splits than blocks) and balanced schedules on one and two row tiles, a padded cache block
stride, strided q, repeated runs bit-identical, the op's CUDA-graph capture, and metadata that is not
get_mla_metadata's (any int32 values: no access outside the batch, the blocks or the partial slots).
"""
from collections import Counter

import pytest
import torch
from decode_inputs import (BF16_BAND, DEVICE, GARBAGE_PARTS, GARBAGE_SCHEDULES, GARBAGE_SEQLENS, HOPPER,
                           LSE_TOLERANCE, assert_decode_close, assert_rows_close, bad_table_inputs,
                           check_dense_decode_op_replays_in_cuda_graph, garbage_schedule, huge_and_small_scale_inputs,
                           in_pool, make_inputs, poisoned, quantize_with_varied_scales)

from flashmla_ops import _ext, reference
from flashmla_ops.decode import CUDA_NARROW_ROWS, cuda_num_splits
from flashmla_ops.kv_cache import D_QK, KV_LORA_RANK


pytestmark = [
    pytest.mark.gpu,
    HOPPER,
]

# (seqlens, s_q, h_q)
CASES = [
    ([0, 1, 63, 64, 65, 130], 1, 16),
    ([64, 1, 200], 2, 16),
    ([5, 1000], 1, 64),
    ([129], 2, 128),
    ([3, 513], 4, 16),
    ([77, 300, 2], 3, 8),
    ([1000, 7], 1, 1),
    ([4096] * 8, 1, 16),
    ([1, 16384, 2, 63], 1, 128),
    ([32768], 1, 128),
    ([4096] * 4, 2, 128),
    ([1000, 31, 4097], 4, 64),
    ([1, 2, 3, 129, 257], 2, 8),
    ([5, 64, 65, 1000], 3, 5),
    ([32768, 100], 1, 16),
    ([100, 0, 4097], 4, 4),
    ([0, 0], 1, 16),
    ([300, 65, 1], 2, 48),  # two row tiles, the second half padding
    ([200, 1, 64], 3, 64),  # three row tiles
]


def kernel_cases():
    """Every case on the wide kernel, and those of at most 16 query rows on the narrow one too."""
    for seqlens, s_q, h_q in CASES:
        yield seqlens, s_q, h_q, False
        if s_q * h_q <= CUDA_NARROW_ROWS:
            yield seqlens, s_q, h_q, True


def kernels():
    extension = _ext.kernels("dense_decode", "cuda")
    assert extension is not None, "the CUDA kernels did not build"
    return extension


def run_and_compare(seqlens, s_q, h_q, causal, is_fp8=False, num_splits=None, padded=False, strided_q=False,
                    parts=None, narrow=False, varied_scales=False):
    generator = torch.Generator(DEVICE).manual_seed(len(seqlens) * 1000 + s_q * 10 + h_q + causal + 2 * is_fp8)
    if varied_scales:  # FP8 tile scales that differ by tile and by token (randn's are all alike)
        assert is_fp8 and not padded, "varied_scales builds its own unpadded FP8 cache"
        q, cache, block_table, cache_seqlens = make_inputs(seqlens, s_q, h_q, False, generator)
        cache = quantize_with_varied_scales(cache, generator)
    else:
        q, cache, block_table, cache_seqlens = make_inputs(seqlens, s_q, h_q, is_fp8, generator, padded)
    if strided_q:  # heads spaced out in a wider buffer
        wide = torch.randn(*q.shape[:2], h_q, 2 * D_QK, device=DEVICE).to(torch.bfloat16)
        wide[..., :D_QK] = q
        q = wide[..., :D_QK]
    if num_splits is None:
        num_splits = cuda_num_splits(q.device, q.shape[0], s_q * h_q, block_table.shape[1])
    scale = D_QK ** -0.5
    schedule = (None, None) if parts is None else reference.get_mla_metadata(cache_seqlens, parts)
    out, lse = poisoned(kernels().dense_decode, q, cache, block_table, cache_seqlens, scale, causal, is_fp8,
                        num_splits, *schedule, narrow)
    want_out, want_lse = reference.dense_decode(q, cache, block_table, cache_seqlens, KV_LORA_RANK, scale, causal,
                                                is_fp8)
    assert_decode_close(out, lse, want_out, want_lse)
    again_out, again_lse = kernels().dense_decode(q, cache, block_table, cache_seqlens, scale, causal, is_fp8,
                                                  num_splits, *schedule, narrow)
    assert torch.equal(out, again_out) and torch.equal(lse, again_lse)


def kernel_and_reference(q, cache, block_table, cache_seqlens, scale, is_fp8, narrow, num_splits=1, kernel_cache=None):
    """The kernel's (not causal; over `kernel_cache` if given) and the reference's out and lse."""
    out, lse = poisoned(kernels().dense_decode, q, cache if kernel_cache is None else kernel_cache, block_table,
                        cache_seqlens, scale, False, is_fp8, num_splits, None, None, narrow)
    want_out, want_lse = reference.dense_decode(q, cache, block_table, cache_seqlens, KV_LORA_RANK, scale, False,
                                                is_fp8)
    return out, lse, want_out, want_lse


@pytest.mark.parametrize("seqlens,s_q,h_q,narrow", list(kernel_cases()))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("is_fp8", [False, True])
def test_cuda_dense_decode_matches_reference(seqlens, s_q, h_q, narrow, causal, is_fp8):
    run_and_compare(seqlens, s_q, h_q, causal, is_fp8, narrow=narrow)


# (seqlens, s_q, h_q): prompts continued through the decode path (models.generation.prefill): many causal queries a
# sequence, up to 128 row tiles of one sequence (64 x 128 heads), odd s_q, and a sequence shorter than s_q (its
# first queries see nothing: out 0, lse +inf)
CONTINUATION_CASES = [([700, 130], 37, 16), ([1000], 64, 128), ([20, 500], 33, 16), ([4097], 130, 8)]


@pytest.mark.parametrize("seqlens,s_q,h_q", CONTINUATION_CASES)
@pytest.mark.parametrize("is_fp8", [False, True])
def test_cuda_dense_decode_continued_prompts(seqlens, s_q, h_q, is_fp8):
    run_and_compare(seqlens, s_q, h_q, causal=True, is_fp8=is_fp8)


# (s_q, h_q, narrow): 32 rows on the wide kernel, 16 on each, 128 (two row tiles) on the wide kernel, and 21 and 15
# (not a multiple of the few-splits combine's four rows per CTA)
SPLIT_SHAPES = [(2, 16, False), (2, 8, False), (2, 8, True), (2, 64, False), (3, 7, False), (3, 5, True)]


@pytest.mark.parametrize("num_splits", [1, 2, 7, 64])
@pytest.mark.parametrize("s_q,h_q,narrow", SPLIT_SHAPES)
@pytest.mark.parametrize("is_fp8", [False, True])
def test_cuda_dense_decode_split_counts(num_splits, s_q, h_q, narrow, is_fp8):
    run_and_compare([0, 1, 65, 700, 3000], s_q, h_q, causal=True, is_fp8=is_fp8, num_splits=num_splits,
                    narrow=narrow)


# (seqlens, s_q, h_q, narrow): few query rows over long sequences, each sequence split 33 to 132 ways (cuda_num_splits),
# so that the many-splits combine takes each row in 8 (16 and 15 rows of one sequence), 4 (two or four sequences of
# 16 and 8 rows) and 2 (64 rows) column parts; an empty sequence and a one-token one among them
MANY_SPLIT_SHAPES = [([20000], 1, 16, True), ([20000], 1, 16, False), ([20000], 3, 5, True),
                     ([9000, 20000], 1, 16, True), ([5000, 1, 20000, 0], 1, 8, True), ([20000], 1, 64, False)]


@pytest.mark.parametrize("seqlens,s_q,h_q,narrow", MANY_SPLIT_SHAPES)
@pytest.mark.parametrize("is_fp8", [False, True])
def test_cuda_dense_decode_many_splits_in_column_parts(seqlens, s_q, h_q, narrow, is_fp8):
    multiprocessors = torch.cuda.get_device_properties(DEVICE).multi_processor_count
    rows = len(seqlens) * s_q * h_q
    assert rows * 2 <= multiprocessors, "the combine takes these rows in column parts"
    assert cuda_num_splits(torch.device(DEVICE), len(seqlens), s_q * h_q, -(-max(seqlens) // 64)) >= 16
    run_and_compare(seqlens, s_q, h_q, causal=s_q > 1, is_fp8=is_fp8, narrow=narrow)


@pytest.mark.parametrize("parts", [1, 3, 7, 40, 132])
@pytest.mark.parametrize("s_q,h_q,narrow", SPLIT_SHAPES)
@pytest.mark.parametrize("is_fp8", [False, True])
def test_cuda_dense_decode_balanced_schedule(parts, s_q, h_q, narrow, is_fp8):
    """get_mla_metadata's parts: runs spanning several sequences, sequences over several parts (one long among short,
    empty ones), idle parts; sequences with one slot are written straight to the output."""
    run_and_compare([1000, 3, 0, 64, 65, 4097, 1], s_q, h_q, causal=True, is_fp8=is_fp8, parts=parts, narrow=narrow)
    if not narrow:
        run_and_compare([129, 2000], 1, 128, causal=False, is_fp8=is_fp8, parts=parts)


# (lengths the schedule was made for, lengths of the call): sequences that grew (the last of a part, one split over
# parts), shrank (pieces past the new end), emptied and filled
OTHER_LENGTHS = [([70, 1, 300, 5], [200, 1, 400, 130]), ([300, 1, 90, 4097], [30, 200, 500, 4000]),
                 ([1000, 3, 0, 64], [0, 700, 65, 64])]


@pytest.mark.parametrize("made_for,seqlens", OTHER_LENGTHS)
@pytest.mark.parametrize("parts", [1, 3, 40])
@pytest.mark.parametrize("s_q,h_q,narrow", SPLIT_SHAPES)
@pytest.mark.parametrize("is_fp8", [False, True])
def test_cuda_dense_decode_schedule_made_for_other_lengths(made_for, seqlens, parts, s_q, h_q, narrow, is_fp8):
    """get_mla_metadata's schedule for other lengths of the same batch (reused after a write to cache_seqlens that
    its version counter missed; values are not checked on a GPU): each sequence's last piece runs to the sequence's
    end (for_each_piece), so the output is still the reference's, where the blocks past a part's old end_block went
    unread."""
    generator = torch.Generator(DEVICE).manual_seed(len(seqlens) + s_q * 10 + h_q + parts + is_fp8)
    q, cache, block_table, cache_seqlens = make_inputs(seqlens, s_q, h_q, is_fp8, generator)
    schedule = reference.get_mla_metadata(torch.tensor(made_for, dtype=torch.int32, device=DEVICE), parts)
    out, lse = poisoned(kernels().dense_decode, q, cache, block_table, cache_seqlens, D_QK ** -0.5, True, is_fp8, 1,
                        *schedule, narrow)
    assert_decode_close(out, lse, *reference.dense_decode(q, cache, block_table, cache_seqlens, KV_LORA_RANK,
                                                          D_QK ** -0.5, True, is_fp8))


@pytest.mark.parametrize("num_splits", [2, 7, 64])
@pytest.mark.parametrize("is_fp8", [False, True])
def test_cuda_dense_decode_split_partials_keep_rows_beyond_f16_range(num_splits, is_fp8):
    """The wide kernel's split partials are f16 rows, each times a power of two that brings its largest magnitude
    into [2**14, 2**15) (store_output). Sequences whose latent is 2**20 times larger (outputs past f16's 65504) and
    2**-30 times smaller (FP8: 2**-12, its scales' floor; outputs below f16's smallest normal) than the others', their
    queries as much smaller and larger (the logits as the others'): every row within the BF16 band of its own norm,
    and within 2**-8 of it from the unsplit kernel's output (the bf16 rounding of the two; unscaled f16 partials
    would overflow the large rows and flush the small ones)."""
    generator = torch.Generator(DEVICE).manual_seed(57 + num_splits + is_fp8)
    seqlens = [700, 3000, 65, 1000]
    q, cache, block_table, cache_seqlens = make_inputs(seqlens, 1, 64, False, generator)
    sequence_factor = torch.tensor([2.0 ** 20, 1.0, 2.0 ** (-12 if is_fp8 else -30), 1.0], device=DEVICE)
    block_factor = torch.ones(cache.shape[0], device=DEVICE)
    block_factor[block_table.long()] = sequence_factor[:, None]
    cache = (cache.float() * block_factor[:, None, None, None]).bfloat16()
    q = (q.float() / sequence_factor[:, None, None, None]).bfloat16()
    if is_fp8:
        cache = reference.quantize_kv_fp8(cache)
    scale = D_QK ** -0.5
    out, lse, want_out, want_lse = kernel_and_reference(q, cache, block_table, cache_seqlens, scale, is_fp8, False,
                                                        num_splits)
    assert torch.isfinite(out).all()
    assert_rows_close(out, want_out)
    assert torch.allclose(lse, want_lse, rtol=0, atol=LSE_TOLERANCE)
    unsplit, _ = kernels().dense_decode(q, cache, block_table, cache_seqlens, scale, False, is_fp8, 1, None, None,
                                        False)
    row_difference = (out.float() - unsplit.float()).norm(dim=-1) / unsplit.float().norm(dim=-1)
    assert row_difference.max() < 2.0 ** -8, row_difference.max()


@pytest.mark.parametrize("s_q,h_q,narrow", [(1, 128, False), (1, 16, True), (2, 5, True)])
def test_cuda_dense_decode_fp8_scales_that_differ_by_tile_and_token(s_q, h_q, narrow):
    """Each 128-column tile of the latent 2^tile times larger, each token 1/2, 1 or 2 times: a kernel that scaled a
    value by another tile's or another row's scale would be off by 2x or more there. With randn's cache every tile of
    every token gets the same scale, so no other case can tell."""
    run_and_compare([1, 65, 300, 1000], s_q, h_q, causal=True, is_fp8=True, narrow=narrow, varied_scales=True)


@pytest.mark.parametrize("narrow", [False, True])
def test_cuda_dense_decode_fp8_small_weights_next_to_huge_scales(narrow):
    """decode_inputs.huge_and_small_scale_inputs: rows carried by tokens 2**37 below the block's largest scale, and
    rows carried by the huge ones, checked row by row."""
    q, cache, block_table, cache_seqlens, scale = huge_and_small_scale_inputs(torch.Generator(DEVICE).manual_seed(7))
    num_splits = cuda_num_splits(q.device, q.shape[0], q.shape[1] * q.shape[2], block_table.shape[1])
    out, lse, want_out, want_lse = kernel_and_reference(q, cache, block_table, cache_seqlens, scale, True, narrow,
                                                        num_splits)
    assert_decode_close(out, lse, want_out, want_lse)


@pytest.mark.parametrize("narrow", [False, True])
@pytest.mark.parametrize("is_fp8", [False, True])
def test_cuda_dense_decode_query_rows_beyond_f16_range(narrow, is_fp8):
    """Query rows 2**16 times larger (past f16's 65504: a softmax that picks one token) and 2**-20 times smaller (below
    its smallest normal, 2**-14: close to a mean) than the rest, each checked on its own: the narrow FP8 kernel runs on
    f16 operands, which such rows would overflow or flush without its per-row scaling of Q. The large rows' LSE is
    ~6e4, so it is compared relative to itself."""
    generator = torch.Generator(DEVICE).manual_seed(31 + is_fp8)
    q, cache, block_table, cache_seqlens = make_inputs([300, 65, 1000], 1, 16, is_fp8, generator)
    row_factor = torch.ones(16, device=DEVICE)
    row_factor[0::4], row_factor[1::4] = 2.0 ** 16, 2.0 ** -20
    q = (q.float() * row_factor[:, None]).bfloat16()
    out, lse, want_out, want_lse = kernel_and_reference(q, cache, block_table, cache_seqlens, D_QK ** -0.5, is_fp8,
                                                        narrow)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert_rows_close(out, want_out)
    assert torch.allclose(lse, want_lse, rtol=1e-5, atol=LSE_TOLERANCE)


@pytest.mark.parametrize("s_q,h_q,narrow", [(2, 32, False), (2, 8, True)])
@pytest.mark.parametrize("is_fp8", [False, True])
def test_cuda_dense_decode_padded_cache_and_strided_q(s_q, h_q, narrow, is_fp8):
    run_and_compare([77, 300, 1025], s_q, h_q, causal=True, is_fp8=is_fp8, padded=True, strided_q=True, narrow=narrow)


@pytest.mark.parametrize("narrow", [False, True])
@pytest.mark.parametrize("is_fp8", [False, True])
def test_cuda_dense_decode_ignores_what_the_cache_holds_past_the_end(narrow, is_fp8):
    """Rows past each sequence's end hold NaN (a reused cache): the kernel must not let them reach the output."""
    generator = torch.Generator(DEVICE).manual_seed(21 + is_fp8)
    seqlens = [1, 70, 129]
    q, cache, block_table, cache_seqlens = make_inputs(seqlens, 1, 16, is_fp8, generator)
    poisoned = cache.clone()
    nan_row = torch.full((D_QK,), float("nan"), device=DEVICE).to(torch.bfloat16)
    if is_fp8:
        nan_row = reference.quantize_kv_fp8(nan_row.view(1, -1))[0]
    for b, length in enumerate(seqlens):
        for position in range(length, block_table.shape[1] * 64):
            poisoned[block_table[b, position // 64], position % 64, 0] = nan_row
    out, lse, want_out, want_lse = kernel_and_reference(q, cache, block_table, cache_seqlens, D_QK ** -0.5, is_fp8,
                                                        narrow, kernel_cache=poisoned)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert (out.float() - want_out.float()).norm() / want_out.float().norm() < BF16_BAND


@pytest.mark.parametrize("narrow", [False, True])
def test_cuda_dense_decode_empty_batch(narrow):
    q = torch.empty(0, 1, 16, D_QK, dtype=torch.bfloat16, device=DEVICE)
    cache = torch.randn(2, 64, 1, D_QK, device=DEVICE).to(torch.bfloat16)
    out, lse = kernels().dense_decode(q, cache, torch.zeros(0, 1, dtype=torch.int32, device=DEVICE),
                                      torch.zeros(0, dtype=torch.int32, device=DEVICE), 0.1, False, False, 1, None,
                                      None, narrow)
    assert out.shape == (0, 1, 16, KV_LORA_RANK) and lse.shape == (0, 16, 1)


def test_dense_decode_op_uses_cuda_and_captures_in_cuda_graph():
    import flashmla_ops

    assert flashmla_ops.backend("dense_decode", "cuda") == "cuda"
    check_dense_decode_op_replays_in_cuda_graph(12)


def test_dense_decode_op_compiles_with_the_cuda_kernel(cuda_calls):
    generator = torch.Generator(DEVICE).manual_seed(13)
    q, cache, block_table, cache_seqlens = make_inputs([100, 2000], 2, 16, False, generator)

    def step(q, cache, block_table, cache_seqlens):
        return torch.ops.flashmla.dense_decode(q, cache, block_table, cache_seqlens, None, None, KV_LORA_RANK,
                                               D_QK ** -0.5, True, False, None)

    eager = step(q, cache, block_table, cache_seqlens)
    assert cuda_calls == ["dense_decode"]
    cuda_calls.clear()
    compiled = torch.compile(step, fullgraph=True, mode="reduce-overhead")(q, cache, block_table, cache_seqlens)
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])
    assert cuda_calls and set(cuda_calls) == {"dense_decode"}  # the compiled graph runs the CUDA kernel too
    assert_decode_close(*eager, *reference.dense_decode(q, cache, block_table, cache_seqlens, KV_LORA_RANK,
                                                        D_QK ** -0.5, True, False))


def test_flashmla_api_schedule_follows_lengths_in_a_cuda_graph(cuda_calls):
    """The FlashMLA API's schedule, warmed up eagerly, then captured: the graph must recompute it, or a sequence that
    grows between replays would lose the blocks past its old schedule (the CUDA kernel follows the metadata)."""
    import flashmla_ops

    generator = torch.Generator(DEVICE).manual_seed(14)
    q, cache, block_table, cache_seqlens = make_inputs([300, 20, 129], 1, 16, False, generator)
    cache_seqlens.copy_(torch.tensor([300, 20, 129], device=DEVICE))
    sched_meta, _ = flashmla_ops.get_mla_metadata()
    flashmla_ops.flash_mla_with_kvcache(q, cache, block_table, cache_seqlens, KV_LORA_RANK, sched_meta)  # eager
    cuda_calls.clear()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = flashmla_ops.flash_mla_with_kvcache(q, cache, block_table, cache_seqlens, KV_LORA_RANK, sched_meta)
    assert "dense_decode" in cuda_calls and "get_mla_metadata" in cuda_calls  # the CUDA kernels were captured
    cache_seqlens.copy_(torch.tensor([300, 80, 129], device=DEVICE))
    graph.replay()
    torch.cuda.synchronize()
    want_out, want_lse = reference.dense_decode(q, cache, block_table, cache_seqlens, KV_LORA_RANK, D_QK ** -0.5,
                                                False, False)
    assert_decode_close(out, lse, want_out, want_lse)


def test_flashmla_api_schedule_reused_after_an_untracked_length_write(monkeypatch, cuda_calls):
    """A write to cache_seqlens that its version counter misses (through `.data`) leaves the API's schedule in place
    (nothing tells without a host sync): the CUDA kernel follows it, and a sequence that grew past its old schedule's
    blocks must still see them."""
    import flashmla_ops

    monkeypatch.delenv("FLASHMLA_CHECK", raising=False)
    generator = torch.Generator(DEVICE).manual_seed(15)
    q, cache, block_table, cache_seqlens = make_inputs([300, 20, 129], 1, 16, False, generator)
    cache_seqlens.copy_(torch.tensor([100, 20, 64], device=DEVICE))
    sched_meta, _ = flashmla_ops.get_mla_metadata()
    flashmla_ops.flash_mla_with_kvcache(q, cache, block_table, cache_seqlens, KV_LORA_RANK, sched_meta)
    cache_seqlens.data.copy_(torch.tensor([300, 20, 129], device=DEVICE))
    cuda_calls.clear()
    out, lse = flashmla_ops.flash_mla_with_kvcache(q, cache, block_table, cache_seqlens, KV_LORA_RANK, sched_meta)
    assert cuda_calls == ["dense_decode"]  # the schedule made for the old lengths, reused
    assert_decode_close(out, lse, *reference.dense_decode(q, cache, block_table, cache_seqlens, KV_LORA_RANK,
                                                          D_QK ** -0.5, False, False))


@pytest.mark.parametrize("is_fp8", [False, True])
def test_dense_decode_op_takes_strided_block_table_and_lengths(cuda_calls, is_fp8):
    """A block table with non-unit column stride and strided cache_seqlens reach the kernel as contiguous copies."""
    generator = torch.Generator(DEVICE).manual_seed(21 + is_fp8)
    q, cache, block_table, cache_seqlens = make_inputs([300, 1, 129], 1, 16, is_fp8, generator)
    strided_table = block_table.t().contiguous().t()
    strided_lengths = torch.stack([cache_seqlens, cache_seqlens], 1)[:, 0]
    assert strided_table.stride(-1) != 1 and not strided_lengths.is_contiguous()
    out, lse = torch.ops.flashmla.dense_decode(q, cache, strided_table, strided_lengths, None, None, KV_LORA_RANK,
                                               D_QK ** -0.5, False, is_fp8, None)
    assert cuda_calls == ["dense_decode"]
    want_out, want_lse = reference.dense_decode(q, cache, block_table, cache_seqlens, KV_LORA_RANK, D_QK ** -0.5,
                                                False, is_fp8)
    assert_decode_close(out, lse, want_out, want_lse)


@pytest.mark.parametrize("s_q,h_q", [(1, 16), (1, 64), (2, 32), (1, 128), (3, 5)])
@pytest.mark.parametrize("is_fp8", [False, True])
def test_dense_decode_op_takes_broadcast_q(cuda_calls, s_q, h_q, is_fp8):
    """q with zero strides (one query's rows expanded over the batch, one head over the heads: what `expand` gives,
    as a caller scoring one query against several caches would pass), on the narrow kernel (16 rows), the wide one
    with q by TMA (64 and 128 heads of one query; 2 x 32: a box of two queries) and not (3 x 5): the kernels read the
    rows the strides name, as the reference does."""
    generator = torch.Generator(DEVICE).manual_seed(61 + s_q * h_q + is_fp8)
    q, cache, block_table, cache_seqlens = make_inputs([300, 1, 129, 64], s_q, h_q, is_fp8, generator)
    heads = q[:1, :, :1].expand_as(q)  # batch and head strides 0
    sequences = q[:1].expand_as(q)  # batch stride 0
    for broadcast in (heads, sequences):
        assert broadcast.stride(0) == 0
        out, lse = torch.ops.flashmla.dense_decode(broadcast, cache, block_table, cache_seqlens, None, None,
                                                   KV_LORA_RANK, D_QK ** -0.5, s_q > 1, is_fp8, None)
        want_out, want_lse = reference.dense_decode(broadcast.contiguous(), cache, block_table, cache_seqlens,
                                                    KV_LORA_RANK, D_QK ** -0.5, s_q > 1, is_fp8)
        assert_decode_close(out, lse, want_out, want_lse)
    assert cuda_calls == ["dense_decode"] * 2


@pytest.mark.parametrize("is_fp8", [False, True])
def test_dense_decode_one_column_block_table_transposed(cuda_calls, is_fp8):
    """Sequences of one block each with the table a transposed (1, batch) tensor: its column of size 1 has stride
    batch, and `.contiguous()` would hand it over unchanged (size-1 dimensions count as contiguous); the kernel wants
    unit stride and gets a copy."""
    generator = torch.Generator(DEVICE).manual_seed(31 + is_fp8)
    q, cache, block_table, cache_seqlens = make_inputs([64, 1, 40], 1, 16, is_fp8, generator)
    one_column = block_table[:, :1].t().contiguous().t()
    assert one_column.stride(-1) == 3 and one_column.is_contiguous()
    out, lse = torch.ops.flashmla.dense_decode(q, cache, one_column, cache_seqlens, None, None, KV_LORA_RANK,
                                               D_QK ** -0.5, False, is_fp8, None)
    assert cuda_calls == ["dense_decode"]
    want_out, want_lse = reference.dense_decode(q, cache, block_table, cache_seqlens, KV_LORA_RANK, D_QK ** -0.5,
                                                False, is_fp8)
    assert_decode_close(out, lse, want_out, want_lse)


@pytest.mark.parametrize("h_q,narrow", [(16, True), (16, False), (64, False)])
@pytest.mark.parametrize("schedule", ["1 split", "3 splits", "balanced"])
@pytest.mark.parametrize("is_fp8", [False, True])
def test_dense_decode_never_reads_past_the_cache_or_the_table(h_q, narrow, schedule, is_fp8):
    """Block-table entries outside the cache and a length past the table's row (unchecked on a GPU without
    FLASHMLA_CHECK): each kernel reads page 0 for the first and cuts the second at the table's capacity, as the
    Triton kernel does, never the memory after the cache (a pool's next block, 100 times larger) or the next row."""
    generator = torch.Generator(DEVICE).manual_seed(29 + h_q + is_fp8)
    (q, cache, block_table, cache_seqlens), (valid_table, valid_seqlens) = bad_table_inputs(is_fp8, generator, h_q)
    num_splits = 3 if schedule == "3 splits" else 1
    metadata = reference.get_mla_metadata(cache_seqlens, 4) if schedule == "balanced" else (None, None)
    out, lse = poisoned(kernels().dense_decode, q, cache, block_table, cache_seqlens, D_QK ** -0.5, False, is_fp8,
                        num_splits, *metadata, narrow)
    assert_decode_close(out, lse, *reference.dense_decode(q, cache, valid_table, valid_seqlens, KV_LORA_RANK,
                                                          D_QK ** -0.5, False, is_fp8))


def test_dense_decode_op_without_checks_reads_no_bad_page(monkeypatch, cuda_calls):
    """The op on the GPU without FLASHMLA_CHECK takes such a table to its CUDA kernel (no host sync to look at it)."""
    monkeypatch.delenv("FLASHMLA_CHECK", raising=False)
    (q, cache, block_table, cache_seqlens), (valid_table, valid_seqlens) = bad_table_inputs(
        False, torch.Generator(DEVICE).manual_seed(31), 128)
    out, lse = torch.ops.flashmla.dense_decode(q, cache, block_table, cache_seqlens, None, None, KV_LORA_RANK,
                                               D_QK ** -0.5, False, False, None)
    assert "dense_decode" in cuda_calls
    assert_decode_close(out, lse, *reference.dense_decode(q, cache, valid_table, valid_seqlens, KV_LORA_RANK,
                                                          D_QK ** -0.5, False, False))


GUARD_BYTE = 0xFF  # NaN in each float type the kernels read (bf16, f16, float32): a read of a guard shows as NaN


def between_guards(call, *num_bytes):
    """call()'s tensors (copied out), run with each of its allocations of one of `num_bytes` bytes in a zeroed hole
    between two live blocks of GUARD_BYTE bytes: in a private memory pool the caching allocator splits blocks off a
    segment in order, and takes the smallest free block that fits (sizes rounded to 512 bytes), the hole of that size.
    So the outputs and the partial workspace (internal to the extension) each lie between guards: a write past either
    end of one lands in a guard, and a read there gives NaN where every byte the call may read is otherwise finite
    (the holes' zeros or what the call wrote). Asserts that every guard byte is kept and, from the allocator's trace,
    that each of the call's allocations (the workspace too) did land in a hole."""
    sizes = Counter(-(-size // 512) * 512 for size in num_bytes)
    pool = torch.cuda.MemPool()
    with torch.cuda.use_mem_pool(pool):
        guards, holes = [], []
        for size, count in sorted(sizes.items(), reverse=True):
            for _ in range(count + 1):
                guards.append(torch.full((size,), GUARD_BYTE, dtype=torch.uint8, device=DEVICE))
                holes.append(torch.zeros(size, dtype=torch.uint8, device=DEVICE))
            guards.append(torch.full((size,), GUARD_BYTE, dtype=torch.uint8, device=DEVICE))
        spans = [(hole.data_ptr(), hole.data_ptr() + hole.numel()) for hole in holes]
        del holes
        torch.cuda.synchronize()
        torch.cuda.memory._record_memory_history("all", context="alloc", stacks="python", clear_history=True)
        try:
            outputs = call()
            torch.cuda.synchronize()  # an illegal address shows here
            trace = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
        finally:
            torch.cuda.memory._record_memory_history(None)
    kept = [bool((guard == GUARD_BYTE).all()) for guard in guards]
    assert all(kept), f"{kept.count(False)} of {len(kept)} guards written"
    allocations = [(entry["addr"], entry["size"]) for entry in trace if entry["action"] == "alloc"]
    assert len(allocations) == len(num_bytes), f"{len(allocations)} allocations, {len(num_bytes)} expected"
    assert all(any(start <= addr and addr + size <= end for start, end in spans) for addr, size in allocations), \
        "an allocation missed the holes"
    copies = [t.clone() for t in outputs]
    del outputs, guards
    return copies


def balanced_allocations(batch, s_q, h_q, parts, narrow):
    """The bytes of run_decode's allocations for a balanced schedule (csrc/dense_decode.cu): out, lse, the partial
    rows (float32 for the narrow kernel, f16 for the wide) and their LSEs (and the wide kernel's scales)."""
    rows, slots = s_q * h_q, batch + parts
    return (batch * rows * KV_LORA_RANK * 2, batch * rows * 4, slots * rows * KV_LORA_RANK * (4 if narrow else 2),
            (1 if narrow else 2) * slots * rows * 4)


# (s_q, h_q, narrow): the narrow kernel; the wide one on one row tile (attend_pairs' early refills) and on four
GARBAGE_SHAPES = [(1, 16, True), (1, 16, False), (1, 64, False), (2, 128, False)]


@pytest.mark.parametrize("name", list(GARBAGE_SCHEDULES))
@pytest.mark.parametrize("s_q,h_q,narrow", GARBAGE_SHAPES)
@pytest.mark.parametrize("is_fp8", [False, True])
def test_cuda_dense_decode_stays_in_bounds_whatever_the_metadata(name, s_q, h_q, narrow, is_fp8):
    """Metadata that is not get_mla_metadata's pair for the batch (GARBAGE_SCHEDULES: sequences, blocks and slots
    before and past their ends, slot counts of 0 and below, int32's extremes, halves of two calls, random values;
    unchecked on a GPU without FLASHMLA_CHECK): for_each_piece and combine_slots cut each value to the batch, the
    sequence's blocks and the launch's partial slots, so the output may be wrong but the launch ends, with no illegal
    address, and reads and writes nothing outside its outputs and workspace (each between guards: `between_guards`;
    a read of a guard makes out NaN) or into its inputs (the table, lengths, metadata and num_splits in pools). The
    same kernels then give the reference's output with get_mla_metadata's schedule."""
    generator = torch.Generator(DEVICE).manual_seed(47 + s_q + h_q + narrow + 2 * is_fp8)
    q, cache, block_table, cache_seqlens = make_inputs(GARBAGE_SEQLENS, s_q, h_q, is_fp8, generator)
    pools, inputs = zip(*(in_pool(t, 8, fill) for t, fill in ((block_table, 1), (cache_seqlens, 10 ** 6),
                                                              *zip(garbage_schedule(name), (-1, 8)))))
    want_pools = [pool.clone() for pool in pools]
    causal = s_q > 1
    out, lse = between_guards(
        lambda: kernels().dense_decode(q, cache, *inputs[:2], D_QK ** -0.5, causal, is_fp8, 1, *inputs[2:], narrow),
        *balanced_allocations(len(GARBAGE_SEQLENS), s_q, h_q, GARBAGE_PARTS, narrow))
    assert all(torch.equal(pool, want) for pool, want in zip(pools, want_pools))
    assert out.shape == (len(GARBAGE_SEQLENS), s_q, h_q, KV_LORA_RANK) and lse.shape == (len(GARBAGE_SEQLENS), h_q, s_q)
    assert not out.isnan().any() and not lse.isnan().any(), "a partial slot read outside the workspace"
    schedule = reference.get_mla_metadata(cache_seqlens, GARBAGE_PARTS)
    assert_decode_close(*kernels().dense_decode(q, cache, block_table, cache_seqlens, D_QK ** -0.5, causal, is_fp8, 1,
                                                *schedule, narrow),
                        *reference.dense_decode(q, cache, block_table, cache_seqlens, KV_LORA_RANK, D_QK ** -0.5,
                                                causal, is_fp8))


@pytest.mark.parametrize("h_q", [16, 64])
def test_dense_decode_op_without_checks_takes_any_metadata(monkeypatch, cuda_calls, h_q):
    """The op on the GPU without FLASHMLA_CHECK takes metadata that is not get_mla_metadata's to its CUDA kernel (no
    host sync to compare them), which runs to its end: int32's extremes in every field."""
    monkeypatch.delenv("FLASHMLA_CHECK", raising=False)
    q, cache, block_table, cache_seqlens = make_inputs(GARBAGE_SEQLENS, 1, h_q, False,
                                                       torch.Generator(DEVICE).manual_seed(53))
    out, lse = torch.ops.flashmla.dense_decode(q, cache, block_table, cache_seqlens,
                                               *garbage_schedule("int32 extremes"), KV_LORA_RANK, D_QK ** -0.5, False,
                                               False, None)
    torch.cuda.synchronize()
    assert cuda_calls == ["dense_decode"]
    assert out.shape == (len(GARBAGE_SEQLENS), 1, h_q, KV_LORA_RANK) and lse.shape == (len(GARBAGE_SEQLENS), h_q, 1)


def test_dense_decode_cache_without_blocks():
    """A cache of no blocks and every length 0: out 0 and lse +inf (the Triton kernel, on a stand-in block, or the
    reference: the CUDA kernel has nothing to map)."""
    q = torch.randn(2, 1, 16, D_QK, device=DEVICE).bfloat16()
    cache = torch.zeros(0, 64, 1, D_QK, dtype=torch.bfloat16, device=DEVICE)
    out, lse = torch.ops.flashmla.dense_decode(q, cache, torch.zeros(2, 1, dtype=torch.int32, device=DEVICE),
                                               torch.zeros(2, dtype=torch.int32, device=DEVICE), None, None,
                                               KV_LORA_RANK, D_QK ** -0.5, False, False, None)
    assert torch.all(out == 0) and torch.all(torch.isposinf(lse))
