"""The DSA lightning indexer's logits in Triton (packed prefill and paged decode). The top-k is csrc/indexer_topk.cu's
(Hopper) or torch.topk's: a Triton radix select (stop 20) took 2.6x to 5x torch.topk's time on the H200 (stop 21,
docs/bench/stop21_call1.log) and was removed.

A program owns `BLOCK_Q` queries of one sequence and walks `BLOCK_N`-key tiles of its share of the keys.
Each key tile is multiplied by every (query, head) pair (`BLOCK_Q * H_PAD` of them), so it is loaded once for all:
    s[n, (t, h)] = q_scale[t, h] * k_scale[n] * (k[n] . q[t, h])          (scales only for FP8)
    logits[t, n] = sum_h weights[t, h] * relu(s[n, (t, h)])              (a reshape and a sum over the heads)
and -inf where key n is outside query t's range (`[k_start, k_end)`, or `[0, L - s_q + t]` paged). The FP8 scales go
in as relu(s x) = |s| relu(sign(s) x): their signs to q and the prefill keys (exact), |q_scale| to the weights, and a
prefill key's |k_scale| multiplies its logits after the sum over heads (a paged key's scale multiplies s). The keys
are the MMA's M side and the (query, head) pairs its N side: a key's row of the accumulator lies in the lanes of one
warp, so the sum over heads needs no shared memory (compiled for sm_90: one layout conversion, for the store, against
five with the pairs as M, the kernel before stop 20, which took 2x the time). Tiles that no query of the program sees
are stored as -inf without loads or MMAs. FP8 q and k are widened (exactly) to f16 for f16 MMAs, or to bf16 where only
one of them is FP8 or the GPU has no e4m3 conversion (before sm_89): Hopper's e4m3 MMA aligns its products to a shared
exponent with about 14 bits kept, which the H100 run showed as errors of 2 to 4e-5 of the largest logit, past the
tests' 2e-5 band (float32 accumulation order); `LogitsConfig.fp8_mma` takes it, opt-in. Prefill keys are widened once
before the launch (every program reads every key tile; 8 MB for 32k keys), q and paged keys in the kernel. Paged keys
are gathered through the block table from the bf16 `(num_blocks, 64, d_i)` or FP8 `(num_blocks, 64, d_i + 4)` index
cache.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._checks import last_dim_contiguous
from ..decode import PAGE_BLOCK_SIZE
from .common import INTERPRET, batch_grid, device_limits, fp8_values, grid_position, hardware_fp8, mma

FP8_DTYPES = (torch.float8_e4m3fn, torch.uint8)


@triton.jit
def _load_operand(ptrs, mask, IS_FP8: tl.constexpr, HW_FP8: tl.constexpr, F16: tl.constexpr,
                  FP8_MMA: tl.constexpr):
    """A bf16 (or, with F16, an f16) or e4m3 tile as an MMA operand: e4m3 as bf16, or with F16 as f16 (one
    conversion per pair; the launch takes F16 only with hardware conversion), both exact (common.fp8_values), or with
    FP8_MMA as it is; a bf16 / f16 tile as it is."""
    if IS_FP8:
        raw = tl.load(ptrs, mask=mask, other=0)
        if FP8_MMA:
            values = raw.to(tl.float8e4nv, bitcast=True)
        else:
            values = fp8_values(raw, HW_FP8, F16)
    else:
        values = tl.load(ptrs, mask=mask, other=0.0)
    return values


@triton.jit
def _scores(a, b, FP8_MMA: tl.constexpr, ACC_K: tl.constexpr, INTERPRET: tl.constexpr):
    """a @ b in float32: bf16/f16 MMAs (exact products, float32 sums), or with FP8_MMA e4m3 MMAs whose partial sums
    are added into float32 every ACC_K of the inner dimension (Hopper's e4m3 MMA keeps about 14 bits inside)."""
    if FP8_MMA and not INTERPRET:
        return tl.dot(a, b, max_num_imprecise_acc=ACC_K)
    return mma(a, b, INTERPRET)


@triton.jit
def _indexer_logits_kernel(
        Q, K, QScale, KScale, Weights, KStart, KEnd, BlockTable, Seqlens, Out,
        stride_qb, stride_qt, stride_qh, stride_k_block, stride_k_row, stride_wb, stride_wt, stride_bt,
        stride_ob, stride_ot, S_Q, H_I, NUM_KEYS, keys_per_split, num_pages,
        PAGED: tl.constexpr, Q_FP8: tl.constexpr, K_FP8: tl.constexpr, K_SCALED: tl.constexpr, HW_FP8: tl.constexpr,
        BLOCK_Q: tl.constexpr, H_PAD: tl.constexpr, BLOCK_N: tl.constexpr, D_I: tl.constexpr, PAGE: tl.constexpr,
        INTERPRET: tl.constexpr, F16: tl.constexpr, FP8_MMA: tl.constexpr, WIDE_BATCH: tl.constexpr = False):
    ROWS: tl.constexpr = BLOCK_Q * H_PAD
    q_tile, batch, split = grid_position(tl.cdiv(S_Q, BLOCK_Q), WIDE_BATCH)  # common.batch_grid's launch
    queries = q_tile * BLOCK_Q + tl.arange(0, BLOCK_Q)
    query_mask = queries < S_Q
    rows = tl.arange(0, ROWS)
    row_queries = q_tile * BLOCK_Q + rows // H_PAD
    heads = rows % H_PAD
    row_mask = (row_queries < S_Q) & (heads < H_I)
    cols = tl.arange(0, D_I)

    if PAGED:  # query t of s_q sees logical tokens [0, L - s_q + t]
        length = tl.load(Seqlens + batch)
        lo = tl.zeros([BLOCK_Q], dtype=tl.int32)
        hi = length - S_Q + queries + 1
    else:
        lo = tl.load(KStart + queries, mask=query_mask, other=0)
        hi = tl.load(KEnd + queries, mask=query_mask, other=0)
    lo = tl.where(query_mask, lo, NUM_KEYS)
    hi = tl.where(query_mask, hi, 0)
    tile_lo = tl.min(lo, 0)
    tile_hi = tl.max(hi, 0)

    q_offsets = batch * stride_qb + row_queries.to(tl.int64) * stride_qt + heads * stride_qh  # s_q h_i d_i: int64
    q = _load_operand(Q + q_offsets[:, None] + cols[None, :], row_mask[:, None], Q_FP8, HW_FP8, F16, FP8_MMA)
    weights = tl.load(Weights + batch * stride_wb + row_queries * stride_wt + heads, mask=row_mask, other=0.0)
    if Q_FP8:  # relu(s * x) w = relu(sign(s) x) |s| w: the sign to q (exact), the magnitude to the weights
        q_scale = tl.load(QScale + batch * stride_wb + row_queries * stride_wt + heads, mask=row_mask, other=0.0)
        if FP8_MMA:  # e4m3: the sign bit
            sign = tl.where(q_scale[:, None] < 0, 0x80, 0).to(tl.uint8)
            q = (q.to(tl.uint8, bitcast=True) ^ sign).to(tl.float8e4nv, bitcast=True)
        else:  # through float32, exact: the CPU interpreter mis-negates bf16
            q = tl.where(q_scale[:, None] < 0, -q.to(tl.float32), q.to(tl.float32)).to(q.dtype)
        weights = weights * tl.abs(q_scale)

    out_rows = Out + batch * stride_ob + queries.to(tl.int64) * stride_ot
    split_start = split * keys_per_split
    split_end = tl.minimum(split_start + keys_per_split, NUM_KEYS)
    if PAGED:  # tiles that no query sees: -inf, without loads or MMAs (a branch in each step)
        for tile_start in range(split_start, split_end, BLOCK_N):
            keys = tile_start + tl.arange(0, BLOCK_N)
            if (tile_start < tile_hi) & (tile_start + BLOCK_N > tile_lo):
                logits = _tile_logits(q, weights, lo, hi, tile_lo, tile_hi, keys, K, KScale, BlockTable, batch,
                                      stride_bt, stride_k_block, stride_k_row, num_pages, PAGED, K_FP8, K_SCALED,
                                      HW_FP8, BLOCK_Q, H_PAD, BLOCK_N, D_I, PAGE, INTERPRET, F16, FP8_MMA)
            else:
                logits = tl.full([BLOCK_N, BLOCK_Q], float("-inf"), dtype=tl.float32)
            _store_tile(out_rows, keys, logits, query_mask, NUM_KEYS)
    else:
        # Prefill: the split's tiles in three runs, those before any query's keys and those after them stored -inf
        # without loads, and those between in a loop without a branch, whose key loads the compiler pipelines (it
        # does not pipeline loads inside a branch). Timed on the H200 (stop 34, docs/bench/stop34_call2.log): FP8
        # s_q 4096 h64 32k keys 3636.0-3683.5 us against 4573.2-4578.5 in the branch; the paged rows did not gain
        # (bf16 cache: 379.7-387.6 us against 294.2-294.9), so they keep the branch.
        seen_start = split_start + tl.maximum(tile_lo - split_start, 0) // BLOCK_N * BLOCK_N
        seen_start = tl.minimum(seen_start, split_end)
        seen_end = tl.minimum(split_end, tile_hi)
        after = seen_start + tl.cdiv(tl.maximum(seen_end - seen_start, 0), BLOCK_N) * BLOCK_N
        for tile_start in range(split_start, seen_start, BLOCK_N):
            _store_unseen(out_rows, tile_start, query_mask, NUM_KEYS, BLOCK_N, BLOCK_Q)
        for tile_start in range(seen_start, seen_end, BLOCK_N):
            keys = tile_start + tl.arange(0, BLOCK_N)
            logits = _tile_logits(q, weights, lo, hi, tile_lo, tile_hi, keys, K, KScale, BlockTable, batch,
                                  stride_bt, stride_k_block, stride_k_row, num_pages, PAGED, K_FP8, K_SCALED, HW_FP8,
                                  BLOCK_Q, H_PAD, BLOCK_N, D_I, PAGE, INTERPRET, F16, FP8_MMA)
            _store_tile(out_rows, keys, logits, query_mask, NUM_KEYS)
        for tile_start in range(after, split_end, BLOCK_N):
            _store_unseen(out_rows, tile_start, query_mask, NUM_KEYS, BLOCK_N, BLOCK_Q)


@triton.jit
def _tile_logits(q, weights, lo, hi, tile_lo, tile_hi, keys, K, KScale, BlockTable, batch, stride_bt,
                 stride_k_block, stride_k_row, num_pages, PAGED: tl.constexpr, K_FP8: tl.constexpr,
                 K_SCALED: tl.constexpr, HW_FP8: tl.constexpr, BLOCK_Q: tl.constexpr, H_PAD: tl.constexpr,
                 BLOCK_N: tl.constexpr, D_I: tl.constexpr, PAGE: tl.constexpr, INTERPRET: tl.constexpr,
                 F16: tl.constexpr, FP8_MMA: tl.constexpr):
    """The logits `(BLOCK_N, BLOCK_Q)` of the program's queries for `keys` (one tile), -inf where a query does not
    see the key. Paged: a table entry outside the cache's `num_pages` pages (values are checked only on the CPU or
    with FLASHMLA_CHECK=1) reads page 0, never memory outside the cache (as the CUDA kernel)."""
    cols = tl.arange(0, D_I)
    key_mask = (keys >= tile_lo) & (keys < tile_hi)
    if PAGED:
        block = tl.load(BlockTable + batch * stride_bt + keys // PAGE, mask=key_mask, other=0)
        block = tl.where(block.to(tl.uint32) < num_pages, block, 0).to(tl.int64)  # negative: large unsigned
        k_offsets = block * stride_k_block + (keys % PAGE) * stride_k_row
    else:
        k_offsets = keys.to(tl.int64) * stride_k_row
    k = _load_operand(K + k_offsets[:, None] + cols[None, :], key_mask[:, None], K_FP8, HW_FP8, F16, FP8_MMA)
    if K_SCALED:
        if PAGED:  # the token's float32 scale follows its d_i bytes
            k_scale = tl.load((K + k_offsets + D_I).to(tl.pointer_type(tl.float32), bitcast=True), mask=key_mask,
                              other=0.0)
        else:  # prefill: |scale| (its sign is in the keys), applied after the sum over heads
            k_scale = tl.load(KScale + keys, mask=key_mask, other=0.0)
    # keys x (query, head): a key's sum over heads stays within its row's lanes
    scores = _scores(k, tl.trans(q), FP8_MMA, min(32, D_I), INTERPRET)
    if K_SCALED and PAGED:
        scores = scores * k_scale[:, None]
    # relu keeping NaN, as torch.relu (the reference) does: by default tl.maximum returns the other operand (max.f32,
    # the interpreter's np.fmax); max.NaN.f32 is one instruction all the same
    weighted = tl.maximum(scores, 0.0, propagate_nan=tl.PropagateNan.ALL) * weights[None, :]
    logits = tl.sum(tl.reshape(weighted, (BLOCK_N, BLOCK_Q, H_PAD)), 2)
    if K_SCALED and not PAGED:
        logits = logits * k_scale[:, None]
    visible = (keys[:, None] >= lo[None, :]) & (keys[:, None] < hi[None, :])
    return tl.where(visible, logits, float("-inf"))


@triton.jit
def _store_unseen(out_rows, tile_start, query_mask, NUM_KEYS, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr):
    """-inf for a tile of keys that no query of the program sees."""
    keys = tile_start + tl.arange(0, BLOCK_N)
    _store_tile(out_rows, keys, tl.full([BLOCK_N, BLOCK_Q], float("-inf"), dtype=tl.float32), query_mask, NUM_KEYS)


@triton.jit
def _store_tile(out_rows, keys, logits, query_mask, NUM_KEYS):
    """A tile's logits `(BLOCK_N, BLOCK_Q)` to the program's query rows, keys past the last one left out."""
    tl.store(out_rows[None, :] + keys[:, None], logits, mask=query_mask[None, :] & (keys < NUM_KEYS)[:, None])


@dataclass(frozen=True)
class LogitsConfig:
    """Tiles of the logits kernel: `block_q` queries (times the heads padded to a power of two: the MMA's N side) and
    `block_n` keys per step (its M side). `block_q` is capped at the padded query count and raised to 16 MMA columns.
    `fp8_mma` (opt-in): FP8 q and keys go to e4m3 MMAs as they are, partial sums added into float32 every 32 of d_i;
    less exact than the default, whose bf16/f16 products are exact (Hopper keeps about 14 bits inside an e4m3 MMA).
    Timed on the H200 (stop 21, docs/bench/stop21_call1.log, `bench_indexer.py --tune`): paged FP8 b128 h64 32k
    416.0 us against 468.6-483.3 with the default's MMAs, errors 5.1e-5 of the largest logit; prefill FP8 s_q 4096 h64
    32k keys slower at its best (4654.7 against 4419.3 us), errors 5.2e-5. Taken only for FP8 q and keys, on GPUs
    that convert e4m3 (sm_89+), with d_i a multiple of 32; else the default's MMAs."""
    block_q: int = 2
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    fp8_mma: bool = False


def default_logits_config(h_pad: int, paged: bool = False, fp8_cache: bool = False) -> LogitsConfig:
    """Prefill: 8 warps (4 for FP8 keys), 256 (query, head) columns, 64 keys a step; paged: 4 warps, 128 columns, 64
    keys a step (128 for a bf16 cache). From `bench_indexer.py --tune` on the H200 (stop 20,
    docs/bench/stop20_call2_indexer_tune.log), against the kernel before, with the (query, head) pairs as M (2 x 64
    rows by 64 keys, 8 warps): prefill bf16 s_q 4096 h64 32k keys 4703.9 against 9715.5 us; paged b128 h64 32k: bf16
    cache 299.4 against 448.9 (64 keys 359.6), FP8 cache 534.4 against 890.1 (128 keys 1067.2); 8 warps were slower
    on each. With the scales folded and prefill keys widened before the launch (call 4, stop20_call4_indexer.log)
    the FP8 prefill row ran as the bf16 one: 4667.1 us, 4 queries with 8 warps 4633.4 (within 1%). Timed again in
    stop 21 (docs/bench/stop21_call1.log), 4 queries with 8 warps took 4419.3 us against 4678.8 and 4711.3 for the
    paged default's tiles, so prefill takes 256 columns with 8 warps. With the prefill key loads pipelined (stop 34,
    docs/bench/stop34_call2.log) these tiles stayed the fastest of four on the FP8 row: 3636.0 us against 3892.7
    with 2 stages, 4534.3 with 4 and 4029.7 for 2 queries by 64 keys with 4 warps and 4 stages; the tune then
    (docs/bench/stop34_call5.log, 45 configs) found 4 warps faster on the FP8 row (3516.5 against 3683.5 us), which
    three alternating rounds confirmed (stop34_call6.log: 3527.9-3553.2 against 3608.1-3649.3) and not on the bf16
    row (3727.1-3837.0 against 3724.6-3736.8): FP8 keys take 4 warps."""
    if not paged:
        return LogitsConfig(block_q=max(1, 256 // h_pad), block_n=64, num_warps=4 if fp8_cache else 8)
    return LogitsConfig(block_q=max(1, 128 // h_pad), block_n=64 if fp8_cache else 128)


def _launch_logits(q, keys, weights, q_scale, k_scale, k_start, k_end, block_table, cache_seqlens, out, paged,
                   config=None):
    """q `(batch, s_q, h_i, d_i)`, weights `(batch, s_q, h_i)`, out `(batch, s_q, num_keys)`; keys as a
    `(blocks, rows, row)` tensor (prefill: one block of s_kv rows); `config` (a LogitsConfig) or the default."""
    batch, s_q, h_i, d_i = q.shape
    num_keys = out.shape[-1]
    if out.numel() == 0:
        return out
    q_fp8, k_fp8 = q.dtype in FP8_DTYPES, keys.dtype in FP8_DTYPES
    k_scaled = k_fp8
    # FP8 q and keys: f16 MMAs (e4m3 -> f16 is one conversion per pair, to bf16 more), where the GPU converts e4m3
    hw_fp8 = hardware_fp8(q.device)
    f16 = bool(q_fp8 and k_fp8 and hw_fp8)
    h_pad = triton.next_power_of_2(h_i)
    config = config or default_logits_config(h_pad, paged, k_fp8)
    fp8_mma = config.fp8_mma and f16 and d_i % 32 == 0
    if fp8_mma and not paged:  # the keys stay e4m3: a negative scale's sign goes to the key's sign bits (exact)
        raw = keys.view(torch.uint8)
        keys, k_scale = torch.where(k_scale[None, :, None] < 0, raw ^ 0x80, raw), k_scale.abs()
    elif k_fp8 and not paged:
        # Every program reads every key tile: widened once here (exactly) instead of in each program, with each key's
        # scale's sign (relu(s x) = |s| relu(sign(s) x): the kernel applies |s| after the sum over heads)
        keys = keys.view(torch.float8_e4m3fn).to(torch.float16 if f16 else torch.bfloat16)
        keys, k_scale, k_fp8 = torch.where(k_scale[None, :, None] < 0, -keys, keys), k_scale.abs(), False
    block_q = min(config.block_q, triton.next_power_of_2(s_q))
    block_q = max(block_q, 16 // min(h_pad, 16))  # an MMA needs 16 rows
    block_n = config.block_n
    q_tiles = triton.cdiv(s_q, block_q)
    key_tiles = triton.cdiv(num_keys, block_n)
    multiprocessors, _ = device_limits(q.device)
    splits = max(1, min(key_tiles, triton.cdiv(2 * multiprocessors, batch * q_tiles)))
    keys_per_split = triton.cdiv(key_tiles, splits) * block_n
    splits = triton.cdiv(num_keys, keys_per_split)
    q_view = q.view(torch.uint8) if q_fp8 else q
    k_view = keys.view(torch.uint8) if k_fp8 else keys
    placeholder = weights
    grid, wide = batch_grid(q_tiles, batch, splits)
    _indexer_logits_kernel[grid](
        q_view, k_view, q_scale if q_fp8 else placeholder, k_scale if k_scale is not None else placeholder, weights,
        k_start if k_start is not None else placeholder, k_end if k_end is not None else placeholder,
        block_table if block_table is not None else placeholder,
        cache_seqlens if cache_seqlens is not None else placeholder, out,
        q.stride(0), q.stride(1), q.stride(2), k_view.stride(0), k_view.stride(1), weights.stride(0), weights.stride(1),
        block_table.stride(0) if block_table is not None else 0, out.stride(0), out.stride(1),
        s_q, h_i, num_keys, keys_per_split, keys.shape[0],
        PAGED=paged, Q_FP8=q_fp8, K_FP8=k_fp8, K_SCALED=k_scaled, HW_FP8=hw_fp8, BLOCK_Q=block_q,
        H_PAD=h_pad, BLOCK_N=block_n, D_I=d_i, PAGE=PAGE_BLOCK_SIZE, INTERPRET=INTERPRET, F16=f16, FP8_MMA=fp8_mma,
        WIDE_BATCH=wide, num_warps=config.num_warps, num_stages=config.num_stages)
    return out


def indexer_logits(q, k, weights, k_start, k_end, q_scale=None, k_scale=None, config=None):
    """Same contract as `flashmla::indexer_logits` (for `supports` inputs; the caller has checked them)."""
    s_q, _, _ = q.shape
    out = q.new_empty(1, s_q, k.shape[0], dtype=torch.float32)
    _launch_logits(last_dim_contiguous(q)[None], last_dim_contiguous(k)[None], weights.contiguous()[None],
                   q_scale.contiguous()[None] if q_scale is not None else None,
                   k_scale.contiguous() if k_scale is not None else None, k_start.contiguous(), k_end.contiguous(),
                   None, None, out, paged=False, config=config)
    return out[0]


def indexer_logits_paged(q, index_cache, weights, block_table, cache_seqlens, q_scale=None, config=None):
    """Same contract as `flashmla::indexer_logits_paged` (for `supports` inputs; the caller has checked them)."""
    batch, s_q, _, _ = q.shape
    out = q.new_empty(batch, s_q, block_table.shape[1] * PAGE_BLOCK_SIZE, dtype=torch.float32)
    return _launch_logits(last_dim_contiguous(q), last_dim_contiguous(index_cache), weights.contiguous(),
                          q_scale.contiguous() if q_scale is not None else None, None, None, None,
                          block_table.contiguous(), cache_seqlens.contiguous(), out, paged=True, config=config)


def supports(q, keys) -> bool:
    """What the logits kernel is written for: bf16 or e4m3 q/k with a power-of-two d_i >= 16, 1 <= h_i <= 128 (no
    head: logits 0, the reference's); an FP8 paged cache's rows 4-byte aligned (each ends in its float32 scale)."""
    d_i, h_i = q.shape[-1], q.shape[-2]
    aligned = keys.dtype not in FP8_DTYPES or all(x % 4 == 0 for x in (keys.data_ptr(), *keys.stride()[:-1]))
    return (all(x.dtype in (torch.bfloat16, *FP8_DTYPES) for x in (q, keys)) and d_i >= 16 and d_i & (d_i - 1) == 0
            and 1 <= h_i <= 128 and aligned)
