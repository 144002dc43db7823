"""The sm_90a sparse decode kernel (csrc/dense_decode.cu, gathering mode) against the reference, on Hopper: BF16 and FP8
caches, -1 and duplicate indices, an all -1 query, topk_length shorter than topk (0 included), topk not a multiple of
64, h_q 16 / 64 / 128 / 5 / 65 / 100 / 192 / 256, s_q 1 and 2, forced split counts, FP8 scales that differ by tile
and token, tokens 2**37 apart in scale, query rows and RoPE columns beyond f16's range; outputs poisoned; repeated
runs identical."""
import pytest
import torch
from decode_inputs import (HOPPER, LSE_TOLERANCE, SCALE, assert_close, assert_rows_close, garbage_schedule,
                           huge_and_small_scale_inputs, paged_cache, poisoned, random_indices, varied_scale_cache)

from flashmla_ops import _ext, reference
from flashmla_ops.decode import cuda_num_splits
from flashmla_ops.kv_cache import D_QK, KV_LORA_RANK, PAGE_BLOCK_SIZE

DEVICE = "cuda"
pytestmark = [
    pytest.mark.gpu,
    HOPPER,
]

# (batch, s_q, h_q, topk, with_topk_length)
CASES = [(batch, s_q, h_q, topk, with_length)
         for h_q in (16, 64, 128) for s_q in (1, 2)
         for batch, topk, with_length in ((2, 64, False), (3, 1000, True), (16, 2048, False), (1, 2048, True))]
CASES += [(3, 1, 5, 130, True), (2, 2, 128, 70, True)]
# h_q past 128: three and four 64-head row blocks of one query
CASES += [(2, 1, 256, 300, True), (2, 2, 192, 130, False)]
# two 64-head row blocks of one query, the second partly past h_q
CASES += [(3, 1, 100, 700, True), (2, 2, 65, 130, False)]
# prompts continued through the decode path (models.generation.prefill): many queries a sequence
CASES += [(1, 37, 16, 300, True), (2, 64, 128, 2048, False)]


def run(batch, s_q, h_q, topk, with_topk_length, is_fp8, num_splits=None, varied_scales=False):
    generator = torch.Generator(DEVICE).manual_seed(batch * 7919 + s_q * 131 + h_q * 17 + topk + is_fp8)
    num_blocks = max(2, batch * topk // PAGE_BLOCK_SIZE)
    if varied_scales:
        assert is_fp8
        cache = varied_scale_cache(num_blocks, generator)
    else:
        cache = paged_cache(num_blocks, is_fp8, generator, pad=32)
    q = torch.randn(batch, s_q, h_q, D_QK, generator=generator, device=DEVICE).to(torch.bfloat16)
    indices = random_indices((batch, s_q, topk), num_blocks * PAGE_BLOCK_SIZE, generator)
    topk_length = None
    if with_topk_length:
        topk_length = torch.randint(0, topk + 1, (batch,), generator=generator, device=DEVICE, dtype=torch.int32)
        topk_length[-1] = topk // 2 + 1
        if batch > 1:
            topk_length[0] = 0
    if num_splits is None:
        num_splits = cuda_num_splits(q.device, batch * s_q, h_q, -(-topk // PAGE_BLOCK_SIZE))
    extension = _ext.kernels("sparse_decode", DEVICE)
    assert extension is not None
    out, lse, want_out, want_lse = kernel_and_reference(q, cache, indices, SCALE, topk_length, is_fp8, num_splits)
    assert_close(out, lse, want_out, want_lse)
    assert torch.all(out[0, 0] == 0) and torch.all(torch.isposinf(lse[0, :, 0]))  # the all -1 query
    again = extension.sparse_decode(q, cache, indices, topk_length, SCALE, is_fp8, num_splits)
    assert torch.equal(out, again[0]) and torch.equal(lse, again[1])


@pytest.mark.parametrize("batch,s_q,h_q,topk,with_topk_length", CASES)
@pytest.mark.parametrize("is_fp8", [False, True])
def test_cuda_sparse_decode_matches_reference(batch, s_q, h_q, topk, with_topk_length, is_fp8):
    run(batch, s_q, h_q, topk, with_topk_length, is_fp8)


@pytest.mark.parametrize("num_splits", [1, 3, 40])
@pytest.mark.parametrize("is_fp8", [False, True])
@pytest.mark.parametrize("h_q", [64, 128])
def test_cuda_sparse_decode_split_counts(num_splits, is_fp8, h_q):
    run(2, 2, h_q, 1000, True, is_fp8, num_splits)


@pytest.mark.parametrize("batch,s_q,h_q,topk", [(2, 1, 128, 2048), (3, 2, 64, 300), (4, 1, 16, 130)])
def test_cuda_sparse_decode_fp8_scales_that_differ_by_tile_and_token(batch, s_q, h_q, topk):
    """A kernel that scaled a value by another tile's or another row's scale would be off by 2x or more here."""
    run(batch, s_q, h_q, topk, False, True, varied_scales=True)


def every_token(block_table, cache_seqlens, topk):
    """Indices (batch, 1, topk) of each sequence's tokens in its paged cache, -1 past its length."""
    positions = torch.arange(topk, device=DEVICE)
    slots = block_table.long().gather(1, (positions // PAGE_BLOCK_SIZE).expand(len(block_table), -1).clamp_max(
        block_table.shape[1] - 1)) * PAGE_BLOCK_SIZE + positions % PAGE_BLOCK_SIZE
    return torch.where(positions < cache_seqlens[:, None], slots, -1).int()[:, None]


def kernel_and_reference(q, cache, indices, scale, topk_length=None, is_fp8=True, num_splits=None):
    """The kernel's and the reference's out and lse (num_splits: the op's rule unless given)."""
    if num_splits is None:
        num_splits = cuda_num_splits(q.device, q.shape[0] * q.shape[1], q.shape[2],
                                     -(-indices.shape[-1] // PAGE_BLOCK_SIZE))
    out, lse = poisoned(_ext.kernels("sparse_decode", DEVICE).sparse_decode, q, cache, indices, topk_length, scale,
                        is_fp8, num_splits)
    want_out, want_lse = reference.sparse_decode(q, cache, indices, topk_length, None, None, None, KV_LORA_RANK, scale,
                                                 is_fp8)
    return out, lse, want_out, want_lse


@pytest.mark.parametrize("h_q", [16, 128])
def test_cuda_sparse_decode_fp8_small_weights_next_to_huge_scales(h_q):
    """decode_inputs.huge_and_small_scale_inputs over every token: rows carried by tokens 2**37 below the block's
    largest scale, and rows carried by the huge ones, checked row by row (a kernel that applied the scales in a
    narrower type than float32, or relative to the block rather than the token, would lose the small rows)."""
    q, cache, block_table, cache_seqlens, scale = huge_and_small_scale_inputs(torch.Generator(DEVICE).manual_seed(8),
                                                                              h_q)
    indices = every_token(block_table, cache_seqlens, 320)
    out, lse, want_out, want_lse = kernel_and_reference(q, cache, indices, scale)
    assert_close(out, lse, want_out, want_lse)


def test_cuda_sparse_decode_fp8_query_rows_and_rope_beyond_f16_range():
    """Query rows 2**16 and 2**-20 times the rest, and tokens whose latent is ~2**-12 (the smallest tile scale, 2**-13)
    beside RoPE columns ~2**6: as f16 relative to the latent's scale those would be ~2**19, past f16's 65504, a trap
    for a kernel on f16 operands (stop 31 measured one; the kernel takes bf16 operands). Checked row by row; the large
    rows' LSE relative to itself."""
    generator = torch.Generator(DEVICE).manual_seed(9)
    batch, h_q, topk, num_blocks = 4, 64, 512, 40
    cache = torch.randn(num_blocks, PAGE_BLOCK_SIZE, 1, D_QK, generator=generator, device=DEVICE)
    small = torch.rand(num_blocks, PAGE_BLOCK_SIZE, generator=generator, device=DEVICE) < 0.5
    cache[..., :KV_LORA_RANK] *= torch.where(small, 2.0 ** -12, 1.0)[..., None, None]
    cache[..., KV_LORA_RANK:] *= torch.where(small, 2.0 ** 6, 1.0)[..., None, None]
    cache = reference.quantize_kv_fp8(cache.bfloat16())
    q = torch.randn(batch, 1, h_q, D_QK, generator=generator, device=DEVICE)
    row_factor = torch.ones(h_q, device=DEVICE)
    row_factor[0::4], row_factor[1::4] = 2.0 ** 16, 2.0 ** -20
    q = (q * row_factor[:, None]).bfloat16()
    indices = random_indices((batch, 1, topk), num_blocks * PAGE_BLOCK_SIZE, generator)
    out, lse, want_out, want_lse = kernel_and_reference(q, cache, indices, SCALE)
    assert torch.isfinite(out).all() and not torch.isnan(lse).any()
    seen = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), seen)
    assert_rows_close(out[seen.transpose(1, 2)], want_out[seen.transpose(1, 2)])
    assert torch.allclose(lse[seen], want_lse[seen], rtol=1e-5, atol=LSE_TOLERANCE)


def test_sparse_decode_op_uses_cuda():
    import flashmla_ops

    assert flashmla_ops.backend("sparse_decode", "cuda") == "cuda"


@pytest.mark.parametrize("is_fp8", [False, True])
def test_sparse_decode_op_takes_strided_indices_and_lengths(cuda_calls, is_fp8):
    """Index rows with a non-unit stride and a strided topk_length reach the kernel as contiguous copies."""
    generator = torch.Generator(DEVICE).manual_seed(11 + is_fp8)
    batch, s_q, h_q, topk, num_blocks = 3, 2, 64, 300, 16
    cache = paged_cache(num_blocks, is_fp8, generator, pad=0)
    q = torch.randn(batch, s_q, h_q, D_QK, generator=generator, device=DEVICE).to(torch.bfloat16)
    indices = random_indices((batch, s_q, topk), num_blocks * PAGE_BLOCK_SIZE, generator)
    topk_length = torch.tensor([topk, 0, 100], dtype=torch.int32, device=DEVICE)
    strided_indices = indices.transpose(0, 2).contiguous().transpose(0, 2)
    strided_length = torch.stack([topk_length, topk_length], 1)[:, 0]
    assert strided_indices.stride(-1) != 1 and not strided_length.is_contiguous()
    out, lse = torch.ops.flashmla.sparse_decode(q, cache, strided_indices, strided_length, None, None, None, None,
                                                None, KV_LORA_RANK, SCALE, is_fp8, None)
    assert cuda_calls == ["sparse_decode"]
    want_out, want_lse = reference.sparse_decode(q, cache, indices, topk_length, None, None, None, KV_LORA_RANK, SCALE,
                                                 is_fp8)
    assert_close(out, lse, want_out, want_lse)


@pytest.mark.parametrize("h_q", [16, 64, 128])
@pytest.mark.parametrize("is_fp8", [False, True])
def test_sparse_decode_op_takes_broadcast_q(cuda_calls, h_q, is_fp8):
    """q with zero strides (one query's heads expanded over the batch and the queries, and one head over all), as
    `expand` gives: the kernel (q by TMA, 64 heads a box) reads the rows the strides name, as the reference does."""
    generator = torch.Generator(DEVICE).manual_seed(71 + h_q + is_fp8)
    batch, s_q, topk, num_blocks = 3, 2, 300, 16
    cache = paged_cache(num_blocks, is_fp8, generator, pad=0)
    q = torch.randn(1, 1, h_q, D_QK, generator=generator, device=DEVICE).to(torch.bfloat16)
    indices = random_indices((batch, s_q, topk), num_blocks * PAGE_BLOCK_SIZE, generator)
    for broadcast in (q.expand(batch, s_q, h_q, D_QK), q[:, :, :1].expand(batch, s_q, h_q, D_QK)):
        out, lse = torch.ops.flashmla.sparse_decode(broadcast, cache, indices, None, None, None, None, None, None,
                                                    KV_LORA_RANK, SCALE, is_fp8, None)
        want_out, want_lse = reference.sparse_decode(broadcast.contiguous(), cache, indices, None, None, None, None,
                                                     KV_LORA_RANK, SCALE, is_fp8)
        assert_close(out, lse, want_out, want_lse)
    assert cuda_calls == ["sparse_decode"] * 2


def test_sparse_decode_op_takes_transposed_indices_of_topk_1(cuda_calls):
    """topk 1 with indices a permuted view: the size-1 last dimension has stride batch * s_q (`.contiguous()` keeps
    it: size-1 dimensions count as contiguous); the kernel wants unit stride and gets a copy."""
    generator = torch.Generator(DEVICE).manual_seed(41)
    batch, s_q, h_q, num_blocks = 3, 2, 64, 4
    cache = paged_cache(num_blocks, True, generator, pad=0)
    q = torch.randn(batch, s_q, h_q, D_QK, generator=generator, device=DEVICE).to(torch.bfloat16)
    indices = random_indices((1, batch, s_q), num_blocks * PAGE_BLOCK_SIZE, generator).permute(1, 2, 0)
    assert indices.shape == (batch, s_q, 1) and indices.stride(-1) == batch * s_q and indices.is_contiguous()
    out, lse = torch.ops.flashmla.sparse_decode(q, cache, indices, None, None, None, None, None, None, KV_LORA_RANK,
                                                SCALE, True, None)
    assert cuda_calls == ["sparse_decode"]
    want_out, want_lse = reference.sparse_decode(q, cache, indices, None, None, None, None, KV_LORA_RANK, SCALE, True)
    assert_close(out, lse, want_out, want_lse)


@pytest.mark.parametrize("name", ["int32 extremes", "random"])
def test_sparse_decode_op_without_checks_ignores_the_metadata(monkeypatch, cuda_calls, name):
    """Sparse decode takes tile_scheduler_metadata and num_splits for FlashMLA's calling convention only: its CUDA
    launch splits each query's indices by shape (for_each_piece's uniform split; the Triton kernels likewise), so
    metadata that is not get_mla_metadata's (int32's extremes, random values; unchecked on a GPU without
    FLASHMLA_CHECK) reaches no kernel, and the output is the reference's."""
    monkeypatch.delenv("FLASHMLA_CHECK", raising=False)
    generator = torch.Generator(DEVICE).manual_seed(59)
    batch, s_q, h_q, topk, num_blocks = 3, 2, 64, 300, 16
    cache = paged_cache(num_blocks, True, generator, pad=0)
    q = torch.randn(batch, s_q, h_q, D_QK, generator=generator, device=DEVICE).to(torch.bfloat16)
    indices = random_indices((batch, s_q, topk), num_blocks * PAGE_BLOCK_SIZE, generator)
    out, lse = torch.ops.flashmla.sparse_decode(q, cache, indices, None, None, None, None,
                                                *garbage_schedule(name, DEVICE), KV_LORA_RANK, SCALE, True, None)
    assert cuda_calls == ["sparse_decode"]
    assert_close(out, lse, *reference.sparse_decode(q, cache, indices, None, None, None, None, KV_LORA_RANK, SCALE,
                                                    True))
