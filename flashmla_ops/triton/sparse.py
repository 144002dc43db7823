"""Sparse MLA attention in Triton (DeepSeek Sparse Attention): sparse paged decode and sparse prefill.

Every query has its own key set, an index list shared by all its heads (MQA over the one latent KV head), so a
program handles one query and a `BLOCK_H` tile of its heads, and gathers `BLOCK_N` keys per step through the indices:
    s = q_nope . k_nope + q_rope . k_rope     (576-wide logits, scaled to base 2; -inf where the index is invalid)
    online softmax; acc += p . k_nope         (the value is the 512-wide latent)
Decode reads flat slots `block * 64 + row` of a paged BF16 or FP8 cache (SPEC.md §3: e4m3 converted in hardware on
sm_89+, else decoded with integer ops), optionally followed by the keys of a second (`extra`) cache in the same
softmax, and splits each query's keys over several programs when there are too few queries to fill the GPU (the
dense decode's combine kernel merges the splits: same partial layout).
Prefill reads rows of one packed BF16 `kv` (page size 1) and also returns the largest logit and, when asked, the LSE
over the first `indexer_topk` indices, kept as a second running (max, sum) in the same pass.
"""
import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._checks import contiguous_or_none, last_dim_contiguous
from ..kv_cache import FP8_BYTES, KV_LORA_RANK, PAGE_BLOCK_SIZE, ROPE_DIM
from .common import (INTERPRET, LOG2E, device_limits, f16_row_scaling, finish, hardware_fp8, latent_logits,
                     launch_fitting, load_kv_tile, nonempty, require_d_v, softmax_step, softmax_weights,
                     warpgroup_products)
from .decode import combine, split_buffers

LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _load_keys(KV, row_offset, valid, IS_FP8: tl.constexpr, HW_FP8: tl.constexpr, D_NOPE: tl.constexpr,
               D_ROPE: tl.constexpr, TILE: tl.constexpr, BLOCK_N: tl.constexpr):
    """(latent, rope) bf16 tiles of the rows at `row_offset`; FP8 latents go through the hardware e4m3 conversion
    where there is one (sm_89+), else through the integer decode of `load_kv_tile`."""
    if IS_FP8 and HW_FP8:
        raw = tl.load(KV + row_offset[:, None] + tl.arange(0, D_NOPE)[None, :], mask=valid[:, None], other=0)
        values = raw.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        scale_ptr = (KV + row_offset + D_NOPE).to(tl.pointer_type(tl.float32), bitcast=True)
        scales = tl.load(scale_ptr[:, None] + tl.arange(0, D_NOPE // TILE)[None, :], mask=valid[:, None], other=0.0)
        values = tl.reshape(values, (BLOCK_N, D_NOPE // TILE, TILE)) * scales[:, :, None]
        nope = tl.reshape(values, (BLOCK_N, D_NOPE)).to(tl.bfloat16)
        rope_ptr = (KV + row_offset + D_NOPE + 4 * (D_NOPE // TILE)).to(tl.pointer_type(tl.bfloat16), bitcast=True)
        rope = tl.load(rope_ptr[:, None] + tl.arange(0, D_ROPE)[None, :], mask=valid[:, None], other=0.0)
        return nope, rope
    return load_kv_tile(KV, row_offset, valid, IS_FP8, D_NOPE, D_ROPE, TILE, BLOCK_N)


@triton.jit
def _index_tile(Indices, positions, length):
    """The indices at `positions`, -1 (no token) from `length` on."""
    return tl.load(Indices + positions, mask=positions < length, other=-1)


@triton.jit
def _gather_logits(q_nope, q_rope, KV, index, num_rows, stride_kv_block, stride_kv_row, sm_scale_log2,
                   IS_FP8: tl.constexpr, HW_FP8: tl.constexpr, PAGE: tl.constexpr, D_NOPE: tl.constexpr,
                   D_ROPE: tl.constexpr, TILE: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr,
                   APART: tl.constexpr, taken):
    """The keys at cache slots `index` (outside [0, num_rows): no token): base-2 logits `(BLOCK_H, BLOCK_N)`, -inf
    for missing keys, and the keys' latent tile (the values). With APART the mask is behind a branch on `taken` (the
    caller's loop condition, true; common.mask_logits_apart)."""
    valid = (index >= 0) & (index < num_rows)
    slot = tl.where(valid, index, 0).to(tl.int64)
    row_offset = (slot // PAGE) * stride_kv_block + (slot % PAGE) * stride_kv_row
    k_nope, k_rope = _load_keys(KV, row_offset, valid, IS_FP8, HW_FP8, D_NOPE, D_ROPE, TILE, BLOCK_N)
    return latent_logits(q_nope, q_rope, k_nope, k_rope, valid[None, :], taken, sm_scale_log2, INTERPRET,
                         APART), k_nope


@triton.jit
def _sparse_decode_split_kernel(
        Q, KV, Indices, TopkLength, ExtraKV, ExtraIndices, ExtraTopkLength, Sink, Out, Lse, OutPartial, LsePartial,
        ScalePartial, stride_qb, stride_qs, stride_qh, stride_kv_block, stride_kv_row, stride_ib, stride_is,
        stride_extra_block, stride_extra_row, stride_eb, stride_es,
        stride_ob, stride_os, stride_oh, stride_pb, stride_ps, stride_pm,
        S_Q, H_Q, TOPK, EXTRA_TOPK, num_slots, extra_num_slots, sm_scale_log2, num_splits,
        SPLIT: tl.constexpr, IS_FP8: tl.constexpr, HW_FP8: tl.constexpr, HAS_TOPK_LENGTH: tl.constexpr,
        HAS_EXTRA: tl.constexpr, HAS_EXTRA_TOPK_LENGTH: tl.constexpr, APPLY_SINK: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, D_NOPE: tl.constexpr,
        D_ROPE: tl.constexpr, TILE: tl.constexpr, INTERPRET: tl.constexpr, LOOKAHEAD: tl.constexpr,
        HALF_PARTIALS: tl.constexpr, APART: tl.constexpr):
    head_tiles = tl.cdiv(H_Q, BLOCK_H)
    pid = tl.program_id(0)
    query = pid // head_tiles  # the head tiles of one query are neighbours: they gather the same keys (L2)
    batch = (query // S_Q).to(tl.int64)
    position = (query % S_Q).to(tl.int64)  # times q's, out's and the partials' query strides: past int32 at long s_q
    split = tl.program_id(1)
    heads = (pid % head_tiles) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_mask = heads < H_Q

    # The split walks its share of the key tiles of [indices, extra indices]; the share depends on shapes only.
    main_tiles = tl.cdiv(TOPK, BLOCK_N)
    total_tiles = main_tiles
    if HAS_EXTRA:
        total_tiles += tl.cdiv(EXTRA_TOPK, BLOCK_N)
    tiles_per_split = tl.cdiv(total_tiles, num_splits)
    first_tile = split * tiles_per_split
    last_tile = tl.minimum(first_tile + tiles_per_split, total_tiles)

    q_rows = Q + batch * stride_qb + position * stride_qs + heads[:, None] * stride_qh
    q_nope = tl.load(q_rows + tl.arange(0, D_NOPE)[None, :], mask=head_mask[:, None], other=0.0)
    q_rope = tl.load(q_rows + D_NOPE + tl.arange(0, D_ROPE)[None, :], mask=head_mask[:, None], other=0.0)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, D_NOPE], dtype=tl.float32)

    length = TOPK
    if HAS_TOPK_LENGTH:
        length = tl.minimum(tl.load(TopkLength + batch), TOPK)
    indices = Indices + batch * stride_ib + position * stride_is
    offsets = tl.arange(0, BLOCK_N)
    # LOOKAHEAD: each tile's indices are read one step early. Read inside the step they address that step's gathers,
    # and the compiler's pipeline then waits for every copy in flight at the top of each step (docs/HISTORY.md,
    # stop 41), so no tile's gathers overlap the step before it.
    index_ahead = _index_tile(indices, first_tile * BLOCK_N + offsets, length)
    for tile in range(first_tile, tl.minimum(last_tile, tl.cdiv(length, BLOCK_N))):
        if LOOKAHEAD:
            index = index_ahead
            index_ahead = _index_tile(indices, (tile + 1) * BLOCK_N + offsets, length)
        else:
            index = _index_tile(indices, tile * BLOCK_N + offsets, length)
        s, values = _gather_logits(q_nope, q_rope, KV, index, num_slots, stride_kv_block, stride_kv_row, sm_scale_log2,
                                   IS_FP8, HW_FP8, PAGE, D_NOPE, D_ROPE, TILE, BLOCK_N, INTERPRET, APART,
                                   tile * BLOCK_N < length)
        m_i, l_i, acc = softmax_step(s, values, m_i, l_i, acc, INTERPRET)
    if HAS_EXTRA:
        extra_length = EXTRA_TOPK
        if HAS_EXTRA_TOPK_LENGTH:
            extra_length = tl.minimum(tl.load(ExtraTopkLength + batch), EXTRA_TOPK)
        extra_indices = ExtraIndices + batch * stride_eb + position * stride_es
        extra_end = tl.minimum(last_tile, main_tiles + tl.cdiv(extra_length, BLOCK_N))
        for tile in range(tl.maximum(first_tile, main_tiles), extra_end):
            index = _index_tile(extra_indices, (tile - main_tiles) * BLOCK_N + offsets, extra_length)
            s, values = _gather_logits(q_nope, q_rope, ExtraKV, index, extra_num_slots, stride_extra_block,
                                       stride_extra_row, sm_scale_log2, IS_FP8, HW_FP8, PAGE, D_NOPE, D_ROPE, TILE,
                                       BLOCK_N, INTERPRET, APART, tile < extra_end)
            m_i, l_i, acc = softmax_step(s, values, m_i, l_i, acc, INTERPRET)

    cols = tl.arange(0, D_NOPE)
    if not SPLIT:
        out, lse = finish(acc, m_i, l_i, Sink, heads, head_mask, APPLY_SINK)
        out_rows = Out + batch * stride_ob + position * stride_os + heads[:, None] * stride_oh
        tl.store(out_rows + cols[None, :], out.to(Out.dtype.element_ty), mask=head_mask[:, None])
        tl.store(Lse + (batch * H_Q + heads) * S_Q + position, lse, mask=head_mask)  # lse is (batch, h_q, s_q)
    else:
        # The combine's layout (decode.Partials): partials (batch, split, s_q * h_q rows), float32 or in f16 times a
        # power of two per row (HALF_PARTIALS, whose inverse goes to ScalePartial), lse in base 2, -inf for an empty
        # split.
        empty = l_i == 0.0
        partial = acc / tl.where(empty, 1.0, l_i)[:, None]
        partial_lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        rows = position * H_Q + heads
        stats = (batch * num_splits + split) * S_Q * H_Q + rows
        if HALF_PARTIALS:
            multiplier, inverse = f16_row_scaling(tl.max(tl.abs(partial), 1))
            partial = (partial * multiplier[:, None]).to(tl.float16)
            tl.store(ScalePartial + stats, inverse, mask=head_mask)
        tl.store(OutPartial + batch * stride_pb + split.to(tl.int64) * stride_ps + rows[:, None] * stride_pm
                 + cols[None, :], partial, mask=head_mask[:, None])
        tl.store(LsePartial + stats, partial_lse, mask=head_mask)


@triton.jit
def _sparse_prefill_kernel(
        Q, KV, Indices, TopkLength, Sink, Out, MaxLogits, Lse, LseIndexer,
        stride_qs, stride_qh, stride_kv, stride_is, stride_os, stride_oh, stride_ls,
        H_Q, S_KV, TOPK, indexer_topk, sm_scale_log2,
        HAS_TOPK_LENGTH: tl.constexpr, HAS_INDEXER: tl.constexpr, APPLY_SINK: tl.constexpr, BLOCK_H: tl.constexpr,
        BLOCK_N: tl.constexpr, D_NOPE: tl.constexpr, D_ROPE: tl.constexpr, INTERPRET: tl.constexpr,
        APART: tl.constexpr, LOOKAHEAD: tl.constexpr):
    head_tiles = tl.cdiv(H_Q, BLOCK_H)
    pid = tl.program_id(0)
    query = (pid // head_tiles).to(tl.int64)
    heads = (pid % head_tiles) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_mask = heads < H_Q

    q_rows = Q + query * stride_qs + heads[:, None] * stride_qh
    q_nope = tl.load(q_rows + tl.arange(0, D_NOPE)[None, :], mask=head_mask[:, None], other=0.0)
    q_rope = tl.load(q_rows + D_NOPE + tl.arange(0, D_ROPE)[None, :], mask=head_mask[:, None], other=0.0)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, D_NOPE], dtype=tl.float32)
    m_indexer = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_indexer = tl.zeros([BLOCK_H], dtype=tl.float32)

    length = TOPK
    if HAS_TOPK_LENGTH:
        length = tl.minimum(tl.load(TopkLength + query), TOPK)
    indices = Indices + query * stride_is
    if LOOKAHEAD:  # as the sparse decode's
        index_ahead = _index_tile(indices, tl.arange(0, BLOCK_N), length)
    for tile_start in range(0, length, BLOCK_N):
        positions = tile_start + tl.arange(0, BLOCK_N)
        if LOOKAHEAD:
            index = index_ahead
            index_ahead = _index_tile(indices, positions + BLOCK_N, length)
        else:
            index = _index_tile(indices, positions, length)
        s, values = _gather_logits(q_nope, q_rope, KV, index, S_KV, stride_kv, stride_kv, sm_scale_log2, False, False,
                                   1, D_NOPE, D_ROPE, 1, BLOCK_N, INTERPRET, APART, tile_start < length)
        if HAS_INDEXER:
            if tile_start < indexer_topk:  # the indexer's LSE: the same logits, first indexer_topk positions only
                s_indexer = tl.where(positions[None, :] < indexer_topk, s, float("-inf"))
                m_indexer, _, _, l_indexer = softmax_weights(s_indexer, m_indexer, l_indexer)
        m_i, l_i, acc = softmax_step(s, values, m_i, l_i, acc, INTERPRET)

    out, lse = finish(acc, m_i, l_i, Sink, heads, head_mask, APPLY_SINK)
    cols = tl.arange(0, D_NOPE)
    tl.store(Out + query * stride_os + heads[:, None] * stride_oh + cols[None, :], out.to(Out.dtype.element_ty),
             mask=head_mask[:, None])
    stats = query * stride_ls + heads
    tl.store(Lse + stats, lse, mask=head_mask)
    tl.store(MaxLogits + stats, m_i * LN2, mask=head_mask)  # -inf stays -inf: no visible key
    if HAS_INDEXER:
        empty = l_indexer == 0.0
        lse_indexer = tl.where(empty, float("inf"), (m_indexer + tl.log2(tl.where(empty, 1.0, l_indexer))) * LN2)
        tl.store(LseIndexer + stats, lse_indexer, mask=head_mask)


@dataclass(frozen=True)
class TileConfig:
    """Heads per program (`block_h`: at least 16 rows for the tensor cores, at most 64: the fp32 accumulator lives in
    registers), keys gathered per step (`block_n`), and the launch's warps and pipeline stages; `lookahead`: each
    tile's indices read one step early (see `_sparse_decode_split_kernel`). Prefill takes it since stop 54, opt-in:
    at 64 x 32 tiles, the only ones it fitted before the logits went apart, it was 23-26% slower (stop 41 call 8); at
    64 x 64, two stages, with the logits apart it fits (224 KiB compiled for sm_90) and has not been timed
    (`docs/bench/stop54_device_call6.sh` is the A/B). `apart_logits`: as the dense decode's (decode.LaunchConfig)."""
    block_h: int
    block_n: int
    num_warps: int
    num_stages: int
    lookahead: bool = False
    apart_logits: bool = False


def tile_configs(h_q: int, fp8_decode: bool = False, apart: bool = False, prefill: bool = False) -> list[TileConfig]:
    """Preferred first (Hopper runs it: 64 keys per step, all heads up to 64 in one program), then smaller ones for
    GPUs with less shared memory per block, for launch_fitting: fewer stages, fewer keys per step, fewer heads. Compiled
    for sm_89 (the larger of the specialized and unspecialized compiles), the 99 KiB of Ada and consumer Blackwell take
    BF16 at 32 heads x 32 keys (76 KiB) and FP8 at 64 heads x 32 keys, one stage (88 KiB);
    tests/ops/test_triton_compile.py checks that each op finds one. Sparse decode over an FP8 cache (`fp8_decode`)
    from 64 heads first tries 64 x 64 at three stages with `lookahead` (226 KiB on sm_90, so Hopper only): 7-9%
    faster on the three sparse decode SPEC rows in stop 41 call 8 (b128 h128 393.5-396.0 -> 359.0-360.3 us, b64 h64
    128.8-129.5 -> 119.3-119.9); fewer heads keep the ladder (not timed with it). `apart` (the GPU's products are
    wgmma, common.warpgroup_products): the 64-head tiles take `apart_logits`, and the FP8 decode's first two stages
    (three take 234 KiB with the exchange of P that it adds). Timed on the H100 (stop 54, docs/bench/stop54_call1.log,
    us): FP8 decode b128 h128 333.0-337.4 against 355.9 for stop 41's three stages without it (384.7-389.9 at two
    stages without it), s_q2 654.2-658.0 against 706.3-710.1, b64 h64 113.3-113.7 against 121.7-122.4; prefill
    h128 8013.1-8058.5 against 8996.7-8999.5, h64 4394.4-4473.6 against 4693.7-4760.4. The sparse prefill (`prefill`)
    with the logits apart from 64 heads first tries its 64 x 64 tiles with `lookahead` (224 KiB on sm_90): on the H200
    (stop 55, docs/bench/stop55_call1.log, us) h128 7717.5-7745.8 against 8020.8-8051.6, h64 3933.7-3940.8 against
    4265.4-4275.2 (stop 41 had found it 23-26% slower at 64 x 32, before the logits apart let 64 x 64 fit). Steps of
    32 keys at three and four stages, which keep a step or two of gathers in flight where these wait for all of them
    at each step's top, were slower on all five SPEC rows (H200, stop 58, docs/bench/stop58_call1.log): FP8 decode
    26-30%, prefill 16%."""
    first_h = min(64, max(16, triton.next_power_of_2(h_q)))
    ladder = [TileConfig(block_h=block_h, block_n=block_n, num_warps=8 if block_h >= 64 else 4, num_stages=num_stages,
                         apart_logits=apart and block_h == 64)
              for block_h in (64, 32, 16) if block_h <= first_h
              for block_n in (64, 32) for num_stages in (2, 1)]
    if fp8_decode and first_h == 64:
        ladder.insert(0, TileConfig(block_h=64, block_n=64, num_warps=8, num_stages=2 if apart else 3, lookahead=True,
                                    apart_logits=apart))
    if prefill and apart and first_h == 64:
        ladder.insert(0, dataclasses.replace(ladder[0], lookahead=True))
    return ladder


def num_splits_for(programs: int, key_tiles: int, multiprocessors: int) -> int:
    """Splits of each query's key tiles: the fewest that minimise the modelled time, waves of programs over the SMs
    times each program's work (its tiles plus about two tiles' worth of fixed cost: q, epilogue, the combine's share).
    Depends on shapes only, so that the launch is the same for every topk_length (CUDA graphs). The model's two splits
    of sparse FP8 decode b64 h64 (128 programs) against three and four on the H100 (stop 61,
    docs/bench/stop61_call1_partials_ab.log, us): 110.0, 109.6 against 142.5, 142.3 and 122.6, 122.5."""
    def cost(splits):
        waves = -(-splits * programs // multiprocessors)
        return waves * (-(-key_tiles // splits) + 2)
    return min(range(1, max(1, min(key_tiles, 64)) + 1), key=lambda splits: (cost(splits), splits))


def sparse_decode(q, k_cache, indices, topk_length, extra_k_cache, extra_indices_in_kvcache, extra_topk_length,
                  head_dim_v, softmax_scale, is_fp8, attn_sink=None, config: TileConfig | None = None):
    """Triton sparse decode; same contract as `flashmla::sparse_decode` for d_qk 576 / d_v 512 and bf16 q. A given
    `config` runs as it is (bench_sparse.py --tune); by default the first of `tile_configs` the GPU holds."""
    require_d_v("sparse_decode", "d_v", head_dim_v)
    batch, s_q, h_q, _ = q.shape
    out = q.new_empty(batch, s_q, h_q, head_dim_v, dtype=torch.bfloat16)
    lse = q.new_empty(batch, h_q, s_q, dtype=torch.float32)
    if batch * s_q * h_q == 0:
        return out, lse
    has_extra = extra_k_cache is not None
    cache = nonempty(k_cache.view(torch.uint8) if is_fp8 else k_cache)
    extra_cache = nonempty(extra_k_cache.view(torch.uint8) if is_fp8 else extra_k_cache) if has_extra else cache
    indices = last_dim_contiguous(indices)
    extra_indices = last_dim_contiguous(extra_indices_in_kvcache) if has_extra else indices
    # the kernel reads the lengths and the sink as packed (strided views copied)
    topk_length, extra_topk_length, attn_sink = map(contiguous_or_none, (topk_length, extra_topk_length, attn_sink))
    topk, extra_topk = indices.shape[-1], extra_indices.shape[-1] if has_extra else 0

    multiprocessors, _ = device_limits(q.device)
    variant = dict(IS_FP8=is_fp8, HW_FP8=hardware_fp8(q.device), HAS_TOPK_LENGTH=topk_length is not None,
                   HAS_EXTRA=has_extra, HAS_EXTRA_TOPK_LENGTH=extra_topk_length is not None,
                   APPLY_SINK=attn_sink is not None)

    def launch(config: TileConfig) -> None:
        head_tiles = triton.cdiv(h_q, config.block_h)
        programs = batch * s_q * head_tiles
        key_tiles = triton.cdiv(topk, config.block_n) + triton.cdiv(extra_topk, config.block_n)
        num_splits = num_splits_for(programs, key_tiles, multiprocessors)
        partials = split_buffers(out, lse, num_splits)
        out_partial = partials.out
        sink = attn_sink if attn_sink is not None else lse
        _sparse_decode_split_kernel[(programs, num_splits)](
            q, cache, indices, topk_length if topk_length is not None else indices,
            extra_cache, extra_indices, extra_topk_length if extra_topk_length is not None else indices,
            sink, out, lse, *partials,
            q.stride(0), q.stride(1), q.stride(2), cache.stride(0), cache.stride(1), indices.stride(0),
            indices.stride(1), extra_cache.stride(0), extra_cache.stride(1), extra_indices.stride(0),
            extra_indices.stride(1), out.stride(0), out.stride(1), out.stride(2), out_partial.stride(0),
            out_partial.stride(1), out_partial.stride(2) if num_splits > 1 else 0,
            s_q, h_q, topk, extra_topk, k_cache.shape[0] * PAGE_BLOCK_SIZE,
            extra_k_cache.shape[0] * PAGE_BLOCK_SIZE if has_extra else 0, softmax_scale * LOG2E, num_splits,
            SPLIT=num_splits > 1, BLOCK_H=config.block_h, BLOCK_N=config.block_n, PAGE=PAGE_BLOCK_SIZE,
            D_NOPE=KV_LORA_RANK, D_ROPE=ROPE_DIM, TILE=128, INTERPRET=INTERPRET, LOOKAHEAD=config.lookahead,
            HALF_PARTIALS=partials.half, APART=config.apart_logits,
            num_warps=config.num_warps, num_stages=config.num_stages, **variant)
        if num_splits > 1:
            combine(partials, attn_sink, out, lse)

    configs = ([config] if config is not None
               else tile_configs(h_q, fp8_decode=is_fp8, apart=warpgroup_products(q.device)))
    launch_fitting(("sparse_decode", configs[0], *variant.items(), q.device), configs, launch)
    return out, lse


def sparse_prefill(q, kv, indices, sm_scale, d_v=512, attn_sink=None, topk_length=None, indexer_topk=0,
                   config: TileConfig | None = None):
    """Triton sparse prefill; same contract as `flashmla::sparse_prefill` for d_qk 576 / d_v 512 and bf16 q, kv. A
    given `config` runs as it is (bench_sparse.py --tune)."""
    require_d_v("sparse_prefill", "d_v", d_v)
    s_q, h_q, _ = q.shape
    s_kv, topk = kv.shape[0], indices.shape[-1]
    out = q.new_empty(s_q, h_q, d_v, dtype=torch.bfloat16)
    max_logits = q.new_empty(s_q, h_q, dtype=torch.float32)
    lse = q.new_empty(s_q, h_q, dtype=torch.float32)
    lse_indexer = q.new_empty(s_q, h_q, dtype=torch.float32) if indexer_topk else q.new_empty(0, dtype=torch.float32)
    if s_q * h_q == 0:
        return out, max_logits, lse, lse_indexer
    kv_rows = nonempty(kv)[:, 0]
    indices = last_dim_contiguous(indices)
    # the kernel reads the lengths and the sink as packed (strided views copied)
    topk_length, attn_sink = map(contiguous_or_none, (topk_length, attn_sink))
    variant = dict(HAS_TOPK_LENGTH=topk_length is not None, HAS_INDEXER=indexer_topk > 0,
                   APPLY_SINK=attn_sink is not None)

    def launch(config: TileConfig) -> None:
        _sparse_prefill_kernel[(s_q * triton.cdiv(h_q, config.block_h),)](
            q, kv_rows, indices, topk_length if topk_length is not None else indices,
            attn_sink if attn_sink is not None else lse, out, max_logits, lse, lse_indexer if indexer_topk else lse,
            q.stride(0), q.stride(1), kv_rows.stride(0), indices.stride(0), out.stride(0), out.stride(1),
            lse.stride(0), h_q, s_kv, topk, indexer_topk, sm_scale * LOG2E,
            BLOCK_H=config.block_h, BLOCK_N=config.block_n, D_NOPE=KV_LORA_RANK, D_ROPE=ROPE_DIM,
            INTERPRET=INTERPRET, APART=config.apart_logits, LOOKAHEAD=config.lookahead, num_warps=config.num_warps,
            num_stages=config.num_stages, **variant)

    configs = [config] if config is not None else tile_configs(h_q, apart=warpgroup_products(q.device), prefill=True)
    launch_fitting(("sparse_prefill", configs[0], *variant.items(), q.device), configs, launch)
    return out, max_logits, lse, lse_indexer


def _aligned(tensor: torch.Tensor) -> bool:
    """Rows start on 16 bytes (vector loads; the FP8 rows' float32 scales and bf16 rope need it too)."""
    size = tensor.element_size()
    return all((stride * size) % 16 == 0 for stride in tensor.stride()[:-1]) and tensor.stride(-1) == 1


def supports_decode(q, k_cache, extra_k_cache, head_dim_v, is_fp8) -> bool:
    """The shapes this kernel is written for: DeepSeek's 576/512 split, bf16 queries and BF16 or FP8 caches; an FP8
    cache's base on 4 bytes (its rows' scales are float32 loads; as the dense decode's `supports`)."""
    caches = [k_cache] + ([extra_k_cache] if extra_k_cache is not None else [])
    return (q.dtype == torch.bfloat16 and q.shape[-1] == KV_LORA_RANK + ROPE_DIM and head_dim_v == KV_LORA_RANK
            and all(_aligned(cache) and (cache.shape[-1] == FP8_BYTES and cache.data_ptr() % 4 == 0 if is_fp8
                                         else cache.dtype == torch.bfloat16)
                    for cache in caches))


def supports_prefill(q, kv, d_v) -> bool:
    """bf16 q and kv with DeepSeek's 576/512 split."""
    return (q.dtype == kv.dtype == torch.bfloat16 and q.shape[-1] == KV_LORA_RANK + ROPE_DIM and d_v == KV_LORA_RANK
            and _aligned(kv))
