"""Dense paged MLA decode in Triton: split-KV partial attention, then a combine over the splits.

Query rows are the flattened `(s_q, h_q)` pairs of one sequence (all heads share the one latent KV head, MQA), tiled
`BLOCK_H` at a time. Each program of the split kernel walks `BLOCK_N`-token tiles of its share of the sequence:
    s = q_nope . k_nope + q_rope . k_rope     (576-wide logits, scaled to base 2)
    online softmax; acc += p . k_nope         (the value is the 512-wide latent)
FP8 cache rows (SPEC.md §3) are decoded with integer ops (portable to GPUs without FP8 conversion instructions):
the e4m3 bits shifted into a float32's exponent/mantissa give the value times 2**-120.
"""
import torch
import triton
import triton.language as tl

from ..kv_cache import FP8_BYTES, KV_LORA_RANK, PAGE_BLOCK_SIZE, ROPE_DIM
from .common import INTERPRET, LOG2E, mma, finish, load_kv_tile, device_limits

@triton.jit
def _dense_decode_split_kernel(
        Q, KV, BlockTable, Seqlens, Sink, Out, Lse, OutPartial, LsePartial,
        stride_qb, stride_qm, stride_kv_block, stride_kv_row, stride_bt,
        stride_ob, stride_om, stride_pb, stride_ps, stride_pm,
        M, H_Q, S_Q, sm_scale_log2,
        NUM_SPLITS: tl.constexpr, IS_FP8: tl.constexpr, CAUSAL: tl.constexpr, APPLY_SINK: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
        D_NOPE: tl.constexpr, D_ROPE: tl.constexpr, TILE: tl.constexpr, INTERPRET: tl.constexpr):
    pid_m = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    rows = pid_m * BLOCK_H + tl.arange(0, BLOCK_H)
    row_mask = rows < M
    heads = rows % H_Q
    length = tl.load(Seqlens + batch)
    if CAUSAL:
        visible = length - S_Q + rows // H_Q + 1  # query i of s_q sees [0, L - s_q + i]
    else:
        visible = tl.zeros([BLOCK_H], dtype=tl.int32) + length
    tiles_per_split = tl.cdiv(tl.cdiv(length, BLOCK_N), NUM_SPLITS)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, length)

    q_rows = Q + batch * stride_qb + rows[:, None] * stride_qm
    q_nope = tl.load(q_rows + tl.arange(0, D_NOPE)[None, :], mask=row_mask[:, None], other=0.0)
    q_rope = tl.load(q_rows + D_NOPE + tl.arange(0, D_ROPE)[None, :], mask=row_mask[:, None], other=0.0)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, D_NOPE], dtype=tl.float32)
    for tile_start in range(start, end, BLOCK_N):
        tokens = tile_start + tl.arange(0, BLOCK_N)
        tok_mask = tokens < end
        block = tl.load(BlockTable + batch * stride_bt + tokens // PAGE, mask=tok_mask, other=0).to(tl.int64)
        row_offset = block * stride_kv_block + (tokens % PAGE) * stride_kv_row
        k_nope, k_rope = load_kv_tile(KV, row_offset, tok_mask, IS_FP8, D_NOPE, D_ROPE, TILE, BLOCK_N)
        s = mma(q_nope, tl.trans(k_nope), INTERPRET) + mma(q_rope, tl.trans(k_rope), INTERPRET)
        s = tl.where(tokens[None, :] < visible[:, None], s * sm_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - shift[:, None])
        alpha = tl.exp2(m_i - shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + mma(p.to(tl.bfloat16), k_nope, INTERPRET)
        m_i = m_new

    cols = tl.arange(0, D_NOPE)
    if NUM_SPLITS == 1:
        out, lse = finish(acc, m_i, l_i, Sink, heads, row_mask, APPLY_SINK)
        tl.store(Out + batch * stride_ob + rows[:, None] * stride_om + cols[None, :], out.to(Out.dtype.element_ty),
                 mask=row_mask[:, None])
        # lse is (batch, h_q, s_q): row r = (query r // h_q, head r % h_q)
        tl.store(Lse + batch * M + heads * S_Q + rows // H_Q, lse, mask=row_mask)
    else:
        empty = l_i == 0.0
        partial = acc / tl.where(empty, 1.0, l_i)[:, None]
        partial_lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))  # base 2
        base = batch * stride_pb + split * stride_ps + rows * stride_pm
        tl.store(OutPartial + base[:, None] + cols[None, :], partial, mask=row_mask[:, None])
        tl.store(LsePartial + (batch * NUM_SPLITS + split) * M + rows, partial_lse, mask=row_mask)


@triton.jit
def _combine_kernel(OutPartial, LsePartial, Sink, Out, Lse,
                    stride_pb, stride_ps, stride_pm, stride_ob, stride_om, M, H_Q, S_Q,
                    NUM_SPLITS: tl.constexpr, SPLITS_POW2: tl.constexpr, APPLY_SINK: tl.constexpr,
                    BLOCK_M: tl.constexpr, D_V: tl.constexpr):
    """Merge split partials: out = sum_s w_s out_s with w_s = exp(lse_s - lse), lse = log sum_s exp(lse_s)."""
    batch = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    splits = tl.arange(0, SPLITS_POW2)
    lse_parts = tl.load(LsePartial + (batch * NUM_SPLITS + splits[None, :]) * M + rows[:, None],
                        mask=row_mask[:, None] & (splits[None, :] < NUM_SPLITS), other=float("-inf"))
    m = tl.max(lse_parts, 1)
    shift = tl.where(m == float("-inf"), 0.0, m)
    l_i = tl.sum(tl.exp2(lse_parts - shift[:, None]), 1)
    cols = tl.arange(0, D_V)
    acc = tl.zeros([BLOCK_M, D_V], dtype=tl.float32)
    for split in range(NUM_SPLITS):
        lse_split = tl.load(LsePartial + (batch * NUM_SPLITS + split) * M + rows, mask=row_mask, other=float("-inf"))
        weight = tl.exp2(lse_split - shift)
        part = tl.load(OutPartial + batch * stride_pb + split * stride_ps + rows[:, None] * stride_pm + cols[None, :],
                       mask=row_mask[:, None] & (weight[:, None] > 0), other=0.0)
        acc += weight[:, None] * part
    out, lse = finish(acc, shift, l_i, Sink, rows % H_Q, row_mask, APPLY_SINK)
    tl.store(Out + batch * stride_ob + rows[:, None] * stride_om + cols[None, :], out.to(Out.dtype.element_ty),
             mask=row_mask[:, None])
    tl.store(Lse + batch * M + (rows % H_Q) * S_Q + rows // H_Q, lse, mask=row_mask)


def num_splits_for(batch: int, row_tiles: int, capacity_tiles: int, multiprocessors: int) -> int:
    """Splits per sequence so that about two programs per SM are in flight; static (shapes only), so that the
    launch is the same for every `cache_seqlens` (CUDA graphs)."""
    programs = max(1, batch * row_tiles)
    return max(1, min(-(-2 * multiprocessors // programs), capacity_tiles, 128))


def dense_decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, is_fp8, attn_sink=None):
    """Triton dense decode; same contract as `flashmla::dense_decode` for d_qk 576 / d_v 512 and bf16 q."""
    batch, s_q, h_q, d_qk = q.shape
    rows = s_q * h_q
    out = q.new_empty(batch, s_q, h_q, head_dim_v, dtype=torch.bfloat16)
    lse = q.new_empty(batch, h_q, s_q, dtype=torch.float32)
    if batch == 0 or rows == 0:
        return out, lse
    q_rows = q.reshape(batch, rows, d_qk)
    cache = kv_cache.view(torch.uint8) if is_fp8 else kv_cache
    multiprocessors, shared_memory = device_limits(q.device)
    block_h = min(64, max(16, triton.next_power_of_2(rows)))
    block_n = 64 if shared_memory >= 200 * 1024 else 32
    row_tiles = triton.cdiv(rows, block_h)
    num_splits = num_splits_for(batch, row_tiles, triton.cdiv(block_table.shape[1] * PAGE_BLOCK_SIZE, block_n),
                                multiprocessors)
    if num_splits > 1:
        out_partial = q.new_empty(batch, num_splits, rows, head_dim_v, dtype=torch.float32)
        lse_partial = q.new_empty(batch, num_splits, rows, dtype=torch.float32)
    else:
        out_partial, lse_partial = out, lse  # unused
    sink = attn_sink if attn_sink is not None else lse
    out_rows = out.view(batch, rows, head_dim_v)
    num_warps = 8 if block_h >= 64 else 4
    _dense_decode_split_kernel[(row_tiles, batch, num_splits)](
        q_rows, cache, block_table, cache_seqlens, sink, out_rows, lse, out_partial, lse_partial,
        q_rows.stride(0), q_rows.stride(1), cache.stride(0), cache.stride(1), block_table.stride(0),
        out_rows.stride(0), out_rows.stride(1), out_partial.stride(0), out_partial.stride(1),
        out_partial.stride(2) if num_splits > 1 else 0,
        rows, h_q, s_q, softmax_scale * LOG2E,
        NUM_SPLITS=num_splits, IS_FP8=is_fp8, CAUSAL=causal, APPLY_SINK=attn_sink is not None,
        BLOCK_H=block_h, BLOCK_N=block_n, PAGE=PAGE_BLOCK_SIZE, D_NOPE=KV_LORA_RANK, D_ROPE=ROPE_DIM,
        TILE=128, INTERPRET=INTERPRET, num_warps=num_warps, num_stages=2)
    if num_splits > 1:
        block_m = 4
        _combine_kernel[(triton.cdiv(rows, block_m), batch)](
            out_partial, lse_partial, sink, out_rows, lse,
            out_partial.stride(0), out_partial.stride(1), out_partial.stride(2), out_rows.stride(0),
            out_rows.stride(1), rows, h_q, s_q,
            NUM_SPLITS=num_splits, SPLITS_POW2=triton.next_power_of_2(num_splits),
            APPLY_SINK=attn_sink is not None, BLOCK_M=block_m, D_V=head_dim_v, num_warps=4)
    return out, lse


def supports(q, kv_cache, head_dim_v, is_fp8) -> bool:
    """The shapes this kernel is written for: DeepSeek's 576/512 split, bf16 queries, 64-token pages."""
    element = kv_cache.element_size()
    aligned = (kv_cache.stride(0) * element) % 16 == 0 and (kv_cache.stride(1) * element) % 16 == 0
    return (q.dtype == torch.bfloat16 and q.shape[-1] == KV_LORA_RANK + ROPE_DIM and head_dim_v == KV_LORA_RANK
            and (is_fp8 or kv_cache.dtype == torch.bfloat16) and aligned
            and (not is_fp8 or kv_cache.shape[-1] == FP8_BYTES))
