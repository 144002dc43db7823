"""Dense paged MLA decode in Triton: split-KV partial attention, then a combine over the splits.

Query rows are the flattened `(s_q, h_q)` pairs of one sequence (all heads share the one latent KV head, MQA), tiled
`BLOCK_H` at a time. Each program of the split kernel walks `BLOCK_N`-token tiles of its share of the sequence, with
the 512-wide latent in four 128-column sub-tiles t (the FP8 cache's scale tiles, SPEC.md §3):
    s = sum_t scale_t * (q_t . k_t) + q_rope . k_rope     (576-wide logits, in base 2)
    online softmax; acc_t += (p * scale_t) . k_t          (the value is the latent)
so FP8 values are multiplied by their power-of-two scale through the products, never element by element. With
`LaunchConfig.fp8_f16` the FP8 products take f16 operands instead of bf16: e4m3 -> f16 is one conversion per pair
(to bf16 it goes through f16 and float32), q's latent is scaled per row by a power of two into f16's range (exact:
f16 has more significant bits than bf16), and each row of P times the tile scales is divided by 2**-14 times its
largest entry in the block (so it stays in range, and small weights stay normal), which multiplies the product back.
With q so scaled the logits' products take the tile scales over the power of two of each token's largest, and the sum
that power times q's inverse, so that no partial sum leaves float32's range where the logit does not (stop 46).
"""
import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._checks import contiguous_or_none, last_dim_contiguous
from ..decode import get_mla_metadata_reference
from ..kv_cache import FP8_BYTES, KV_LORA_RANK, PAGE_BLOCK_SIZE, ROPE_DIM
from .common import (INTERPRET, LOG2E, batch_grid, device_limits, f16_row_scaling, finish, fp8_values,
                     grid_position, hardware_fp8, latent_logits, launch_fitting, load_fp8_bytes, load_latent_subtile,
                     load_rope, load_tile_scale, mask_logits_apart, mma, nonempty, require_d_v, softmax_step,
                     softmax_weights, warpgroup_products)

ASSUME = tl.constexpr(hasattr(tl, "assume"))


@triton.jit
def _attend_tokens(Q, KV, BlockTable, batch, rows, row_mask, length, start, end, stride_qb, stride_qm,
                   stride_kv_block, stride_kv_row, stride_bt, num_pages, H_Q, S_Q, sm_scale_log2,
                   IS_FP8: tl.constexpr, HW_FP8: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_N: tl.constexpr, PAGE: tl.constexpr, D_NOPE: tl.constexpr, D_ROPE: tl.constexpr,
                   INTERPRET: tl.constexpr, F16: tl.constexpr, PREFETCH: tl.constexpr, RELOAD: tl.constexpr,
                   APART: tl.constexpr):
    """Online softmax of the query rows of sequence `batch` over its cache tokens [start, end): the four 128-column
    accumulators, the running max and sum (base 2). With PREFETCH (FP8 cache) the next tile's latent bytes are loaded
    while this tile's products run: the compiler's pipelining takes the RoPE columns and the scales (loaded into
    shared memory ahead) but not the latent bytes, which go through registers to their conversion. With RELOAD (FP8
    cache) P V loads the latent bytes again instead of keeping the logits' tiles: then each load feeds one product,
    so the compiler pipelines both through shared memory (`num_stages` tiles ahead, converted after their shared
    loads); the bytes come from L2 twice, from DRAM once (stop 51). With APART the logits are masked behind a branch
    (common.mask_logits_apart), each product scaled to base 2 before the sum."""
    TILE: tl.constexpr = D_NOPE // 4
    visible = _visible(length, rows, H_Q, S_Q, CAUSAL, BLOCK_H)
    q_rows = Q + batch * stride_qb + rows[:, None] * stride_qm
    q0 = tl.load(q_rows + 0 * TILE + tl.arange(0, TILE)[None, :], mask=row_mask[:, None], other=0.0)
    q1 = tl.load(q_rows + 1 * TILE + tl.arange(0, TILE)[None, :], mask=row_mask[:, None], other=0.0)
    q2 = tl.load(q_rows + 2 * TILE + tl.arange(0, TILE)[None, :], mask=row_mask[:, None], other=0.0)
    q3 = tl.load(q_rows + 3 * TILE + tl.arange(0, TILE)[None, :], mask=row_mask[:, None], other=0.0)
    q_rope = tl.load(q_rows + D_NOPE + tl.arange(0, D_ROPE)[None, :], mask=row_mask[:, None], other=0.0)
    F16_PRODUCTS: tl.constexpr = IS_FP8 and F16
    # Without hardware conversion e4m3_to_f16 gives the values times 2**-8: per-row factors of the logits and of the
    # P V products take the 2**8 back (in the tile scales it would pass float32's range from scales of 2**120).
    VALUE_BIAS: tl.constexpr = 256.0 if F16_PRODUCTS and not HW_FP8 else 1.0
    if F16_PRODUCTS:
        largest = tl.maximum(tl.maximum(tl.max(tl.abs(q0.to(tl.float32)), 1), tl.max(tl.abs(q1.to(tl.float32)), 1)),
                             tl.maximum(tl.max(tl.abs(q2.to(tl.float32)), 1), tl.max(tl.abs(q3.to(tl.float32)), 1)))
        q_multiplier, q_inverse = f16_row_scaling(largest)
        latent_back = q_inverse * VALUE_BIAS  # what the latent logits are multiplied back by (with each token's power)
        q0 = (q0.to(tl.float32) * q_multiplier[:, None]).to(tl.float16)
        q1 = (q1.to(tl.float32) * q_multiplier[:, None]).to(tl.float16)
        q2 = (q2.to(tl.float32) * q_multiplier[:, None]).to(tl.float16)
        q3 = (q3.to(tl.float32) * q_multiplier[:, None]).to(tl.float16)
    unit = sm_scale_log2  # what each of the logits' products is multiplied by: base 2 with APART, else after the sum
    if not APART:
        unit = 1.0
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_H, TILE], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_H, TILE], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_H, TILE], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_H, TILE], dtype=tl.float32)
    tl.static_assert(not RELOAD or (IS_FP8 and not PREFETCH), "RELOAD is for an FP8 cache, without PREFETCH")
    if PREFETCH:
        tl.static_assert(IS_FP8, "PREFETCH is for an FP8 cache")
        tokens = start + tl.arange(0, BLOCK_N)
        tok_mask = tokens < end
        rows_ahead = _page_rows(_table_page(BlockTable, batch, stride_bt, num_pages, start, end, PAGE), start,
                                stride_kv_block, stride_kv_row, BLOCK_N, PAGE)
        raw0, raw1, raw2, raw3 = _load_fp8_latent(KV, rows_ahead, tok_mask, TILE)
    else:  # the first tile's page; each step looks up the next one's (see _table_page)
        page_ahead = _table_page(BlockTable, batch, stride_bt, num_pages, start, end, PAGE)
    stop = _one_step_at_least(start, end)
    for tile_start in range(start, stop, BLOCK_N):
        tokens = tile_start + tl.arange(0, BLOCK_N)
        tok_mask = tokens < end
        if PREFETCH:  # this tile's rows and bytes came with the previous tile; the next tile's are loaded now
            row_offset = rows_ahead
            k0 = fp8_values(raw0, HW_FP8, F16)
            k1 = fp8_values(raw1, HW_FP8, F16)
            k2 = fp8_values(raw2, HW_FP8, F16)
            k3 = fp8_values(raw3, HW_FP8, F16)
            next_tokens = tokens + BLOCK_N
            next_mask = next_tokens < end
            next_page = _table_page(BlockTable, batch, stride_bt, num_pages, tile_start + BLOCK_N, end, PAGE)
            rows_ahead = _page_rows(next_page, tile_start + BLOCK_N, stride_kv_block, stride_kv_row, BLOCK_N, PAGE)
            raw0, raw1, raw2, raw3 = _load_fp8_latent(KV, rows_ahead, next_mask, TILE)
        else:
            row_offset = _page_rows(page_ahead, tile_start, stride_kv_block, stride_kv_row, BLOCK_N, PAGE)
            page_ahead = _table_page(BlockTable, batch, stride_bt, num_pages, tile_start + BLOCK_N, end, PAGE)
            k0, k1, k2, k3 = _load_latent(KV, row_offset, tok_mask, TILE, IS_FP8, HW_FP8, F16, None)
        k_rope = load_rope(KV, row_offset, tok_mask, IS_FP8, D_NOPE, D_ROPE, 4)
        s = mma(q_rope, tl.trans(k_rope), INTERPRET) * unit
        if IS_FP8:
            scale0 = load_tile_scale(KV, row_offset, tok_mask, 0, D_NOPE)
            scale1 = load_tile_scale(KV, row_offset, tok_mask, 1, D_NOPE)
            scale2 = load_tile_scale(KV, row_offset, tok_mask, 2, D_NOPE)
            scale3 = load_tile_scale(KV, row_offset, tok_mask, 3, D_NOPE)
            if F16_PRODUCTS:
                # q's rows are scaled up to [2**14, 2**15) here, so a tile's product times its scale could pass
                # float32's range before q's inverse brings it back (tile scales from 2**105 on). So the products
                # take their scales over the power of two of the token's largest (exact), and the sum that power
                # times q's inverse: finite wherever the logit is.
                largest_scale = tl.maximum(tl.maximum(scale0, scale1), tl.maximum(scale2, scale3))
                power, inverse_power = _power_of_two_below(largest_scale)
                latent = (mma(q0, tl.trans(k0), INTERPRET) * (scale0 * inverse_power)[None, :]
                          + mma(q1, tl.trans(k1), INTERPRET) * (scale1 * inverse_power)[None, :]
                          + mma(q2, tl.trans(k2), INTERPRET) * (scale2 * inverse_power)[None, :]
                          + mma(q3, tl.trans(k3), INTERPRET) * (scale3 * inverse_power)[None, :])
                s += latent * (latent_back[:, None] * (power * unit)[None, :])
            else:
                s += (mma(q0, tl.trans(k0), INTERPRET) * (scale0 * unit)[None, :]
                      + mma(q1, tl.trans(k1), INTERPRET) * (scale1 * unit)[None, :]
                      + mma(q2, tl.trans(k2), INTERPRET) * (scale2 * unit)[None, :]
                      + mma(q3, tl.trans(k3), INTERPRET) * (scale3 * unit)[None, :])
        else:
            s += (mma(q0, tl.trans(k0), INTERPRET) * unit + mma(q1, tl.trans(k1), INTERPRET) * unit
                  + mma(q2, tl.trans(k2), INTERPRET) * unit + mma(q3, tl.trans(k3), INTERPRET) * unit)
        if APART:
            s = mask_logits_apart(s, tokens[None, :] < visible[:, None], tile_start < stop)
        else:
            s = tl.where(tokens[None, :] < visible[:, None], s * sm_scale_log2, float("-inf"))
        m_new, p, alpha, l_i = softmax_weights(s, m_i, l_i)
        if RELOAD:  # P V's latent tiles: the same bytes again, by loads of their own
            k0, k1, k2, k3 = _load_latent(KV, row_offset, tok_mask, TILE, IS_FP8, HW_FP8, F16, ".cg")
        if F16_PRODUCTS:
            # Each row's weights p * scale over 2**-14 times the row's largest in the block: at most 2**14, in f16's
            # range, and every weight down to 2**-28 of the row's largest stays normal. Rows whose weights are all
            # below 2**-112 (none, or negligible next to an earlier block's) take top 1: they flush to zero. p over
            # top first, then the scale: p * (scale / top) could overflow to inf and, for a p of 0, give NaN.
            top = tl.max(p * largest_scale[None, :], 1) * (1.0 / 16384.0)
            top = tl.where(top >= 1.1754943508222875e-38, top, 1.0)  # float32's smallest normal: 1 / top finite
            p_over_top = p * (1.0 / top)[:, None]  # times each tile's scale: at most 2**14 (0 where p is)
            back = top * VALUE_BIAS
            acc0 = acc0 * alpha[:, None] + _scaled_product(p_over_top, scale0, k0, back, INTERPRET)
            acc1 = acc1 * alpha[:, None] + _scaled_product(p_over_top, scale1, k1, back, INTERPRET)
            acc2 = acc2 * alpha[:, None] + _scaled_product(p_over_top, scale2, k2, back, INTERPRET)
            acc3 = acc3 * alpha[:, None] + _scaled_product(p_over_top, scale3, k3, back, INTERPRET)
        elif IS_FP8:
            acc0 = acc0 * alpha[:, None] + mma((p * scale0[None, :]).to(tl.bfloat16), k0, INTERPRET)
            acc1 = acc1 * alpha[:, None] + mma((p * scale1[None, :]).to(tl.bfloat16), k1, INTERPRET)
            acc2 = acc2 * alpha[:, None] + mma((p * scale2[None, :]).to(tl.bfloat16), k2, INTERPRET)
            acc3 = acc3 * alpha[:, None] + mma((p * scale3[None, :]).to(tl.bfloat16), k3, INTERPRET)
        else:
            p16 = p.to(tl.bfloat16)
            acc0 = acc0 * alpha[:, None] + mma(p16, k0, INTERPRET)
            acc1 = acc1 * alpha[:, None] + mma(p16, k1, INTERPRET)
            acc2 = acc2 * alpha[:, None] + mma(p16, k2, INTERPRET)
            acc3 = acc3 * alpha[:, None] + mma(p16, k3, INTERPRET)
        m_i = m_new
    return acc0, acc1, acc2, acc3, m_i, l_i


@triton.jit
def _one_step_at_least(start, end):
    """Where the token loop over [start, end) stops, so that it takes at least one step: an empty range takes one step
    of masked tokens (no key: the accumulators, maximum and sum stay as they start). Told so (`tl.assume`, from
    Triton 3.3; before it the loop keeps its test), the compiler emits the loop without a path that skips it; on that
    path the accumulators came from moves, which made ptxas serialize every wgmma of the kernel (C7515; compiled for
    sm_90 by Triton 3.6 and 3.9, the split launches of 64-row tiles had every product waited for on its own,
    docs/HISTORY.md stop 57)."""
    stop = tl.maximum(end, start + 1)
    if ASSUME:
        tl.assume(stop > start)
    return stop


@triton.jit
def _visible(length, rows, H_Q, S_Q, CAUSAL: tl.constexpr, BLOCK_H: tl.constexpr):
    """How many of the sequence's tokens each query row sees: with CAUSAL query i of s_q sees [0, L - s_q + i]."""
    if CAUSAL:
        return (length - S_Q + rows // H_Q + 1).to(tl.int32)  # int32 also from int64 rows (WIDE_ROWS)
    return tl.zeros([BLOCK_H], dtype=tl.int32) + length


@triton.jit
def _attend_whole(Q, KV, BlockTable, batch, rows, row_mask, length, start, end, stride_qb, stride_qm,
                  stride_kv_block, stride_kv_row, stride_bt, num_pages, H_Q, S_Q, sm_scale_log2,
                  CAUSAL: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
                  D_NOPE: tl.constexpr, D_ROPE: tl.constexpr, INTERPRET: tl.constexpr, APART: tl.constexpr):
    """_attend_tokens over a BF16 cache with the latent as one 512-wide tile (LaunchConfig.whole): two products for
    the logits and one for P V into one accumulator, as the sparse kernels take them. Returns (acc, m_i, l_i)."""
    visible = _visible(length, rows, H_Q, S_Q, CAUSAL, BLOCK_H)
    q_rows = Q + batch * stride_qb + rows[:, None] * stride_qm
    q_nope = tl.load(q_rows + tl.arange(0, D_NOPE)[None, :], mask=row_mask[:, None], other=0.0)
    q_rope = tl.load(q_rows + D_NOPE + tl.arange(0, D_ROPE)[None, :], mask=row_mask[:, None], other=0.0)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, D_NOPE], dtype=tl.float32)
    page_ahead = _table_page(BlockTable, batch, stride_bt, num_pages, start, end, PAGE)
    stop = _one_step_at_least(start, end)
    for tile_start in range(start, stop, BLOCK_N):
        tokens = tile_start + tl.arange(0, BLOCK_N)
        tok_mask = tokens < end
        row_offset = _page_rows(page_ahead, tile_start, stride_kv_block, stride_kv_row, BLOCK_N, PAGE)
        page_ahead = _table_page(BlockTable, batch, stride_bt, num_pages, tile_start + BLOCK_N, end, PAGE)
        k_nope = tl.load(KV + row_offset[:, None] + tl.arange(0, D_NOPE)[None, :], mask=tok_mask[:, None], other=0.0)
        k_rope = load_rope(KV, row_offset, tok_mask, False, D_NOPE, D_ROPE, 4)
        s = latent_logits(q_nope, q_rope, k_nope, k_rope, tokens[None, :] < visible[:, None], tile_start < stop,
                          sm_scale_log2, INTERPRET, APART)
        m_i, l_i, acc = softmax_step(s, k_nope, m_i, l_i, acc, INTERPRET)
    return acc, m_i, l_i


@triton.jit
def _table_page(BlockTable, batch, stride_bt, num_pages, tile_start, end, PAGE: tl.constexpr):
    """The page of sequence `batch`'s tile that starts at `tile_start` (a tile lies in one page, _page_rows): one
    scalar lookup, page 0 from `end` on. The steps look up the next tile's page a step early (a loop-carried scalar):
    looked up in the step that loads the tile, as a tensor of one lookup a token before stop 54, the lookup was an
    async copy that the tile's own copies waited for, so each step waited for every copy in flight (stop 41). Table
    values are checked only on the CPU or with FLASHMLA_CHECK=1, so an entry outside the cache's `num_pages` pages
    reads page 0 instead (and the kernels cut a length at the table's capacity): wrong input gives a wrong output,
    never a read outside the cache or the table (as the CUDA kernels)."""
    page = tl.load(BlockTable + batch * stride_bt + tile_start // PAGE, mask=tile_start < end, other=0)
    return tl.where(page.to(tl.uint32) < num_pages, page, 0).to(tl.int64)  # negative entries are large unsigned


@triton.jit
def _page_rows(page, tile_start, stride_kv_block, stride_kv_row, BLOCK_N: tl.constexpr, PAGE: tl.constexpr):
    """The cache element offsets of the tile's tokens [tile_start, tile_start + BLOCK_N) in `page`: tiles start at
    multiples of BLOCK_N, a divisor of PAGE, so each lies in one page."""
    tl.static_assert(PAGE % BLOCK_N == 0, "a tile lies in one page")
    return page * stride_kv_block + (tile_start % PAGE + tl.arange(0, BLOCK_N)) * stride_kv_row


@triton.jit
def _load_latent(KV, row_offset, tok_mask, TILE: tl.constexpr, IS_FP8: tl.constexpr, HW_FP8: tl.constexpr,
                 F16: tl.constexpr, CACHE: tl.constexpr):
    """The rows' four latent tiles (columns [t * TILE, t * TILE + TILE)) as load_latent_subtile gives them; `CACHE`:
    the FP8 loads' cache modifier (None: the default)."""
    return (load_latent_subtile(KV, row_offset, tok_mask, 0 * TILE, TILE, IS_FP8, HW_FP8, F16, CACHE),
            load_latent_subtile(KV, row_offset, tok_mask, 1 * TILE, TILE, IS_FP8, HW_FP8, F16, CACHE),
            load_latent_subtile(KV, row_offset, tok_mask, 2 * TILE, TILE, IS_FP8, HW_FP8, F16, CACHE),
            load_latent_subtile(KV, row_offset, tok_mask, 3 * TILE, TILE, IS_FP8, HW_FP8, F16, CACHE))


@triton.jit
def _load_fp8_latent(KV, row_offset, tok_mask, TILE: tl.constexpr):
    """The e4m3 bytes of the rows' four latent scale tiles (columns [t * TILE, t * TILE + TILE))."""
    return (load_fp8_bytes(KV, row_offset, tok_mask, 0 * TILE, TILE),
            load_fp8_bytes(KV, row_offset, tok_mask, 1 * TILE, TILE),
            load_fp8_bytes(KV, row_offset, tok_mask, 2 * TILE, TILE),
            load_fp8_bytes(KV, row_offset, tok_mask, 3 * TILE, TILE))


@triton.jit
def _power_of_two_below(x):
    """(2**floor(log2 x), its inverse) for x in [2**-126, 2**127), from the exponent bits (both exact); 2**126 and its
    inverse from 2**127 on (x / 2**126 < 4: what it scales stays in range); for 0 (masked tokens' scales) and
    subnormals (0, 2**127): what they multiply stays 0 or vanishes."""
    exponent_bits = tl.minimum(x.to(tl.int32, bitcast=True) & 0x7F800000, 253 << 23)
    return exponent_bits.to(tl.float32, bitcast=True), ((254 << 23) - exponent_bits).to(tl.float32, bitcast=True)


@triton.jit
def _scaled_product(p_over_top, scale, k, back, INTERPRET: tl.constexpr):
    """(p * scale) @ k with f16 operands: p over its row's top (rows x tokens) times each token's tile scale is at
    most 2**14, in f16's range; the product is multiplied back by `back` (the row's top, times 2**8 where k is the e4m3
    values times 2**-8)."""
    return mma((p_over_top * scale[None, :]).to(tl.float16), k, INTERPRET) * back[:, None]


@triton.jit
def _partial_scaling(largest, l_i, ScalePartial, global_split, M, rows, row_mask):
    """f16 partials (see Partials): the power of two each row is multiplied by, from `largest`, the row's largest
    accumulator magnitude (over l_i, the normalised partial's); its inverse goes to ScalePartial."""
    multiplier, inverse = f16_row_scaling(largest / tl.where(l_i == 0.0, 1.0, l_i))
    tl.store(ScalePartial + global_split * M + rows, inverse, mask=row_mask)
    return multiplier


@triton.jit
def _store_all(acc0, acc1, acc2, acc3, m_i, l_i, Sink, Out, Lse, OutPartial, LsePartial, ScalePartial, batch,
               global_split, rows, row_mask, stride_ob, stride_om, stride_ps, stride_pm, M, S_Q, H_Q,
               SPLIT: tl.constexpr, APPLY_SINK: tl.constexpr, TILE: tl.constexpr, HALF_PARTIALS: tl.constexpr):
    heads = rows % H_Q
    multiplier = l_i  # a placeholder without f16 partials
    if SPLIT and HALF_PARTIALS:  # the row's largest magnitude over all four tiles sets its scaling (see Partials)
        largest = tl.maximum(tl.maximum(tl.max(tl.abs(acc0), 1), tl.max(tl.abs(acc1), 1)),
                             tl.maximum(tl.max(tl.abs(acc2), 1), tl.max(tl.abs(acc3), 1)))
        multiplier = _partial_scaling(largest, l_i, ScalePartial, global_split, M, rows, row_mask)
    accs = (acc0, acc1, acc2, acc3)
    for tile in tl.static_range(4):  # the LSE with the first tile's columns
        _store_rows(accs[tile], m_i, l_i, multiplier, tile * TILE, TILE, Sink, Out, Lse, OutPartial, LsePartial, batch,
                    global_split, rows, heads, row_mask, stride_ob, stride_om, stride_ps, stride_pm, M, S_Q, H_Q,
                    SPLIT, APPLY_SINK, tile == 0, HALF_PARTIALS)


@triton.jit
def _store_whole(acc, m_i, l_i, Sink, Out, Lse, OutPartial, LsePartial, ScalePartial, batch, global_split, rows,
                 row_mask, stride_ob, stride_om, stride_ps, stride_pm, M, S_Q, H_Q, SPLIT: tl.constexpr,
                 APPLY_SINK: tl.constexpr, D_V: tl.constexpr, HALF_PARTIALS: tl.constexpr):
    """_store_all for _attend_whole's one accumulator."""
    multiplier = l_i  # a placeholder without f16 partials
    if SPLIT and HALF_PARTIALS:
        multiplier = _partial_scaling(tl.max(tl.abs(acc), 1), l_i, ScalePartial, global_split, M, rows, row_mask)
    _store_rows(acc, m_i, l_i, multiplier, 0, D_V, Sink, Out, Lse, OutPartial, LsePartial, batch, global_split, rows,
                rows % H_Q, row_mask, stride_ob, stride_om, stride_ps, stride_pm, M, S_Q, H_Q, SPLIT, APPLY_SINK, True,
                HALF_PARTIALS)


@triton.jit
def _store_rows(acc, m_i, l_i, multiplier, COL0: tl.constexpr, WIDTH: tl.constexpr, Sink, Out, Lse, OutPartial,
                LsePartial, batch, global_split, rows, heads, row_mask, stride_ob, stride_om, stride_ps, stride_pm, M,
                S_Q, H_Q, SPLIT: tl.constexpr, APPLY_SINK: tl.constexpr, WRITE_LSE: tl.constexpr,
                HALF_PARTIALS: tl.constexpr):
    """Columns [COL0, COL0 + WIDTH) of the output: final (one split) or split `global_split`'s normalised partial
    (with HALF_PARTIALS in f16 times the row's `multiplier`, see Partials) and base-2 LSE (partials are
    `(splits, rows, d_v)` / `(splits, rows)` over the whole batch)."""
    cols = COL0 + tl.arange(0, WIDTH)
    if not SPLIT:
        out, lse = finish(acc, m_i, l_i, Sink, heads, row_mask, APPLY_SINK)
        tl.store(Out + batch * stride_ob + rows[:, None] * stride_om + cols[None, :], out.to(Out.dtype.element_ty),
                 mask=row_mask[:, None])
        if WRITE_LSE:  # lse is (batch, h_q, s_q): row r = (query r // h_q, head r % h_q)
            tl.store(Lse + batch * M + heads * S_Q + rows // H_Q, lse, mask=row_mask)
    else:
        empty = l_i == 0.0
        partial = acc / tl.where(empty, 1.0, l_i)[:, None]
        if HALF_PARTIALS:
            partial = (partial * multiplier[:, None]).to(tl.float16)
        base = global_split * stride_ps + rows * stride_pm
        tl.store(OutPartial + base[:, None] + cols[None, :], partial, mask=row_mask[:, None])
        if WRITE_LSE:
            partial_lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
            tl.store(LsePartial + global_split * M + rows, partial_lse, mask=row_mask)


@triton.jit
def _dense_decode_split_kernel(
        Q, KV, BlockTable, Seqlens, Sink, Out, Lse, OutPartial, LsePartial, ScalePartial,
        stride_qb, stride_qm, stride_kv_block, stride_kv_row, stride_bt, num_pages, max_blocks,
        stride_ob, stride_om, stride_ps, stride_pm,
        M, H_Q, S_Q, sm_scale_log2, num_splits,
        SPLIT: tl.constexpr, IS_FP8: tl.constexpr, HW_FP8: tl.constexpr, CAUSAL: tl.constexpr,
        APPLY_SINK: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
        D_NOPE: tl.constexpr, D_ROPE: tl.constexpr, INTERPRET: tl.constexpr, F16: tl.constexpr,
        PREFETCH: tl.constexpr, RELOAD: tl.constexpr, HALF_PARTIALS: tl.constexpr, APART: tl.constexpr,
        WHOLE: tl.constexpr = False, WIDE_BATCH: tl.constexpr = False, WIDE_ROWS: tl.constexpr = False):
    """Uniform schedule: program (row tile, sequence, split) takes an equal share of its sequence's tokens. The grid
    is common.batch_grid's (row tiles, sequences, splits). WIDE_ROWS: the rows in int64 (`wide_rows`)."""
    pid_m, batch, split = grid_position(tl.cdiv(M, BLOCK_H), WIDE_BATCH)
    rows = pid_m * BLOCK_H + tl.arange(0, BLOCK_H)
    if WIDE_ROWS:  # every row offset (q's, out's, the partials') in int64
        rows = rows.to(tl.int64)
    row_mask = rows < M
    length = tl.minimum(tl.load(Seqlens + batch), max_blocks * PAGE)  # past the table: unchecked input (_page_rows)
    tiles_per_split = tl.cdiv(tl.cdiv(length, BLOCK_N), num_splits)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, length)
    if WHOLE:
        acc, m_i, l_i = _attend_whole(
            Q, KV, BlockTable, batch, rows, row_mask, length, start, end, stride_qb, stride_qm, stride_kv_block,
            stride_kv_row, stride_bt, num_pages, H_Q, S_Q, sm_scale_log2, CAUSAL, BLOCK_H, BLOCK_N, PAGE, D_NOPE,
            D_ROPE, INTERPRET, APART)
        _store_whole(acc, m_i, l_i, Sink, Out, Lse, OutPartial, LsePartial, ScalePartial, batch,
                     batch * num_splits + split, rows, row_mask, stride_ob, stride_om, stride_ps, stride_pm, M, S_Q,
                     H_Q, SPLIT, APPLY_SINK, D_NOPE, HALF_PARTIALS)
    else:
        acc0, acc1, acc2, acc3, m_i, l_i = _attend_tokens(
            Q, KV, BlockTable, batch, rows, row_mask, length, start, end, stride_qb, stride_qm, stride_kv_block,
            stride_kv_row, stride_bt, num_pages, H_Q, S_Q, sm_scale_log2, IS_FP8, HW_FP8, CAUSAL, BLOCK_H, BLOCK_N,
            PAGE, D_NOPE, D_ROPE, INTERPRET, F16, PREFETCH, RELOAD, APART)
        _store_all(acc0, acc1, acc2, acc3, m_i, l_i, Sink, Out, Lse, OutPartial, LsePartial, ScalePartial, batch,
                   batch * num_splits + split, rows, row_mask, stride_ob, stride_om, stride_ps, stride_pm, M, S_Q, H_Q,
                   SPLIT, APPLY_SINK, D_NOPE // 4, HALF_PARTIALS)


@triton.jit
def _dense_decode_balanced_kernel(
        Q, KV, BlockTable, Seqlens, Metadata, SplitOffsets, OutPartial, LsePartial,
        stride_qb, stride_qm, stride_kv_block, stride_kv_row, stride_bt, num_pages, max_blocks, stride_ps, stride_pm,
        batch_size, num_slots, M, H_Q, S_Q, sm_scale_log2,
        IS_FP8: tl.constexpr, HW_FP8: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_H: tl.constexpr,
        BLOCK_N: tl.constexpr, PAGE: tl.constexpr, D_NOPE: tl.constexpr, D_ROPE: tl.constexpr,
        METADATA_FIELDS: tl.constexpr, INTERPRET: tl.constexpr, F16: tl.constexpr, PREFETCH: tl.constexpr,
        RELOAD: tl.constexpr, APART: tl.constexpr, WHOLE: tl.constexpr = False, WIDE_ROWS: tl.constexpr = False):
    """Balanced schedule (`get_mla_metadata`): program (row tile, part) walks its part's run of 64-token blocks, which
    may span several sequences, and writes one partial per sequence it touches; `SplitOffsets[b]` (the cumulative
    num_splits) places sequence b's partials, so one long sequence among short ones is spread over every SM.
    Whatever the metadata holds (made by hand, halves of two calls), a piece stays within the batch, its sequence's
    blocks and the `num_slots` partial slots: wrong metadata gives a wrong output, never an access outside them (as
    csrc/decode_common.cuh's for_each_piece). WIDE_ROWS: the rows in int64 (`wide_rows`)."""
    pid_m = tl.program_id(0)
    part = tl.program_id(1)
    rows = pid_m * BLOCK_H + tl.arange(0, BLOCK_H)
    if WIDE_ROWS:  # every row offset (q's, the partials') in int64
        rows = rows.to(tl.int64)
    row_mask = rows < M
    row_meta = Metadata + part * METADATA_FIELDS
    begin_batch = tl.maximum(tl.load(row_meta + 0), 0)
    begin_block = tl.load(row_meta + 1)
    end_batch = tl.load(row_meta + 2)
    end_block = tl.load(row_meta + 3)
    begin_split = tl.load(row_meta + 4)
    for batch in range(begin_batch, tl.minimum(end_batch, batch_size - 1) + 1):  # idle parts start past the batch
        length = tl.minimum(tl.load(Seqlens + batch), max_blocks * PAGE)  # past the table: unchecked (_page_rows)
        num_blocks = tl.maximum(tl.cdiv(length, PAGE), 0)
        first_block = tl.where(batch == begin_batch, tl.minimum(tl.maximum(begin_block, 0), num_blocks), 0)
        first_split = tl.load(SplitOffsets + batch).to(tl.int64)
        piece = tl.where(batch == begin_batch, begin_split, 0)  # of the sequence's pieces
        # the sequence's last piece runs to its end (as csrc/decode_common.cuh's for_each_piece): a schedule made for
        # other lengths of the same batch still covers every block
        last_piece = piece == tl.load(SplitOffsets + batch + 1) - first_split - 1
        stop_block = tl.where((batch == end_batch) & ~last_piece, tl.minimum(tl.maximum(end_block, 0), num_blocks),
                              num_blocks)
        start = first_block * PAGE
        end = tl.minimum(stop_block * PAGE, length)
        sequence = begin_batch.to(tl.int64) + (batch - begin_batch)
        global_split = tl.minimum(tl.maximum(first_split + piece, 0), num_slots - 1)
        if WHOLE:
            acc, m_i, l_i = _attend_whole(
                Q, KV, BlockTable, sequence, rows, row_mask, length, start, end, stride_qb, stride_qm,
                stride_kv_block, stride_kv_row, stride_bt, num_pages, H_Q, S_Q, sm_scale_log2, CAUSAL, BLOCK_H,
                BLOCK_N, PAGE, D_NOPE, D_ROPE, INTERPRET, APART)
            _store_whole(acc, m_i, l_i, LsePartial, OutPartial, LsePartial, OutPartial, LsePartial, LsePartial, batch,
                         global_split, rows, row_mask, 0, 0, stride_ps, stride_pm, M, S_Q, H_Q, True, False, D_NOPE,
                         False)
        else:
            acc0, acc1, acc2, acc3, m_i, l_i = _attend_tokens(
                Q, KV, BlockTable, sequence, rows, row_mask, length, start, end, stride_qb, stride_qm,
                stride_kv_block, stride_kv_row, stride_bt, num_pages, H_Q, S_Q, sm_scale_log2, IS_FP8, HW_FP8, CAUSAL,
                BLOCK_H, BLOCK_N, PAGE, D_NOPE, D_ROPE, INTERPRET, F16, PREFETCH, RELOAD, APART)
            _store_all(acc0, acc1, acc2, acc3, m_i, l_i, LsePartial, OutPartial, LsePartial, OutPartial, LsePartial,
                       LsePartial, batch, global_split, rows, row_mask, 0, 0, stride_ps, stride_pm, M, S_Q, H_Q, True,
                       False, D_NOPE // 4, False)


@triton.jit
def _combine_kernel(OutPartial, LsePartial, ScalePartial, SplitOffsets, Sink, Out, Lse,
                    stride_ps, stride_pm, stride_ob, stride_om, M, H_Q, S_Q, num_splits, num_slots,
                    VARIABLE: tl.constexpr, SPLIT_CHUNK: tl.constexpr, APPLY_SINK: tl.constexpr,
                    COLUMNS: tl.constexpr, HALF_PARTIALS: tl.constexpr, LSE_CHUNK: tl.constexpr,
                    WIDE_BATCH: tl.constexpr = False):
    """Columns [column_part * COLUMNS, (column_part + 1) * COLUMNS) of one query row: out = sum_s w_s out_s with
    w_s = exp(lse_s - lse), lse = log sum_s exp(lse_s) (base 2 inside; column part 0 stores it). Sequence b's
    partials are splits [first, first + count) of the batch-wide `(splits, rows, d_v)` buffer: `num_splits` each
    (uniform) or per `SplitOffsets` (VARIABLE), cut to the buffer's `num_slots` (SplitOffsets that are not
    get_mla_metadata's give a wrong output, never a read outside the buffer). The grid is common.batch_grid's (rows,
    sequences, column parts: combine_parts). The row's largest LSE first (LSE_CHUNK at a time: one step up to that
    many splits), then the partials SPLIT_CHUNK at a time, lane j of the chunk summing its splits j, j + SPLIT_CHUNK,
    ... at their final weights (no rescaling), the lanes meeting once at the end: a step's loads wait on nothing of the
    step before and no step reduces across warps. Every slot below `count` is loaded (allocated, written or not) and a
    split that saw nothing (lse -inf) is selected away."""
    row, batch, column_part = grid_position(M, WIDE_BATCH)
    rows = row + tl.arange(0, 1)
    row_offset = row.to(tl.int64)  # times d_v: past int32 from M > 2**22 rows (wide_rows)
    splits = tl.arange(0, SPLIT_CHUNK)
    if VARIABLE:
        offset = tl.load(SplitOffsets + batch).to(tl.int64)
        first_split = tl.minimum(tl.maximum(offset, 0), num_slots)
        count = tl.minimum(tl.maximum(tl.load(SplitOffsets + batch + 1) - offset, 0), num_slots - first_split)
    else:
        first_split = batch * num_splits
        count = num_splits
    lse_base = LsePartial + first_split * M + row
    scale_base = ScalePartial + first_split * M + row
    cols = column_part * COLUMNS + tl.arange(0, COLUMNS)
    lse_lanes = tl.arange(0, LSE_CHUNK)
    running_max = tl.full([LSE_CHUNK], float("-inf"), dtype=tl.float32)
    for first in range(0, count, LSE_CHUNK):  # the row's largest LSE: one step up to LSE_CHUNK splits
        lse_chunk = tl.load(lse_base + (first + lse_lanes) * M, mask=first + lse_lanes < count, other=float("-inf"))
        running_max = tl.maximum(running_max, lse_chunk)
    m = tl.max(running_max, 0)
    shift = tl.where(m == float("-inf"), 0.0, m)
    lane_sum = tl.zeros([SPLIT_CHUNK], dtype=tl.float32)
    lane_acc = tl.zeros([SPLIT_CHUNK, COLUMNS], dtype=tl.float32)
    for first in range(0, count, SPLIT_CHUNK):
        inside = first + splits < count
        lse_chunk = tl.load(lse_base + (first + splits) * M, mask=inside, other=float("-inf"))
        part = tl.load(OutPartial + (first_split + first + splits)[:, None] * stride_ps + row_offset * stride_pm
                       + cols[None, :], mask=inside[:, None], other=0.0).to(tl.float32)
        weight = tl.exp2(lse_chunk - shift)  # 0 for a split that saw nothing
        factor = weight
        if HALF_PARTIALS:  # each split's rows times the power of two that undoes its scaling (see Partials)
            factor *= tl.load(scale_base + (first + splits) * M, mask=inside, other=0.0)
        factor = tl.where(weight > 0, factor, 0.0)
        lane_acc += tl.where(weight[:, None] > 0, part, 0.0) * factor[:, None]
        lane_sum += weight
    acc = tl.sum(lane_acc, 0)
    l_i = tl.zeros([1], dtype=tl.float32) + tl.sum(lane_sum, 0)
    m_i = tl.zeros([1], dtype=tl.float32) + shift
    out, lse = finish(acc[None, :], m_i, l_i, Sink, rows % H_Q, rows < M, APPLY_SINK)
    tl.store(Out + batch * stride_ob + row_offset * stride_om + cols[None, :], out.to(Out.dtype.element_ty))
    tl.store(Lse + batch * M + (rows % H_Q) * S_Q + rows // H_Q, lse, mask=rows * 0 + column_part == 0)


@triton.jit
def _combine_few_kernel(OutPartial, LsePartial, ScalePartial, Sink, Out, Lse, stride_ps, stride_pm, stride_ob,
                        stride_om, M, H_Q, S_Q, num_splits, SPLITS: tl.constexpr, ROWS: tl.constexpr,
                        APPLY_SINK: tl.constexpr, COLUMNS: tl.constexpr, HALF_PARTIALS: tl.constexpr,
                        WIDE_BATCH: tl.constexpr = False):
    """_combine_kernel's merge for a uniform split into at most SPLITS (a power of two) splits, ROWS query rows of a
    sequence a program: every load of the program (the LSEs, the scales, the partials) is issued at once, so it waits
    on one round of loads where _combine_kernel waits on two (the LSEs' pass, then the partials'). The grid is
    common.batch_grid's (row tiles, sequences)."""
    tile, batch, _ = grid_position(tl.cdiv(M, ROWS), WIDE_BATCH)
    rows = tile * ROWS + tl.arange(0, ROWS)
    row_mask = rows < M
    row_offsets = rows.to(tl.int64)  # times d_v: past int32 from M > 2**22 rows (wide_rows)
    splits = tl.arange(0, SPLITS)
    cols = tl.arange(0, COLUMNS)
    slots = batch * num_splits + splits
    inside = row_mask[:, None] & (splits < num_splits)[None, :]
    stats = slots[None, :] * M + rows[:, None]
    split_lse = tl.load(LsePartial + stats, mask=inside, other=float("-inf"))
    part = tl.load(OutPartial + slots[None, :, None] * stride_ps + row_offsets[:, None, None] * stride_pm
                   + cols[None, None, :], mask=inside[:, :, None], other=0.0).to(tl.float32)
    factor = tl.full([ROWS, SPLITS], 1.0, dtype=tl.float32)
    if HALF_PARTIALS:  # each split's rows times the power of two that undoes its scaling (see Partials)
        factor = tl.load(ScalePartial + stats, mask=inside, other=0.0)
    m = tl.max(split_lse, 1)
    shift = tl.where(m == float("-inf"), 0.0, m)
    weight = tl.exp2(split_lse - shift[:, None])  # 0 for a split that saw nothing
    factor = tl.where(weight > 0, weight * factor, 0.0)
    acc = tl.sum(tl.where(weight[:, :, None] > 0, part, 0.0) * factor[:, :, None], 1)
    out, lse = finish(acc, shift, tl.sum(weight, 1), Sink, rows % H_Q, row_mask, APPLY_SINK)
    tl.store(Out + batch * stride_ob + row_offsets[:, None] * stride_om + cols[None, :],
             out.to(Out.dtype.element_ty), mask=row_mask[:, None])
    tl.store(Lse + batch * M + (rows % H_Q) * S_Q + rows // H_Q, lse, mask=row_mask)


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and launch shape of the split kernel. `programs_per_sm`: how many split programs to aim for per SM
    (sets the number of splits or parts); `block_h`: query rows per program; `schedule`: "uniform" (every sequence
    split into the same number of equal shares, by shape alone) or "balanced" (the batch's 64-token blocks divided
    evenly over the programs by `get_mla_metadata`, whatever the mix of lengths); `fp8_f16`: an FP8 cache's products
    in f16 instead of bf16 (see the module's docstring); `prefetch`: an FP8 cache's next tile of latent bytes loaded
    into registers while the current tile's products run (the default up to 16 rows, see default_config); `maxnreg`:
    a cap on registers per thread (None: the compiler's choice), so that more programs fit an SM's 64K registers:
    compiled for sm_90, FP8 16 x 16 tiles with the f16 products and the prefetch take 171 registers (two programs of
    4 warps per SM), capped at 168 (three) they keep 24 bytes of stack (opt-in: timed in stop 21 at 1182.6 us on fp8
    b128 h16 16k, slower than the default's 1035.7; see default_config); `reload` (FP8 cache, not with `prefetch`):
    P V loads its latent tiles again rather than keeping the logits' (_attend_tokens' RELOAD): compiled by Triton 3.6
    for sm_90 at 16 rows x 32 tokens, every latent load is then a pipelined cp.async (35 async copies against the
    prefetch's 15), 255 registers and no spill, 57 KB of shared memory; sm_80 and sm_89 likewise. Opt-in: timed on
    the H200 (stop 51, docs/bench/stop51_call1.log) 1-4% faster than the prefetch on fp8 h16 rows of one query (b128
    16k 1027.5 against 1062.5 us), 4% slower on b128 s_q2 h8 4k. `apart_logits`: the logits masked behind a branch
    (common.mask_logits_apart), so that with 64 rows and 8 warps their products split over the two warpgroups
    instead of both computing all of them (compiled for sm_90: 36 m64n32k16 a warpgroup a tile against 72): Hopper's
    default at 64 rows since stop 54, 11-15% faster on the h128 rows (H100, docs/bench/stop54_call1.log: b128 h128
    4k 515.6-521.3 against 586.0-588.4 us, s_q2 974.9-987.9 against 1145.1-1146.3), b1 h128 32k level (61.5-61.7
    against 62.2). Not at 16 warps: four warpgroups then split the logits 4 x 16 tokens, 1.07x-1.3x slower on every
    h128 row (stop54_call4.log). `whole` (a BF16 cache; ignored for FP8): the latent as one 512-wide tile, so that
    the logits take two products and P V one into one accumulator (_attend_whole, as the sparse kernels), where the
    default takes four 128-column tiles (the FP8 cache's scale tiles) and waits for each of the logits' five products
    on its own. Compiled for sm_90 by Triton 3.6 at 64 x 64, two stages, apart: 36 m64n32k16 wgmmas a tile in two
    waits, 255 registers, no spill. Hopper's default for a BF16 cache at 64 rows x 64 tokens since stop 58 (see
    default_config)."""
    block_h: int
    block_n: int
    num_warps: int
    num_stages: int
    programs_per_sm: float
    schedule: str = "uniform"
    fp8_f16: bool = False
    prefetch: bool = False
    maxnreg: int | None = None
    reload: bool = False
    apart_logits: bool = False
    whole: bool = False


def default_config(batch: int, rows: int, device: torch.device, is_fp8: bool = False) -> LaunchConfig:
    """Chosen from `bench_decode.py --tune` on the H100 (2026-11-24): 64-token tiles; 64-row tiles (3 stages until
    stop 54, two since: below) and one program per SM where heads alone fill the GPU (compute-bound), and 32-row tiles
    with two programs per SM where they do not (batch 1, long context: more, lighter programs; with Hopper's shared
    memory mostly 64-row tiles there too since stop 43, below). The balanced schedule stays opt-in: timed on the H100
    (2026-11-25) it halved a skewed batch (one 32k sequence among 31 of 512 tokens) but was 1.3x to 2.4x slower on
    every uniform SPEC row. On the H200 (2026-12-02, docs/bench/combine_h200.log):
    - up to 16 rows, two programs per SM from 8 sequences on (with num_splits_for's rounding down): b8 h16 32k 96.8
      against 121.7 us, b32 32k 300.4 against 391.5, b128 4k and 32k unchanged; below 8 sequences one per SM
      (b1 h16 32k: 41.8 against 77.8, where two would cut the sequence into 256 pieces of two tiles);
    - an FP8 cache up to 16 rows takes 32-token tiles and the f16 products: fp8 b128 h16 16k 1384.6 us against 1429.5
      with bf16 products and 1467.8 for 64-token tiles (compiled for sm_90 with the launch's specialization, Triton
      3.9: 64 tokens with bf16 products spill 328 bytes a thread, 32 tokens 8, 32 tokens with f16 products 136);
    - and the next tile's latent bytes prefetched into registers (stop 20, docs/bench/stop20_call1.log): 1109.6 us
      against 1364.8 without, the fastest of the 32 configs timed on fp8 b128 h16 16k (bf16 products with the
      prefetch 1161.3; 64-token tiles with it 1206.8 at 8 warps, 2928.0 at 4), with 3 stages (stop 21,
      docs/bench/stop21_call1.log): 1035.7 against 1110.8 us with 2; 16-token tiles at 3 programs per SM (168
      registers, `maxnreg`) 1182.6.
    With Hopper's shared memory (64-token tiles), 64-row tiles at one program per SM also where the batch's tiles do
    not fill the GPU, from 64 rows, and over an FP8 cache from 17 (stop 43, docs/bench/stop43_call{3,4}.log, against
    32-row tiles at two per SM, us): BF16 b1 h128 32k 57.6, 57.1 against 60.2, 61.2, b8 h64 8k 58.4, 58.3 against
    66.2, 65.9, b128 h64 4k 307.4, 309.5 against 332.8, 332.4, level at b1 s_q2 h64, 3% slower at b16 and b32 h128 4k
    (108.6, 198.1 against 105.1, 193.3); FP8 up to 1.8x faster (b128 h64 4k 551.0 against 1008.4, b128 s_q2 h16 4k
    549.1 against 628.1), level at h32. BF16 below 64 rows keeps 32-row tiles: b128 s_q2 h16 4k took 311.7 us with
    64-row ones against 199.2, b128 h32 4k 303.7 against 253.1 (faster only at small batches: b1 h32 32k 44.5 against
    50.6). Elsewhere (32-token tiles, mma.sync) not timed: 32-row tiles as before.
    Since stop 54 the 64-row tiles take two stages: with each tile's page looked up a step early (_table_page) the
    pipeline holds a tile more, and three stages at 64 tokens would take 296 KiB; on Hopper they mask their logits
    apart (`apart_logits`). Against stop 54's first kernel (three stages, the lookup inside the step; that lookup at
    two stages was not timed, so the 64-row rows' gain is the lookup and the stages together) on the H100
    (docs/bench/stop54_call5.log), us: b128 h128 4k 478.0-481.0 against 522.5-524.5, s_q2 872.1-892.4 against
    982.8-993.7, b1 h128 32k 58.2-59.8 against 60.7-61.7, fp8 b128 h16 16k 969.8-989.6 against 1053.3-1069.2, b8
    h16 32k 116.0-116.1 against 118.1-119.2, the b128 h16 rows level.
    Since stop 58 those 64-row tiles over a BF16 cache take the latent whole (`whole`): on the H200
    (docs/bench/stop58_call1.log, us) b128 h128 4k 439.4 against 466.2, s_q2 819.2 against 890.6, b1 h128 32k 48.8
    against 49.1; at 32 tokens and three stages it was slower on all three (52.2, 512.0, 1023.4)."""
    multiprocessors, shared_memory = device_limits(device)
    block_n = 64 if shared_memory >= 200 * 1024 else 32
    if rows <= 16:
        programs_per_sm = 2 if batch >= 8 else 1
        if is_fp8:
            return LaunchConfig(block_h=16, block_n=32, num_warps=4, num_stages=3, programs_per_sm=programs_per_sm,
                                fp8_f16=True, prefetch=True)
        return LaunchConfig(block_h=16, block_n=block_n, num_warps=4, num_stages=2, programs_per_sm=programs_per_sm)
    fills_gpu = rows >= 64 and batch * triton.cdiv(rows, 64) >= multiprocessors
    if fills_gpu or (block_n == 64 and (rows >= 64 or is_fp8)):
        apart = warpgroup_products(device)
        return LaunchConfig(block_h=64, block_n=block_n, num_warps=8, num_stages=2, programs_per_sm=1,
                            apart_logits=apart, whole=apart and block_n == 64 and not is_fp8)
    return LaunchConfig(block_h=32, block_n=block_n, num_warps=4, num_stages=2, programs_per_sm=2)


def wide_rows(rows: int, *row_strides: int) -> bool:
    """Whether the row offsets of a launch over `rows` query rows a sequence (a row index times a row stride: q's,
    out's, the partials') can pass int32, where the decode kernels then take their rows in int64 (WIDE_ROWS): from
    s_q * h_q * 576 >= 2**31, a prompt of 29k tokens at h_q 128 continued through the decode path (it read q's rows
    and wrote the output's at wrapped, negative offsets). Only those launches: compiled for sm_90, int64 row offsets
    in every launch took the balanced kernel's spills from 112 to 140 bytes a thread (64-row BF16 tiles, causal)
    and from 252 to 412 (the latent whole), so every other launch keeps its code."""
    return rows * max(row_strides) >= 2 ** 31


def fitting_configs(config: LaunchConfig) -> list[LaunchConfig]:
    """`config`, then smaller tiles for launch_fitting: 32 and 16 rows x 32 keys, two programs per SM. Compiled for
    sm_89, 64 rows x 32 keys take 112 KiB of shared memory, more than the 99 KiB of Ada and consumer Blackwell;
    32 x 32 take 76."""
    smaller = [dataclasses.replace(config, block_h=block_h, block_n=32, num_warps=4, num_stages=2, programs_per_sm=2,
                                   apart_logits=False, whole=False) for block_h in (32, 16) if block_h < config.block_h]
    return [config, *smaller]


def num_splits_for(batch: int, row_tiles: int, capacity_tiles: int, multiprocessors: int,
                   programs_per_sm: float) -> int:
    """Splits per sequence so that at most `programs_per_sm` programs per SM are in flight where the batch's row tiles
    alone are fewer (rounded down: a rounding up leaves a tail wave, b8 h16 32k with one per SM took 17 splits, 136
    programs on 132 SMs), at least one; static (shapes only), so that the launch is the same for every
    `cache_seqlens` (CUDA graphs)."""
    programs = max(1, batch * row_tiles)
    return max(1, min(int(programs_per_sm * multiprocessors // programs), capacity_tiles, 256))


def dense_decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, is_fp8, attn_sink=None,
                 config: LaunchConfig | None = None, tile_scheduler_metadata=None, num_splits=None):
    """Triton dense decode; same contract as `flashmla::dense_decode` for d_qk 576 / d_v 512 and bf16 q. The balanced
    schedule uses `tile_scheduler_metadata` / `num_splits` from `get_mla_metadata` when given, else computes them
    (on the device, no host sync)."""
    require_d_v("dense_decode", "head_dim_v", head_dim_v)
    batch, s_q, h_q, d_qk = q.shape
    rows = s_q * h_q
    out = q.new_empty(batch, s_q, h_q, head_dim_v, dtype=torch.bfloat16)
    lse = q.new_empty(batch, h_q, s_q, dtype=torch.float32)
    if batch == 0 or rows == 0:
        return out, lse
    q_rows = q.reshape(batch, rows, d_qk)
    cache = nonempty(kv_cache.view(torch.uint8) if is_fp8 else kv_cache)
    # The kernels read the lengths, the sink, the metadata and a block-table row as packed (strided views copied).
    block_table, cache_seqlens = last_dim_contiguous(block_table), cache_seqlens.contiguous()
    attn_sink, tile_scheduler_metadata, num_splits = map(contiguous_or_none,
                                                         (attn_sink, tile_scheduler_metadata, num_splits))
    multiprocessors, _ = device_limits(q.device)
    max_blocks = min(block_table.shape[1], (2 ** 31 - 1) // PAGE_BLOCK_SIZE)  # its tokens fit int32, as the lengths
    variant = dict(IS_FP8=is_fp8, HW_FP8=hardware_fp8(q.device), CAUSAL=causal)
    int64_rows = wide_rows(rows, q_rows.stride(1), head_dim_v)  # out's and the partials' rows: head_dim_v apart

    def launch(config: LaunchConfig) -> None:
        row_tiles = triton.cdiv(rows, config.block_h)
        common = dict(BLOCK_H=config.block_h, BLOCK_N=config.block_n, PAGE=PAGE_BLOCK_SIZE, D_NOPE=KV_LORA_RANK,
                      D_ROPE=ROPE_DIM, INTERPRET=INTERPRET, F16=config.fp8_f16 and is_fp8,
                      PREFETCH=config.prefetch and is_fp8, RELOAD=config.reload and is_fp8, APART=config.apart_logits,
                      WHOLE=config.whole and not is_fp8, WIDE_ROWS=int64_rows,
                      num_warps=config.num_warps, num_stages=config.num_stages, **variant)
        if config.maxnreg is not None:
            common["maxnreg"] = config.maxnreg
        if config.schedule == "balanced":
            metadata, splits = tile_scheduler_metadata, num_splits
            if metadata is None or splits is None:
                parts = max(1, round(config.programs_per_sm * multiprocessors / row_tiles))
                metadata, splits = get_mla_metadata_reference(cache_seqlens, parts)
            parts = metadata.shape[0]
            partials = Partials.empty(out, batch + parts, half=False)  # >= splits[-1] splits of a row tile each
            _dense_decode_balanced_kernel[(row_tiles, parts)](
                q_rows, cache, block_table, cache_seqlens, metadata, splits, partials.out, partials.lse,
                q_rows.stride(0), q_rows.stride(1), cache.stride(0), cache.stride(1), block_table.stride(0),
                cache.shape[0], max_blocks, partials.out.stride(0), partials.out.stride(1), batch,
                partials.out.shape[0], rows, h_q, s_q, softmax_scale * LOG2E, METADATA_FIELDS=metadata.shape[1],
                **common)
            combine(partials, attn_sink, out, lse, split_offsets=splits)
            return
        capacity_tiles = triton.cdiv(block_table.shape[1] * PAGE_BLOCK_SIZE, config.block_n)
        splits = num_splits_for(batch, row_tiles, capacity_tiles, multiprocessors, config.programs_per_sm)
        partials = split_buffers(out, lse, splits)
        sink = attn_sink if attn_sink is not None else lse
        out_rows = out.view(batch, rows, head_dim_v)
        grid, wide = batch_grid(row_tiles, batch, splits)
        _dense_decode_split_kernel[grid](
            q_rows, cache, block_table, cache_seqlens, sink, out_rows, lse, *partials,
            q_rows.stride(0), q_rows.stride(1), cache.stride(0), cache.stride(1), block_table.stride(0),
            cache.shape[0], max_blocks, out_rows.stride(0), out_rows.stride(1),
            partials.out.stride(-3) if splits > 1 else 0, partials.out.stride(-2) if splits > 1 else 0, rows, h_q, s_q,
            softmax_scale * LOG2E, splits,
            SPLIT=splits > 1, APPLY_SINK=attn_sink is not None, HALF_PARTIALS=partials.half, WIDE_BATCH=wide,
            **common)
        if splits > 1:
            combine(partials, attn_sink, out, lse)

    # A config the caller gives is run as it is (bench_decode.py --tune times it); the default may give way to
    # smaller tiles on GPUs with less shared memory per block than Hopper's.
    configs = [config] if config is not None else fitting_configs(default_config(batch, rows, q.device, is_fp8))
    launch_fitting(("dense_decode", configs[0], *variant.items(), attn_sink is not None, q.device), configs, launch)
    return out, lse


# Sequences split at least this many ways keep their split partials in f16 (see Partials); tests lower it.
HALF_PARTIALS_FROM_SPLITS = 8


class Partials(NamedTuple):
    """The split kernels' partial results, which `combine` merges. `out` `(..., s_q * h_q, d_v)` contiguous over its
    splits: each split's normalised output rows, float32, or (`half`) f16 rows each times a power of two that puts
    the row's largest magnitude in [2**14, 2**15) (common.f16_row_scaling), so that every value down to 2**-28 of it
    keeps f16's 11 significant bits (the bf16 output keeps 8) in half the bytes (the CUDA kernels' split partials,
    stop 38); `lse` `(..., s_q * h_q)` float32: the base-2 LSE (-inf for a split that saw nothing); `scale` likewise
    (half only; else a placeholder): the power of two that multiplies a row of `out` back. Uniform:
    `(batch, num_splits, ...)`; balanced: `(splits, ...)`. Half from HALF_PARTIALS_FROM_SPLITS splits a sequence:
    timed on the H200 (stop 42 call 3, docs/bench/stop42_call3.log) with f16 partials at every split count, b1 h128
    32k (66 splits) took 61.2-61.3 us against 65.3-65.4 and b8 h16 32k (33) 94.7-95.6 against 95.7-96.2, but the
    2-split rows were slower: b128 h16 4k 172.7-176.8 against 166.2-169.0, fp8 b128 h16 16k 1137.5-1148.9 against
    1041.1-1045.2, sparse fp8 b64 h64 132.8-133.4 against 119.2-119.6; and again on the H100 with stop 59's one-pass
    combine (stop 61, docs/bench/stop61_call1_partials_ab.log, f16 at two splits against float32): b128 h16 4k 218.9,
    217.9 against 211.7, 211.2, 16k 791.9, 792.5 against 786.5, 786.8, sparse fp8 b64 h64 124.3, 122.8 against 110.0,
    109.6."""
    out: torch.Tensor
    lse: torch.Tensor
    scale: torch.Tensor

    @property
    def half(self) -> bool:
        return self.out.dtype == torch.float16

    @staticmethod
    def empty(out: torch.Tensor, *splits: int, half: bool) -> "Partials":
        """Partials of `out`'s `(batch, s_q, h_q, d_v)` rows over `splits` (the leading dimensions)."""
        batch, s_q, h_q, d_v = out.shape
        stats = out.new_empty(1 + half, *splits, s_q * h_q, dtype=torch.float32)
        return Partials(out.new_empty(*splits, s_q * h_q, d_v, dtype=torch.float16 if half else torch.float32),
                        stats[0], stats[-1])


def split_buffers(out, lse, num_splits) -> Partials:
    """Partials `(batch, num_splits, ...)` for `combine`, in f16 from HALF_PARTIALS_FROM_SPLITS splits; with one split
    the kernels write `out` / `lse` directly and these are placeholders."""
    if num_splits == 1:
        return Partials(out, lse, lse)
    return Partials.empty(out, out.shape[0], num_splits, half=num_splits >= HALF_PARTIALS_FROM_SPLITS)


# The combine's programs sum at most COMBINE_TILE values a step (SPLIT_CHUNK splits x COLUMNS): 16 splits of a whole
# row, or, where the batch's rows are fewer than the SMs (b1 h16 32k: 16 rows of 132 splits), each row in up to
# COMBINE_MAX_PARTS column parts that read more splits a step. Timed on the H100 (stop 59,
# docs/bench/stop59_call3_combine_ab.log, us, the whole op): b1 h16 32k 30.1 in four parts against 33.6 in one, but
# from 128 rows on (b1 h128 32k, b8 h16 32k, b2 h64 16k) parts were 1-9% slower.
COMBINE_TILE = 16 * KV_LORA_RANK
COMBINE_MAX_PARTS = 4
COMBINE_LSE_CHUNK = 128  # the LSEs' pass: one step up to 128 splits
# A uniform split into at most COMBINE_FEW_SPLITS splits a sequence (the launches of two: sparse decode b64 h64, the
# b128 h16 rows) is merged by _combine_few_kernel, COMBINE_FEW_TILE // splits rows a program (four at two splits).
# Timed on the H100 against _combine_kernel (stop 61, docs/bench/stop61_call3_few_combine_ab.log, the whole op, us):
# sparse FP8 decode b64 h64 107.9, 108.4 against 110.3, 110.2; the dense b128 h16 rows (4k, 16k, FP8 16k) within
# their noise; sixteen values a column (eight rows at two splits) 107.8, 107.4 on b64 h64, level elsewhere.
COMBINE_FEW_SPLITS = 8
COMBINE_FEW_TILE = 8


def combine_parts(programs: int, multiprocessors: int) -> int:
    """Column parts per row for a combine of `programs` rows: the most (a power of two up to COMBINE_MAX_PARTS) that
    keep the launch within one program an SM."""
    parts = 1
    while parts < COMBINE_MAX_PARTS and programs * parts * 2 <= multiprocessors:
        parts *= 2
    return parts


def combine(partials: Partials, attn_sink, out, lse, split_offsets=None) -> None:
    """Merge split partials into `out` `(batch, s_q, h_q, d_v)` and `lse` `(batch, h_q, s_q)`. Uniform: partials
    `(batch, num_splits, ...)` (at most COMBINE_FEW_SPLITS: _combine_few_kernel); with `split_offsets` `(batch + 1,)`
    int32 (cumulative), sequence b owns splits `[split_offsets[b], split_offsets[b + 1])` of flat `(splits, ...)`
    partials."""
    batch, s_q, h_q, d_v = out.shape
    rows = s_q * h_q
    out_rows = out.view(batch, rows, d_v)
    out_partial = partials.out
    num_splits = out_partial.shape[1] if split_offsets is None else 0
    if 0 < num_splits <= COMBINE_FEW_SPLITS:
        splits = triton.next_power_of_2(num_splits)
        row_tile = max(1, COMBINE_FEW_TILE // splits)
        grid, wide = batch_grid(triton.cdiv(rows, row_tile), batch)
        _combine_few_kernel[grid](
            *partials, attn_sink if attn_sink is not None else lse, out_rows, lse, out_partial.stride(-3),
            out_partial.stride(-2), out_rows.stride(0), out_rows.stride(1), rows, h_q, s_q, num_splits,
            SPLITS=splits, ROWS=row_tile, APPLY_SINK=attn_sink is not None, COLUMNS=d_v,
            HALF_PARTIALS=partials.half, WIDE_BATCH=wide, num_warps=4)
        return
    parts = combine_parts(rows * batch, device_limits(out.device)[0])
    split_chunk = COMBINE_TILE // (d_v // parts)
    if split_offsets is None:  # no more lanes than splits
        split_chunk = min(split_chunk, triton.next_power_of_2(num_splits))
    grid, wide = batch_grid(rows, batch, *([parts] if parts > 1 else []))
    _combine_kernel[grid](
        *partials, split_offsets if split_offsets is not None else partials.lse,
        attn_sink if attn_sink is not None else lse, out_rows, lse,
        out_partial.stride(-3), out_partial.stride(-2), out_rows.stride(0), out_rows.stride(1),
        rows, h_q, s_q, num_splits, out_partial.shape[0] if split_offsets is not None else 0,
        VARIABLE=split_offsets is not None, SPLIT_CHUNK=split_chunk, APPLY_SINK=attn_sink is not None,
        COLUMNS=d_v // parts, HALF_PARTIALS=partials.half, LSE_CHUNK=COMBINE_LSE_CHUNK, WIDE_BATCH=wide, num_warps=4)


def supports(q, kv_cache, head_dim_v, is_fp8) -> bool:
    """The shapes this kernel is written for: DeepSeek's 576/512 split, bf16 queries, 64-token pages. An FP8 cache's
    base on 4 bytes too: its rows' float32 scales are loaded as float32 (a GPU faults on a misaligned load), and the
    CUDA kernel, which declines a base off 16 bytes, sent such a cache (a slice of a byte buffer) here."""
    element = kv_cache.element_size()
    aligned = ((kv_cache.stride(0) * element) % 16 == 0 and (kv_cache.stride(1) * element) % 16 == 0
               and (not is_fp8 or kv_cache.data_ptr() % 4 == 0))
    return (q.dtype == torch.bfloat16 and q.shape[-1] == KV_LORA_RANK + ROPE_DIM and head_dim_v == KV_LORA_RANK
            and (is_fp8 or kv_cache.dtype == torch.bfloat16) and aligned
            and (not is_fp8 or kv_cache.shape[-1] == FP8_BYTES))
