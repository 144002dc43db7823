"""Random paged-decode and sparse-attention inputs and comparisons shared by the kernel tests (Triton and CUDA)."""
import contextlib

import pytest
import torch

from flashmla_ops import reference
from flashmla_ops.kv_cache import D_QK, KV_LORA_RANK, PAGE_BLOCK_SIZE

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BF16_BAND = 1e-2  # relative Frobenius error: bf16 output rounding plus bf16 probabilities in P.V
LSE_TOLERANCE = 1e-3
SCALE = D_QK ** -0.5

# The csrc kernels' GPU: an sm_90 under a CUDA torch (ROCm's reads an MI250, gfx90a, as (9, 0) too)
ON_HOPPER = (torch.cuda.is_available() and torch.version.cuda is not None
             and torch.cuda.get_device_capability() == (9, 0))
HOPPER = pytest.mark.skipif(not ON_HOPPER, reason="needs a Hopper (sm_90) GPU")


def sinks(h_q, generator):
    """Per-head sinks around the logits' LSEs, the first head's -inf (no sink: out unchanged), the second's +inf (out
    0, also for queries that see nothing, where sigmoid(lse - sink) would be NaN)."""
    sink = torch.randn(h_q, generator=generator, device=DEVICE) * 2 + 3
    sink[0], sink[1] = float("-inf"), float("inf")
    return sink


def make_inputs(seqlens, s_q, h_q, is_fp8, generator, padded=False):
    batch = len(seqlens)
    blocks_per_seq = max(1, -(-max(seqlens) // PAGE_BLOCK_SIZE)) + 1  # spare capacity
    num_blocks = batch * blocks_per_seq + 3
    cache = torch.randn(num_blocks, PAGE_BLOCK_SIZE, 1, D_QK, generator=generator, device=DEVICE).to(torch.bfloat16)
    if is_fp8:
        cache = reference.quantize_kv_fp8(cache)
    if padded:  # a cache that is a slice of a wider buffer (block stride > 64 rows, by 64 bytes)
        row = cache.shape[-1]
        buffer = torch.zeros(num_blocks, PAGE_BLOCK_SIZE * row + 64 // cache.element_size(), dtype=cache.dtype,
                             device=DEVICE)
        buffer[:, :PAGE_BLOCK_SIZE * row] = cache.reshape(num_blocks, -1)
        cache = buffer[:, :PAGE_BLOCK_SIZE * row].view(num_blocks, PAGE_BLOCK_SIZE, 1, row)
    block_table = torch.randperm(num_blocks, generator=generator, device=DEVICE)[:batch * blocks_per_seq]
    block_table = block_table.view(batch, blocks_per_seq).int()
    cache_seqlens = torch.tensor(seqlens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(batch, s_q, h_q, D_QK, generator=generator, device=DEVICE).to(torch.bfloat16)
    return q, cache, block_table, cache_seqlens


def spaced(t: torch.Tensor, fill) -> torch.Tensor:
    """`t` as a view whose last dimension has stride 2, `fill` in the gaps (a kernel that reads it as packed reads
    the gaps: wrong values, not out of bounds, for a `fill` that names a real block or length)."""
    wide = torch.full((*t.shape[:-1], 2 * t.shape[-1]), fill, dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def quantize_with_varied_scales(cache, generator):
    """`cache` (blocks, 64, 1, 576) as FP8 whose tile scales differ by tile and by token: each 128-column tile of the
    latent 2^tile times larger, each token 1/2, 1 or 2 times (randn's cache gives every tile of every token the same
    scale, so a kernel that scaled a value by another tile's or another row's scale would go unnoticed)."""
    tile_factor = 2.0 ** torch.arange(KV_LORA_RANK // 128, device=DEVICE).repeat_interleave(128)
    column_factor = torch.cat([tile_factor, torch.ones(D_QK - KV_LORA_RANK, device=DEVICE)])
    token_factor = 2.0 ** torch.randint(-1, 2, cache.shape[:2], generator=generator, device=DEVICE)
    return reference.quantize_kv_fp8((cache.float() * column_factor * token_factor[..., None, None]).bfloat16())


def huge_and_small_scale_inputs(generator, h_q=16):
    """FP8 decode inputs (s_q 1, not causal) whose blocks each hold a few tokens of latent -u * 2**30 (tile scale
    2**24) among tokens of scale 2**-13. Query rows 0 .. h_q/2 - 1 lie along +u: they score the huge tokens some 86
    below the small ones, so the small tokens carry their output, with weights p * scale 2**37 below the huge tokens'
    scale; the other rows lie along -u and take the huge tokens. Returns q, cache, block_table, cache_seqlens and the
    softmax scale. Compare row by row (`assert_rows_close`): the huge rows dwarf the others in a norm over the batch."""
    seqlens = [300, 200]
    q, cache, block_table, cache_seqlens = make_inputs(seqlens, 1, h_q, False, generator)
    direction = torch.randn(KV_LORA_RANK, generator=generator, device=DEVICE)
    huge = torch.rand(cache.shape[:2], generator=generator, device=DEVICE) < 1 / 16
    cache = cache.float()
    cache[..., :KV_LORA_RANK] = torch.where(huge[..., None, None], -direction * 2.0 ** 30,
                                            cache[..., :KV_LORA_RANK] * 2.0 ** -10)
    cache[..., KV_LORA_RANK:] *= (~huge).float()[..., None, None]
    cache = reference.quantize_kv_fp8(cache.bfloat16())
    sign = torch.where(torch.arange(h_q, device=DEVICE) < h_q // 2, 1.0, -1.0)
    q = q.float()
    q[..., :KV_LORA_RANK] = sign[:, None] * direction * 2.0 ** -30
    return q.bfloat16(), cache, block_table, cache_seqlens, D_QK ** -0.5 * 4


def assert_rows_close(out, want_out) -> None:
    """Each output row within the BF16 band of its own norm (tiny rows too); a row the reference has all 0 (an
    infinite sink's) exactly 0. No rows pass: a batch that sees nothing."""
    error = (out.double() - want_out.double()).norm(dim=-1)
    norm = want_out.double().norm(dim=-1)
    assert torch.all(error[norm == 0] == 0), "a row the reference has all 0 is not"
    row_error = error[norm > 0] / norm[norm > 0]
    assert row_error.numel() == 0 or row_error.max() < BF16_BAND, row_error


POISONED_RUNS = 2 if DEVICE == "cuda" else 1  # how many times `poisoned` runs its kernel


@contextlib.contextmanager
def nan_allocations():
    """On the CPU: floating-point tensors from torch.empty, torch.empty_like and Tensor.new_empty hold NaN bytes (0xff)
    inside the block, where the CPU allocator hands out whatever the pages held, often zeros that pass for a written
    0."""
    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty
    own_new_empty = "new_empty" in vars(torch.Tensor)

    def filled(tensor):
        if tensor.is_floating_point():
            tensor.untyped_storage().fill_(255)
        return tensor

    torch.empty = lambda *args, **kwargs: filled(empty(*args, **kwargs))
    torch.empty_like = lambda *args, **kwargs: filled(empty_like(*args, **kwargs))
    torch.Tensor.new_empty = lambda self, *args, **kwargs: filled(new_empty(self, *args, **kwargs))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like
        if own_new_empty:
            torch.Tensor.new_empty = new_empty
        else:
            del torch.Tensor.new_empty


def poisoned(kernel, *args, **kwargs):
    """kernel(*args, **kwargs) with its outputs over memory of NaN bytes (0xff: NaN as bf16, f16 and float32), so that
    an element it does not write shows. On the CPU (Triton's interpreter) its torch.empty and torch.empty_like give
    such memory (nan_allocations). On CUDA the caching allocator hands a request the smallest free block that fits,
    requests up to 1 MiB from a pool of their own: so a first call gives the outputs' allocation sizes, a few blocks of
    exactly each size (the kernel's temporaries may take some) and a large block are filled and freed, and the second
    call's outputs land on them."""
    if DEVICE != "cuda":
        with nan_allocations():
            return kernel(*args, **kwargs)
    sizes = [tensor.untyped_storage().nbytes() for tensor in kernel(*args, **kwargs)
             if isinstance(tensor, torch.Tensor)]
    poison_next_blocks(*(size for size in sizes for _ in range(4)), 16 * sum(sizes) + (1 << 20))
    return kernel(*args, **kwargs)


def poison_next_blocks(*num_bytes: int) -> None:
    """Fills and frees a CUDA block of each size with NaN bytes (0xff), so that the caching allocator hands the next
    requests of those sizes this memory."""
    blocks = [torch.full((size,), 255, dtype=torch.uint8, device="cuda") for size in num_bytes]
    del blocks


def assert_decode_close(out, lse, want_out, want_lse) -> None:
    """A kernel's attention output against the reference: every element written and finite, out within the BF16 band
    (the whole batch's, and each row that sees a token its own: a long sequence's rows, averages of many tokens, are
    small beside a short one's and hardly move the batch's norm), lse +inf exactly where no token is visible (out 0
    there) and close elsewhere. Decode's lse is (batch, h_q, s_q) against out's (batch, s_q, h_q, d_v) rows, sparse
    prefill's (s_q, h_q) against (s_q, h_q, d_v)."""
    assert out.shape == want_out.shape and lse.shape == want_lse.shape
    assert torch.isfinite(out).all()
    # float64: outputs up to bf16's largest values square past float32's range
    error = (out.double() - want_out.double()).norm() / want_out.double().norm().clamp_min(1e-12)
    assert error < BF16_BAND, f"relative error {error:.2e}"
    # +inf exactly for queries that see nothing
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse)) and not torch.isnan(lse).any()
    finite = torch.isfinite(want_lse)
    assert torch.allclose(lse[finite], want_lse[finite], atol=LSE_TOLERANCE, rtol=0), \
        (lse - want_lse)[finite].abs().max()
    seen = finite.transpose(1, 2) if finite.dim() == 3 else finite
    assert torch.all(out[~seen] == 0)
    assert_rows_close(out[seen], want_out[seen])


def check_dense_decode_op_replays_in_cuda_graph(seed: int) -> None:
    """torch.ops.flashmla.dense_decode captured in a CUDA graph, replayed after cache_seqlens changed in place: the
    graph's output matches the reference at the new lengths."""
    generator = torch.Generator(DEVICE).manual_seed(seed)
    q, cache, block_table, cache_seqlens = make_inputs([300, 1000], 1, 16, False, generator)
    args = (q, cache, block_table, cache_seqlens, None, None, KV_LORA_RANK, D_QK ** -0.5, False, False, None)
    torch.ops.flashmla.dense_decode(*args)  # build / compile and warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = torch.ops.flashmla.dense_decode(*args)
    cache_seqlens.copy_(torch.tensor([5, 999], device=DEVICE))  # same graph, new lengths
    graph.replay()
    torch.cuda.synchronize()
    want_out, want_lse = reference.dense_decode(q, cache, block_table, cache_seqlens, KV_LORA_RANK, D_QK ** -0.5,
                                                False, False)
    assert (out.float() - want_out.float()).norm() / want_out.float().norm() < BF16_BAND
    assert torch.allclose(lse, want_lse, atol=LSE_TOLERANCE)


# Sparse attention inputs (the Triton and CUDA sparse tests, the sink and extra-cache tests).


def paged_cache(num_blocks, is_fp8, generator, pad):
    """A random BF16 or FP8 paged cache whose block stride is padded by `pad` elements (a slice of a wider buffer)."""
    cache = torch.randn(num_blocks, PAGE_BLOCK_SIZE, 1, D_QK, generator=generator, device=DEVICE).to(torch.bfloat16)
    if is_fp8:
        cache = reference.quantize_kv_fp8(cache)
    row = cache.shape[-1]
    buffer = torch.zeros(num_blocks, PAGE_BLOCK_SIZE * row + pad, dtype=cache.dtype, device=DEVICE)
    buffer[:, :PAGE_BLOCK_SIZE * row] = cache.reshape(num_blocks, -1)
    return buffer[:, :PAGE_BLOCK_SIZE * row].view(num_blocks, PAGE_BLOCK_SIZE, 1, row)


def random_indices(shape, num_rows, generator, invalid_fraction=0.2):
    """Random rows in [0, num_rows) with -1s and duplicates; the first query's list is all -1."""
    indices = torch.randint(0, num_rows, shape, generator=generator, device=DEVICE, dtype=torch.int32)
    indices[torch.rand(shape, generator=generator, device=DEVICE) < invalid_fraction] = -1
    if shape[-1] > 3:
        indices[..., 1] = indices[..., 3]  # duplicates count twice
    indices.view(-1, shape[-1])[0] = -1
    return indices


def sparse_decode_inputs(batch, s_q, h_q, topk, is_fp8, generator, num_blocks=3, pad=32):
    """q, a cache of `num_blocks` blocks (rows `pad` bytes apart past their end) and random indices into it (-1s,
    duplicates, an all -1 query)."""
    cache = paged_cache(num_blocks, is_fp8, generator, pad=pad)
    q = torch.randn(batch, s_q, h_q, D_QK, generator=generator, device=DEVICE).to(torch.bfloat16)
    return q, cache, random_indices((batch, s_q, topk), num_blocks * PAGE_BLOCK_SIZE, generator)


def assert_close(out, lse, want_out, want_lse):
    """assert_decode_close for the sparse ops, with their dtypes: bf16 out, float32 lse."""
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert_decode_close(out, lse, want_out, want_lse)


def packed_prefill_inputs(seq_lens, h_q, topk, with_topk_length, generator):
    """Sequence j owns rows [start_j, start_j + len_j) of q and kv; its queries pick causal rows of their own
    sequence, with -1s, indices >= s_kv (no token), duplicates and one all -1 query."""
    s_kv = sum(seq_lens)
    q = torch.randn(s_kv, h_q, D_QK, generator=generator, device=DEVICE).to(torch.bfloat16)
    kv = torch.randn(s_kv, 1, D_QK, generator=generator, device=DEVICE).to(torch.bfloat16)
    starts = torch.repeat_interleave(torch.cumsum(torch.tensor([0] + seq_lens[:-1]), 0), torch.tensor(seq_lens))
    positions = torch.arange(s_kv) - starts
    own = torch.rand(s_kv, topk, generator=generator, device=DEVICE) * (positions.to(DEVICE)[:, None] + 1)
    indices = (starts.to(DEVICE)[:, None] + own.long()).int()[:, None, :]
    noise = torch.rand(indices.shape, generator=generator, device=DEVICE)
    indices[noise < 0.1] = -1
    indices[(noise >= 0.1) & (noise < 0.15)] = s_kv + 5
    if topk > 3:
        indices[..., 1] = indices[..., 3]
    indices[min(1, s_kv - 1)] = -1
    topk_length = None
    if with_topk_length:
        topk_length = torch.randint(0, topk + 1, (s_kv,), generator=generator, device=DEVICE, dtype=torch.int32)
    return q, kv, indices, topk_length


def varied_scale_cache(num_blocks, generator):
    """A randn FP8 cache whose tile scales differ by tile and by token (decode_inputs.quantize_with_varied_scales)."""
    cache = torch.randn(num_blocks, PAGE_BLOCK_SIZE, 1, D_QK, generator=generator, device=DEVICE)
    return quantize_with_varied_scales(cache, generator)



def bad_table_inputs(is_fp8, generator, h_q=16):
    """Dense decode inputs whose paged table is wrong where the GPU ops do not look (values are checked only on the
    CPU or with FLASHMLA_CHECK=1). The cache is the first 3 blocks of a pool of 4 whose last (the next layer's, as it
    were) holds values 100 times larger. Sequence 0 (150 tokens) maps its blocks to pages 1, 3 (past the cache) and
    -1; sequence 1 (232 tokens) runs past its table row of 3 blocks, into a hidden 4th column (a row-stride view)
    that names page 3. The kernels read page 0 for a page outside the cache and cut a length at the table's
    capacity: returns (q, cache, block_table, cache_seqlens) and the valid table and lengths that say so, for the
    reference."""
    pool = paged_cache(4, False, generator, pad=0)
    pool[3] *= 100
    if is_fp8:
        pool = reference.quantize_kv_fp8(pool)
    table_buffer = torch.tensor([[1, 3, -1, 2], [2, 0, 1, 3]], dtype=torch.int32, device=DEVICE)
    valid_table = torch.tensor([[1, 0, 0], [2, 0, 1]], dtype=torch.int32, device=DEVICE)
    cache_seqlens = torch.tensor([150, 232], dtype=torch.int32, device=DEVICE)
    q = torch.randn(2, 1, h_q, D_QK, generator=generator, device=DEVICE).to(torch.bfloat16)
    return (q, pool[:3], table_buffer[:, :3], cache_seqlens), (valid_table, cache_seqlens.clamp_max(192))


# Scheduling metadata that is not get_mla_metadata's pair for the batch (made by hand, or halves of two calls), which
# the ops take to the kernels unchecked on a GPU without FLASHMLA_CHECK. For GARBAGE_SEQLENS over GARBAGE_PARTS parts:
# partial slots [0, 7). Rows (begin_batch, begin_block, end_batch, end_block, begin_split) and the cumulative
# num_splits; "halves of two calls" is built by `garbage_schedule`.
GARBAGE_SEQLENS = [300, 1, 90]
GARBAGE_PARTS = 4
INT32_MIN, INT32_MAX = -2 ** 31, 2 ** 31 - 1
GARBAGE_SCHEDULES = {
    # a batch, blocks and slots past their ends: sequence 3, blocks 5 and 40 of 5, slots 7 .. 10 of 7
    "past the ends": ([[0, 0, 3, 2, 6], [1, 5, 1, 40, 7], [2, 1, 2, 3, 1], [3, 0, 3, 0, 0]], [0, 3, 7, 9]),
    # before them: sequence -1, blocks -3 and -5, slots -2 and -1
    "before the ends": ([[-1, -3, 0, 1, -2], [0, -1, 2, -5, -1], [1, 0, 1, 1, -3], [2, 0, 2, 2, 0]], [-2, -1, 1, 2]),
    # negative and zero slot counts
    "decreasing num_splits": ([[0, 0, 0, 3, 0], [0, 3, 1, 1, 1], [1, 1, 2, 2, 0], [3, 0, 3, 0, 0]], [5, 2, 2, -1]),
    "int32 extremes": ([[INT32_MIN, INT32_MIN, INT32_MAX, INT32_MIN, INT32_MAX], [INT32_MAX] * 5,
                        [0, INT32_MAX, 2, INT32_MAX, INT32_MIN], [INT32_MIN] * 5],
                       [INT32_MIN, INT32_MAX, INT32_MIN, INT32_MAX]),
    "halves of two calls": None,
    "random": None,
}


def garbage_schedule(name: str, device=DEVICE) -> tuple[torch.Tensor, torch.Tensor]:
    """GARBAGE_SCHEDULES[name] as int32 tensors `(GARBAGE_PARTS, 8)` and `(batch + 1,)`. "halves of two calls":
    get_mla_metadata's metadata for lengths [1, 1, 1000] (sequence 2 in four pieces) with the num_splits of lengths
    [1000] * 3 (sequence 2's two slots from 4: its last piece writes slot 7, past the 7); "random": any int32."""
    batch = len(GARBAGE_SEQLENS)
    if name == "halves of two calls":
        metadata, _ = reference.get_mla_metadata(torch.tensor([1, 1, 1000], dtype=torch.int32), GARBAGE_PARTS)
        _, num_splits = reference.get_mla_metadata(torch.tensor([1000] * 3, dtype=torch.int32), GARBAGE_PARTS)
        return metadata.to(device), num_splits.to(device)
    if name == "random":
        generator = torch.Generator().manual_seed(2024)
        metadata = torch.randint(INT32_MIN, INT32_MAX, (GARBAGE_PARTS, 8), generator=generator, dtype=torch.int32)
        num_splits = torch.randint(INT32_MIN, INT32_MAX, (batch + 1,), generator=generator, dtype=torch.int32)
        return metadata.to(device), num_splits.to(device)
    rows, num_splits = GARBAGE_SCHEDULES[name]
    metadata = torch.zeros(GARBAGE_PARTS, 8, dtype=torch.int32)
    metadata[:, :5] = torch.tensor(rows, dtype=torch.int64).int()
    return metadata.to(device), torch.tensor(num_splits, dtype=torch.int64).int().to(device)


def in_pool(t: torch.Tensor, guard: int, fill) -> tuple[torch.Tensor, torch.Tensor]:
    """(pool, view): `t` copied into the middle of a pool `guard` rows longer at each end, which hold `fill` (a kernel
    that reads past `t` reads them; one that writes past it changes them)."""
    pool = torch.full((t.shape[0] + 2 * guard, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)
    view = pool[guard:guard + t.shape[0]]
    view.copy_(t)
    return pool, view
