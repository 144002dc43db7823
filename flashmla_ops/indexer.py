"""The DSA lightning indexer: which `topk` keys each query attends to (DeepSeek V3.2).

    logits[t, s] = sum_h weights[t, h] * relu(q[t, h] . k[s])      over the keys query t may see, else -inf

q/k are bfloat16 (or float32), or float8_e4m3fn with float32 scales (q: one per (token, head), k: one per token),
in which case `q . k` is `q_scale * k_scale * (q_fp8 . k_fp8)`. The paged form reads keys from the indexer key cache
that `write_index_cache` fills (bfloat16 `(num_blocks, 64, d_i)` or FP8 `(num_blocks, 64, d_i + 4)` uint8).
"""
import torch

from . import _ext
from ._checks import (FLOAT_DTYPES, FP8_LAYOUT_DTYPES, check, check_paged_table, check_same_device, check_tensor,
                      dense_aligned, last_dim_contiguous, require_tensor, value_checks_apply)
from .decode import INDEX_DTYPES, PAGE_BLOCK_SIZE
from .kv_cache import dequantize_index_fp8_reference

FP8 = torch.float8_e4m3fn
ELEMENTS_PER_CHUNK = 1 << 24  # bounds the (queries, heads, keys) float32 tile of the reference


def _scaled(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return x.float() if scale is None else x.float() * scale.float()[..., None]


def _check_scale(op, name, x, x_name, scale, shape, dims):
    if scale is not None:
        require_tensor(op, name, scale)  # a list is not "given" for the rule below
    if (x.dtype == FP8) != (scale is not None):
        raise ValueError(f"{op}: {name} must be given exactly when {x_name} is float8_e4m3fn "
                         f"({x_name} is {str(x.dtype).replace('torch.', '')}, "
                         f"{name} is {'given' if scale is not None else None})")
    if scale is not None:
        check_tensor(op, name, scale, (torch.float32,), shape, dims)


def _weighted_relu_logits(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """q `(T, h, d)`, keys `(K, d)` or `(T, K, d)`, weights `(T, h)` (all float32) -> `(T, K)`."""
    scores = torch.matmul(q, keys.transpose(-1, -2))  # (T, h, K)
    return torch.einsum("thk,th->tk", torch.relu(scores), weights)


# ---------------------------------------------------------------- prefill form


def _check_logits(op, q, k, weights, k_start, k_end, q_scale, k_scale):
    dims = {}
    check_tensor(op, "q", q, (*FLOAT_DTYPES, FP8), ("s_q", "h_i", "d_i"), dims)
    check_tensor(op, "k", k, (*FLOAT_DTYPES, FP8), ("s_kv", "d_i"), dims)
    check_tensor(op, "weights", weights, (torch.float32,), ("s_q", "h_i"), dims)
    check_tensor(op, "k_start", k_start, INDEX_DTYPES, ("s_q",), dims)
    check_tensor(op, "k_end", k_end, INDEX_DTYPES, ("s_q",), dims)
    _check_scale(op, "q_scale", q, "q", q_scale, ("s_q", "h_i"), dims)
    _check_scale(op, "k_scale", k, "k", k_scale, ("s_kv",), dims)
    check_same_device(op, q=q, k=k, weights=weights, k_start=k_start, k_end=k_end, q_scale=q_scale, k_scale=k_scale)
    if value_checks_apply(k_start):
        s_kv = k.shape[0]
        check(op, (k_start >= 0) & (k_start <= k_end) & (k_end <= s_kv),
              f"each query's key range must satisfy 0 <= k_start <= k_end <= s_kv={s_kv} (k's rows)")


def indexer_logits_reference(q, k, weights, k_start, k_end, q_scale=None, k_scale=None):
    s_q, h_i, _ = q.shape
    s_kv = k.shape[0]
    keys = _scaled(k, k_scale)
    queries = _scaled(q, q_scale)
    logits = q.new_empty(s_q, s_kv, dtype=torch.float32)
    position = torch.arange(s_kv, device=q.device)
    chunk = max(1, ELEMENTS_PER_CHUNK // max(1, h_i * s_kv))
    for start in range(0, s_q, chunk):
        rows = slice(start, start + chunk)
        visible = (position >= k_start[rows, None]) & (position < k_end[rows, None])
        chunk_logits = _weighted_relu_logits(queries[rows], keys, weights[rows].float())
        logits[rows] = chunk_logits.masked_fill(~visible, float("-inf"))
    return logits


@torch.library.custom_op("flashmla::indexer_logits", mutates_args=())
def indexer_logits(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, k_start: torch.Tensor,
                   k_end: torch.Tensor, q_scale: torch.Tensor | None, k_scale: torch.Tensor | None) -> torch.Tensor:
    """Indexer logits for packed prefill.

    q `(s_q, h_i, d_i)`, k `(s_kv, d_i)`: bfloat16, or float8_e4m3fn with q_scale `(s_q, h_i)` / k_scale `(s_kv,)`
    float32; weights `(s_q, h_i)` float32; query `t` sees keys `[k_start[t], k_end[t])` (int32 `(s_q,)`; causal
    prefill of a packed batch: its sequence's start and its own position + 1).
    Returns `(s_q, s_kv)` float32, -inf outside each query's range.

    Precision: the bf16 paths and the Triton kernel multiply exactly and sum in float32 (errors ~1e-6 of the largest
    logit). On Hopper, e4m3 q and k (d_i 128, h_i <= 64) take the CUDA kernel's e4m3 wgmmas, as DeepSeek's own
    indexer does: Hopper sums an e4m3 MMA's products with about 14 bits kept, errors up to ~2e-4 of the absolute sum
    sum_h |w| sum_d |q_d k_d| (2-4e-4 of the largest logit on random inputs; the e4m3 inputs' own rounding is 1/16).
    `indexer_logits_path(q, k)` says which path runs; `FLASHMLA_BACKEND=triton` keeps the exact one.
    Non-finite inputs: relu keeps NaN on every path (torch.relu's, the reference's), so a NaN in q, k or a scale makes
    the logits it reaches NaN; the kernels apply |scale| outside the relu, so an infinite scale can give NaN where the
    reference gives 0.
    """
    _check_logits("indexer_logits", q, k, weights, k_start, k_end, q_scale, k_scale)
    path = indexer_logits_path(q, k)
    if path == "cuda":
        return _cuda_indexer_logits(q, k, weights, k_start, k_end, q_scale, k_scale)
    if path == "triton":
        from .triton import indexer as triton_indexer

        return triton_indexer.indexer_logits(q, k, weights, k_start, k_end, q_scale, k_scale)
    _ext.reference_fallback("indexer_logits", q.device)
    return indexer_logits_reference(q, k, weights, k_start, k_end, q_scale, k_scale)


def indexer_logits_path(q: torch.Tensor, k: torch.Tensor) -> str:
    """The path `flashmla::indexer_logits` takes for these q and k: 'cuda' (csrc/indexer_logits.cu, e4m3 q and k with
    d_i 128 and h_i <= 64, on Hopper), 'triton' or 'reference'."""
    return _first_path("indexer_logits", q, k, _cuda_supports)


def _first_path(op, q, keys, cuda_supports) -> str:
    """The first of `op`'s paths on q's device whose kernel covers these inputs, else 'reference'."""
    for path in _ext.paths(op, q.device):
        if path == "cuda" and cuda_supports(q, keys):
            return path
        if path == "triton":
            from .triton import indexer as triton_indexer

            if triton_indexer.supports(q, keys):
                return path
    return "reference"


CUDA_D_I = 128  # csrc/indexer_logits.cu: one e4m3 row of q or k is one 128-byte swizzled row
CUDA_MAX_HEADS = 64  # its (query, head) pairs: 4 queries of 64 heads per warpgroup


def _cuda_supports(q, k) -> bool:
    """What csrc/indexer_logits.cu is written for: e4m3 q and keys (DeepSeek V3.2's indexer: d_i 128, h_i 64)."""
    return (q.dtype == FP8 and k.dtype == FP8 and q.shape[-1] == CUDA_D_I and 1 <= q.shape[1] <= CUDA_MAX_HEADS
            and max(q.shape[0], k.shape[0]) < 1 << 30)


def _cuda_indexer_logits(q, k, weights, k_start, k_end, q_scale, k_scale):
    """The Hopper kernel (e4m3 wgmmas, see `indexer_logits`). A key whose scale is negative gets its sign bits flipped
    and |scale| (relu(s x) = |s| relu(sign(s) x)); the kernel does the same for q's rows in shared memory."""
    raw = k.view(torch.uint8)
    negative = k_scale < 0
    keys = dense_aligned(torch.where(negative[:, None], raw ^ 0x80, raw)).view(FP8)
    return _ext.extension().indexer_logits(dense_aligned(q), keys, weights.contiguous(), k_start.contiguous(),
                                           k_end.contiguous(), q_scale.contiguous(), k_scale.abs())


@indexer_logits.register_fake
def _(q, k, weights, k_start, k_end, q_scale, k_scale):
    _check_logits("indexer_logits", q, k, weights, k_start, k_end, q_scale, k_scale)
    return q.new_empty(q.shape[0], k.shape[0], dtype=torch.float32)


# ---------------------------------------------------------------- paged decode form


def _check_logits_paged(op, q, index_cache, weights, block_table, cache_seqlens, q_scale):
    dims = {}
    check_tensor(op, "q", q, (*FLOAT_DTYPES, FP8), ("batch", "s_q", "h_i", "d_i"), dims)
    row = ("d_i", 4) if require_tensor(op, "index_cache", index_cache).dtype in FP8_LAYOUT_DTYPES else "d_i"
    check_tensor(op, "index_cache", index_cache, (*FLOAT_DTYPES, *FP8_LAYOUT_DTYPES), (None, PAGE_BLOCK_SIZE, row),
                 dims)
    check_tensor(op, "weights", weights, (torch.float32,), ("batch", "s_q", "h_i"), dims)
    check_tensor(op, "block_table", block_table, INDEX_DTYPES, ("batch", "max_blocks_per_seq"), dims)
    check_tensor(op, "cache_seqlens", cache_seqlens, INDEX_DTYPES, ("batch",), dims)
    _check_scale(op, "q_scale", q, "q", q_scale, ("batch", "s_q", "h_i"), dims)
    check_same_device(op, q=q, index_cache=index_cache, weights=weights, block_table=block_table,
                      cache_seqlens=cache_seqlens, q_scale=q_scale)
    check_paged_table(op, block_table, cache_seqlens, index_cache.shape[0], PAGE_BLOCK_SIZE, "index_cache")


def indexer_logits_paged_reference(q, index_cache, weights, block_table, cache_seqlens, q_scale=None):
    batch, s_q, _, _ = q.shape
    capacity = block_table.shape[1] * PAGE_BLOCK_SIZE
    logits = q.new_empty(batch, s_q, capacity, dtype=torch.float32)
    queries = _scaled(q, q_scale)
    # Every position the block table can hold, masked by length on the device: no host sync, so this also runs inside
    # a CUDA graph. Entries past a sequence's blocks may hold anything: clamped to a real block, then masked.
    if index_cache.shape[0] == 0:  # no block to read: every length is 0 (checked), so every position is masked
        index_cache = index_cache.new_zeros(1, *index_cache.shape[1:])
    blocks = block_table.long().clamp(0, index_cache.shape[0] - 1)
    if q.device.type == "cpu" and batch:  # no sync to avoid: score only the blocks up to the longest sequence
        longest = min(capacity, max(0, int(cache_seqlens.max())))
        blocks = blocks[:, :-(-longest // PAGE_BLOCK_SIZE)]
        logits[:, :, blocks.shape[1] * PAGE_BLOCK_SIZE:] = float("-inf")
    last_visible = cache_seqlens.long()[:, None] - s_q + torch.arange(s_q, device=q.device)
    position = torch.arange(blocks.shape[1] * PAGE_BLOCK_SIZE, device=q.device)
    # queries a tile: the (queries, heads, capacity) float32 scores stay within ELEMENTS_PER_CHUNK (a prompt continued
    # through the decode path has hundreds of queries a sequence)
    chunk = max(1, ELEMENTS_PER_CHUNK // max(1, q.shape[2] * len(position)))
    for b in range(batch):
        rows = index_cache[blocks[b]].flatten(0, 1)
        keys = rows.float() if index_cache.dtype in FLOAT_DTYPES else dequantize_index_fp8_reference(rows)
        for start in range(0, s_q, chunk):
            tile = slice(start, start + chunk)
            visible = position[None, :] <= last_visible[b, tile, None]
            chunk_logits = _weighted_relu_logits(queries[b, tile], keys, weights[b, tile].float())
            logits[b, tile, :len(position)] = chunk_logits.masked_fill(~visible, float("-inf"))
    return logits


@torch.library.custom_op("flashmla::indexer_logits_paged", mutates_args=())
def indexer_logits_paged(q: torch.Tensor, index_cache: torch.Tensor, weights: torch.Tensor, block_table: torch.Tensor,
                         cache_seqlens: torch.Tensor, q_scale: torch.Tensor | None) -> torch.Tensor:
    """Indexer logits for decode over the paged indexer key cache.

    q `(batch, s_q, h_i, d_i)` (float8_e4m3fn with q_scale `(batch, s_q, h_i)`, or bfloat16); weights
    `(batch, s_q, h_i)` float32; query `i` of sequence `b` sees logical tokens `[0, cache_seqlens[b] - s_q + i]`.
    Returns `(batch, s_q, max_blocks_per_seq * 64)` float32 indexed by logical token, -inf where not visible.
    """
    _check_logits_paged("indexer_logits_paged", q, index_cache, weights, block_table, cache_seqlens, q_scale)
    path = indexer_logits_paged_path(q, index_cache, block_table)
    if path == "cuda":
        return _cuda_indexer_logits_paged(q, index_cache, weights, block_table, cache_seqlens, q_scale)
    if path == "triton":
        from .triton import indexer as triton_indexer

        return triton_indexer.indexer_logits_paged(q, index_cache, weights, block_table, cache_seqlens, q_scale)
    _ext.reference_fallback("indexer_logits_paged", q.device)
    return indexer_logits_paged_reference(q, index_cache, weights, block_table, cache_seqlens, q_scale)


def indexer_logits_paged_path(q: torch.Tensor, index_cache: torch.Tensor,
                              block_table: torch.Tensor | None = None) -> str:
    """The path `flashmla::indexer_logits_paged` takes for this q and cache: 'cuda' (csrc/indexer_logits_paged.cu:
    the FP8 index cache, d_i 128, h_i <= 64, s_q <= 2, a block table of fewer than 2**31 tokens, on Hopper), 'triton'
    or 'reference' (also for a cache of no blocks: nothing to read, every position masked). Without block_table the
    table's capacity is not asked."""
    if index_cache.shape[0] == 0:
        return "reference"
    if block_table is not None and block_table.shape[-1] * PAGE_BLOCK_SIZE >= CUDA_PAGED_MAX_CAPACITY:
        return _first_path("indexer_logits_paged", q, index_cache, lambda q, keys: False)
    return _first_path("indexer_logits_paged", q, index_cache, _cuda_supports_paged)


CUDA_PAGED_MAX_S_Q = 2  # csrc/indexer_logits_paged.cu: a sequence's queries x 64 heads are its wgmma N (64 or 128)
CUDA_PAGED_MAX_CAPACITY = 2 ** 31  # its logical token positions (max_blocks * 64) are int32


def _cuda_supports_paged(q, index_cache) -> bool:
    """What csrc/indexer_logits_paged.cu is written for: the FP8 index cache with d_i 128 (132-byte rows, contiguous
    within a block, 16-byte aligned blocks), bf16 or e4m3 q with h_i <= 64 and s_q <= 2."""
    batch, s_q, h_i, d_i = q.shape
    return (index_cache.dtype in FP8_LAYOUT_DTYPES and d_i == CUDA_D_I and 1 <= h_i <= CUDA_MAX_HEADS
            and 1 <= s_q <= CUDA_PAGED_MAX_S_Q and 1 <= batch < 1 << 31 and q.dtype in (torch.bfloat16, FP8)
            and index_cache.stride(2) == 1 and index_cache.stride(1) == index_cache.shape[2]
            and index_cache.stride(0) % 16 == 0 and index_cache.data_ptr() % 16 == 0 and index_cache.shape[0] >= 1)


def _cuda_indexer_logits_paged(q, index_cache, weights, block_table, cache_seqlens, q_scale):
    """The Hopper kernel takes bf16 q: e4m3 q is widened exactly, a negative scale's sign into its row and |scale|
    into the weights (relu(s x) = |s| relu(sign(s) x))."""
    if q.dtype == FP8:
        widened = q.float()
        q = torch.where(q_scale[..., None] < 0, -widened, widened).bfloat16()
        weights = weights * q_scale.abs()
    return _ext.extension().indexer_logits_paged(dense_aligned(q), index_cache.view(torch.uint8), weights.contiguous(),
                                                 last_dim_contiguous(block_table), cache_seqlens.contiguous())


@indexer_logits_paged.register_fake
def _(q, index_cache, weights, block_table, cache_seqlens, q_scale):
    _check_logits_paged("indexer_logits_paged", q, index_cache, weights, block_table, cache_seqlens, q_scale)
    return q.new_empty(q.shape[0], q.shape[1], block_table.shape[1] * PAGE_BLOCK_SIZE, dtype=torch.float32)


# ---------------------------------------------------------------- top-k


MAX_TOPK_BLOCK = 2 ** 31 // PAGE_BLOCK_SIZE  # indexer_topk's slots block * 64 + row are int32


def _check_topk(op, logits, topk, block_table):
    if not isinstance(logits, torch.Tensor) or logits.dtype != torch.float32 or logits.dim() < 1:
        seen = (logits.dtype, tuple(logits.shape)) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise TypeError(f"{op}: logits must be a float32 tensor (..., num_keys), got {seen}")
    if topk < 1:
        raise ValueError(f"{op}: topk must be >= 1, got {topk}")
    if block_table is not None:
        dims = {}
        check_tensor(op, "logits", logits, (torch.float32,), ("batch", "s_q", "num_keys"), dims)
        check_tensor(op, "block_table", block_table, INDEX_DTYPES, ("batch", "max_blocks_per_seq"), dims)
        if dims["num_keys"] > dims["max_blocks_per_seq"] * PAGE_BLOCK_SIZE:
            raise ValueError(f"{op}: logits' num_keys ({dims['num_keys']}) must be <= block_table's "
                             f"max_blocks_per_seq * {PAGE_BLOCK_SIZE} = {dims['max_blocks_per_seq'] * PAGE_BLOCK_SIZE}")
        check_same_device(op, logits=logits, block_table=block_table)
        if value_checks_apply(logits):
            # A position that can be selected (logit not -inf) must map through a real block: a negative entry would
            # turn it into a negative slot, which the sparse kernels read as "no token" (or reject), silently; an
            # entry of 2**25 or more into a slot past int32, which wraps around to another, valid-looking slot.
            entry = block_table.repeat_interleave(PAGE_BLOCK_SIZE, dim=1)[:, None, :logits.shape[-1]]
            bad = (logits != float("-inf")) & ((entry < 0) | (entry >= MAX_TOPK_BLOCK))
            check(op, ~bad, f"block_table entries of blocks holding a selectable logit (not -inf) must be in [0, "
                            f"2**25) (int32 slots), got {entry.expand_as(bad)[bad][:8].tolist()}")


# IEEE 754's total order as csrc/indexer_topk.cu ranks logits (its `ordered`): each float's bits as an unsigned code,
# negative floats with every bit flipped, the others with the sign bit set. -0 ranks below +0, a NaN with the sign bit
# clear above +inf, one with it set below -inf. A key counts when its code is above -inf's. Here the codes are int32,
# each the unsigned code with its top bit flipped (the same order under signed comparisons): a non-negative float's
# bits as they are, a negative one's with every bit but the sign flipped.
ORDERED_NEGATIVE_INFINITY = -0x7F800001  # -inf's bits 0xFF800000 so flipped: 0x807FFFFF


def ordered_codes(logits: torch.Tensor) -> torch.Tensor:
    """The float32 logits' int32 codes in the total order above."""
    bits = logits.contiguous().view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def indexer_topk_reference(logits, topk, block_table=None):
    """The CUDA kernel's selection exactly: the keys above -inf whose logits rank above the k-th largest, then those
    equal to it from the lowest positions on, in ascending key order, -1 after them; ranked by the total order of
    ordered_codes (for finite logits the float order, but -0 below +0 and NaNs at the ends), as the kernel does. Ties
    are common (V3.2's logits sum relu'd scores: exact zeros), and torch.topk breaks them by its own layout, so rows
    of other widths over the same keys (a prompt's prefill and its decode steps) could select differently."""
    num_keys = logits.shape[-1]
    k = min(topk, num_keys)
    if k:
        codes = ordered_codes(logits)
        threshold = torch.topk(codes, k, dim=-1).values[..., -1:]
        finite = codes > ORDERED_NEGATIVE_INFINITY
        greater = (codes > threshold) & finite
        tied = (codes == threshold) & finite
        take = greater | (tied & (tied.cumsum(-1) <= k - greater.sum(-1, keepdim=True)))
        keys = torch.arange(num_keys, dtype=torch.int32, device=logits.device)
        positions = torch.topk(torch.where(take, keys, num_keys), k, dim=-1, largest=False).values.long()
        valid = positions < num_keys  # ascending: the taken keys first, then num_keys for the rest
        positions = positions.clamp_max(num_keys - 1)
    else:
        positions, valid = logits[..., :0].long(), logits[..., :0].bool()
    if block_table is not None:
        blocks = torch.gather(block_table.long(), 1, (positions // PAGE_BLOCK_SIZE).flatten(1)).view_as(positions)
        positions = blocks * PAGE_BLOCK_SIZE + positions % PAGE_BLOCK_SIZE
    selected = torch.where(valid, positions, -1).int()
    if k < topk:
        selected = torch.cat([selected, selected.new_full((*selected.shape[:-1], topk - k), -1)], dim=-1)
    return selected


@torch.library.custom_op("flashmla::indexer_topk", mutates_args=())
def indexer_topk(logits: torch.Tensor, topk: int, block_table: torch.Tensor | None) -> torch.Tensor:
    """The `topk` highest-logit keys per row of `logits` `(..., num_keys)` float32, as int32 `(..., topk)`;
    -1 where fewer than `topk` keys are above -inf. In ascending key order, ties at the threshold taken from the lowest
    positions, -1 after the keys: the CUDA kernel (csrc/indexer_topk.cu, a radix select) and the reference alike, so
    every path and every row width over the same keys selects the same. Logits rank in IEEE 754's total order
    (ordered_codes): -0 below +0, a NaN above +inf (below -inf, never selected, with its sign bit set).

    Without block_table the indices are key positions (for `indexer_logits`: rows of the packed kv, ready for
    `sparse_prefill`). With block_table `(batch, max_blocks_per_seq)` and logits `(batch, s_q, num_keys)` they are
    flat cache slots `block_table[b, t // 64] * 64 + t % 64`, ready for `sparse_decode`.
    """
    _check_topk("indexer_topk", logits, topk, block_table)
    num_keys = logits.shape[-1]
    rows = logits.numel() // num_keys if num_keys else 0
    if _ext.backend("indexer_topk", logits.device) == "cuda" and max(num_keys, topk) < 1 << 30 and rows < 1 << 31:
        table = last_dim_contiguous(block_table) if block_table is not None else None
        return _ext.extension().indexer_topk(logits.contiguous(), topk, table)
    _ext.reference_fallback("indexer_topk", logits.device)
    return indexer_topk_reference(logits, topk, block_table)


@indexer_topk.register_fake
def _(logits, topk, block_table):
    _check_topk("indexer_topk", logits, topk, block_table)
    return logits.new_empty(*logits.shape[:-1], topk, dtype=torch.int32)
