"""Naive float64 oracles for the flashmla ops (SPEC.md §2-3), written without flashmla_ops: one full softmax per
query (no chunking, no online softmax), FP8 e4m3 encoded and decoded from its bit layout, plus the input builders
and comparison helpers the op tests share."""
import math

import torch

PAGE_BLOCK_SIZE = 64
KV_LORA_RANK = 512
ROPE_DIM = 64
D_QK = KV_LORA_RANK + ROPE_DIM
D_V = KV_LORA_RANK
FP8_TILE = 128
FP8_BYTES = 656
E4M3_MAX = 448.0
MIN_SCALE = 1e-4


# ---------------------------------------------------------------- FP8 e4m3 from its bits


def _e4m3_values() -> torch.Tensor:
    """Value of every e4m3fn code 0..255: sign, 4 exponent bits (bias 7), 3 mantissa bits; 0x7f / 0xff are NaN."""
    values = []
    for code in range(256):
        sign = -1.0 if code & 0x80 else 1.0
        exponent, mantissa = (code >> 3) & 0xF, code & 0x7
        if exponent == 0xF and mantissa == 0x7:
            values.append(math.nan)
        elif exponent == 0:
            values.append(sign * mantissa / 8 * 2.0 ** -6)
        else:
            values.append(sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7))
    return torch.tensor(values, dtype=torch.float64)


E4M3_VALUES = _e4m3_values()
_E4M3_POSITIVE = E4M3_VALUES[:127]  # codes 0x00..0x7e, ascending


def e4m3_encode(y: torch.Tensor) -> torch.Tensor:
    """float64 `|y| <= 448` -> uint8 codes, round to nearest, ties to even (even code = even mantissa)."""
    magnitude = y.abs().reshape(-1)
    upper = torch.searchsorted(_E4M3_POSITIVE, magnitude).clamp(max=126)
    lower = (upper - 1).clamp(min=0)
    to_upper = _E4M3_POSITIVE[upper] - magnitude
    to_lower = magnitude - _E4M3_POSITIVE[lower]
    pick_upper = (to_upper < to_lower) | ((to_upper == to_lower) & (upper % 2 == 0))
    code = torch.where(pick_upper, upper, lower) | torch.where(y.reshape(-1) < 0, 0x80, 0)
    return code.to(torch.uint8).reshape(y.shape)


def e4m3_decode(codes: torch.Tensor) -> torch.Tensor:
    return E4M3_VALUES[codes.view(torch.uint8).long()]


def pow2_scale(amax: torch.Tensor) -> torch.Tensor:
    """SPEC §3: 2 ** ceil(log2(max(amax / 448, 1e-4))), float64."""
    ratio = torch.clamp_min(amax.double() / E4M3_MAX, MIN_SCALE)
    return torch.exp2(torch.ceil(torch.log2(ratio)))


def quantize_kv(kv: torch.Tensor) -> torch.Tensor:
    """bfloat16 (or float32) `(..., 576)` -> uint8 `(..., 656)`: 512 e4m3 codes, 4 float32 scales, 64 bfloat16 RoPE
    values (float32 RoPE rounded to nearest even)."""
    lead = kv.shape[:-1]
    nope = kv[..., :KV_LORA_RANK].double().reshape(*lead, KV_LORA_RANK // FP8_TILE, FP8_TILE)
    scale = pow2_scale(nope.abs().amax(-1))
    codes = e4m3_encode(nope / scale[..., None]).reshape(*lead, KV_LORA_RANK)
    scale_bytes = scale.float().contiguous().view(torch.uint8)
    rope_bytes = kv[..., KV_LORA_RANK:].to(torch.bfloat16).contiguous().view(torch.uint8)
    return torch.cat([codes, scale_bytes, rope_bytes], dim=-1)


def dequantize_kv(kv_fp8: torch.Tensor) -> torch.Tensor:
    """uint8 `(..., 656)` -> float64 `(..., 576)` (no intermediate rounding)."""
    kv_fp8 = kv_fp8.view(torch.uint8)
    lead = kv_fp8.shape[:-1]
    values = e4m3_decode(kv_fp8[..., :KV_LORA_RANK]).reshape(*lead, KV_LORA_RANK // FP8_TILE, FP8_TILE)
    scale = kv_fp8[..., KV_LORA_RANK:KV_LORA_RANK + 16].contiguous().view(torch.float32).double()
    rope = kv_fp8[..., KV_LORA_RANK + 16:].contiguous().view(torch.bfloat16).double()
    return torch.cat([(values * scale[..., None]).reshape(*lead, KV_LORA_RANK), rope], dim=-1)


def quantize_index(k: torch.Tensor) -> torch.Tensor:
    """bfloat16 `(..., d_i)` -> uint8 `(..., d_i + 4)`: d_i e4m3 codes then one float32 scale (one tile of d_i)."""
    x = k.double()
    scale = pow2_scale(x.abs().amax(-1, keepdim=True))
    return torch.cat([e4m3_encode(x / scale), scale.float().contiguous().view(torch.uint8)], dim=-1)


def dequantize_index(k_fp8: torch.Tensor) -> torch.Tensor:
    k_fp8 = k_fp8.view(torch.uint8)
    return e4m3_decode(k_fp8[..., :-4]) * k_fp8[..., -4:].contiguous().view(torch.float32).double()


# ---------------------------------------------------------------- attention


def attention(q: torch.Tensor, keys: torch.Tensor, scale: float, d_v: int, attn_sink=None):
    """One query position: q `(h, d_qk)`, keys `(K, d_qk)` (every listed row counts, duplicates too), float64.

    Returns out `(h, d_v)`, lse `(h,)`, max_logits `(h,)`; out = 0, lse = +inf, max = -inf when K == 0.
    """
    q, keys = q.double(), keys.double()
    num_heads = q.shape[0]
    if keys.shape[0] == 0:
        return (q.new_zeros(num_heads, d_v), q.new_full((num_heads,), math.inf), q.new_full((num_heads,), -math.inf))
    logits = (q @ keys.T) * scale
    max_logits = logits.max(-1).values
    weights = torch.exp(logits - max_logits[:, None])
    total = weights.sum(-1)
    lse = max_logits + torch.log(total)
    out = (weights @ keys[:, :d_v]) / total[:, None]
    if attn_sink is not None:
        out = out / (1 + torch.exp(attn_sink.double() - lse))[:, None]
    return out, lse, max_logits


def dense_decode(q, flat_keys, block_table, cache_seqlens, scale, d_v, causal, attn_sink=None):
    """q `(batch, s_q, h_q, d_qk)`; flat_keys `(num_blocks * 64, d_qk)` float64, the cache by flat slot."""
    batch, s_q, h_q, _ = q.shape
    out = torch.zeros(batch, s_q, h_q, d_v, dtype=torch.float64)
    lse = torch.zeros(batch, h_q, s_q, dtype=torch.float64)
    for b in range(batch):
        length = int(cache_seqlens[b])
        slots = [int(block_table[b, t // PAGE_BLOCK_SIZE]) * PAGE_BLOCK_SIZE + t % PAGE_BLOCK_SIZE for t in range(length)]
        for i in range(s_q):
            visible = slots[:max(0, length - s_q + i + 1)] if causal else slots
            out[b, i], lse[b, :, i], _ = attention(q[b, i], flat_keys[visible], scale, d_v, attn_sink)
    return out, lse


def counted(row: torch.Tensor, topk_length, position: int) -> list[int]:
    """The entries of an index row that count: the first `topk_length[position]` (all of them without topk_length or
    for a length past the row's width; none for a length <= 0, which a Python slice would count from the end)."""
    if topk_length is None:
        return row.tolist()
    return row[:max(0, int(topk_length[position]))].tolist()


def sparse_decode(q, flat_keys, indices, topk_length, scale, d_v, extra_flat_keys=None, extra_indices=None,
                  extra_topk_length=None, attn_sink=None):
    """Every listed slot of `indices[b, i, :topk_length[b]]` (and of the extra cache) in one softmax; -1 skipped."""
    batch, s_q, h_q, _ = q.shape
    out = torch.zeros(batch, s_q, h_q, d_v, dtype=torch.float64)
    lse = torch.zeros(batch, h_q, s_q, dtype=torch.float64)
    for b in range(batch):
        for i in range(s_q):
            rows = [flat_keys[s] for s in counted(indices[b, i], topk_length, b) if s != -1]
            if extra_indices is not None:
                rows += [extra_flat_keys[s] for s in counted(extra_indices[b, i], extra_topk_length, b) if s != -1]
            keys = torch.stack(rows) if rows else flat_keys.new_zeros(0, flat_keys.shape[-1])
            out[b, i], lse[b, :, i], _ = attention(q[b, i], keys, scale, d_v, attn_sink)
    return out, lse


def sparse_prefill(q, kv, indices, scale, d_v, attn_sink=None, topk_length=None, indexer_topk=0):
    """q `(s_q, h_q, d_qk)`, kv `(s_kv, 1, d_qk)`, indices `(s_q, 1, topk)`; -1 and values >= s_kv are no token."""
    s_q, h_q, _ = q.shape
    s_kv = kv.shape[0]
    out = torch.zeros(s_q, h_q, d_v, dtype=torch.float64)
    max_logits, lse, lse_indexer = (torch.zeros(s_q, h_q, dtype=torch.float64) for _ in range(3))
    for t in range(s_q):
        listed = counted(indices[t, 0], topk_length, t)
        keys = kv[[s for s in listed if 0 <= s < s_kv], 0].double()
        out[t], lse[t], max_logits[t] = attention(q[t], keys, scale, d_v, attn_sink)
        if indexer_topk:
            indexer_keys = kv[[s for s in listed[:indexer_topk] if 0 <= s < s_kv], 0].double()
            lse_indexer[t] = attention(q[t], indexer_keys, scale, d_v)[1]
    return out, max_logits, lse, lse_indexer


# ---------------------------------------------------------------- indexer


def indexer_logit(q_t: torch.Tensor, weights_t: torch.Tensor, key: torch.Tensor) -> float:
    """sum_h weights[h] * relu(q[h] . key), float64."""
    return float((weights_t.double() * torch.relu(q_t.double() @ key.double())).sum())


def indexer_logits(q, k, weights, k_start, k_end):
    """q `(s_q, h_i, d_i)`, k `(s_kv, d_i)` float64 (already scaled); query t sees [k_start[t], k_end[t])."""
    logits = torch.full((q.shape[0], k.shape[0]), -math.inf, dtype=torch.float64)
    for t in range(q.shape[0]):
        for s in range(int(k_start[t]), int(k_end[t])):
            logits[t, s] = indexer_logit(q[t], weights[t], k[s])
    return logits


def indexer_logits_paged(q, flat_keys, weights, block_table, cache_seqlens):
    """q `(batch, s_q, h_i, d_i)` float64; query i of sequence b sees logical tokens [0, L - s_q + i]."""
    batch, s_q = q.shape[:2]
    logits = torch.full((batch, s_q, block_table.shape[1] * PAGE_BLOCK_SIZE), -math.inf, dtype=torch.float64)
    for b in range(batch):
        length = int(cache_seqlens[b])
        for i in range(s_q):
            for t in range(max(0, length - s_q + i + 1)):
                slot = int(block_table[b, t // PAGE_BLOCK_SIZE]) * PAGE_BLOCK_SIZE + t % PAGE_BLOCK_SIZE
                logits[b, i, t] = indexer_logit(q[b, i], weights[b, i], flat_keys[slot])
    return logits



# Hopper's e4m3 MMA sums its products with about 14 bits kept (DeepSeek-V3 report; the Triton kernel's e4m3 MMAs showed
# the same, tests/ops/test_triton_indexer.py). So the CUDA indexer logits (csrc/indexer_logits.cu, e4m3 wgmmas) are
# held to a fraction of the absolute sum A[t, s] = sum_h |w| sum_d |q_d k_d| that the MMAs add, element by element:
# the H200 showed at most 1.6e-4 of A (h_i 1) and 1.6e-5 (h_i 64) over 21 shapes and seeds, against 1e-6 to 1e-5 for
# the float32 sums of the exact paths (stop 27, docs/bench/stop27_call2.log). A wrong key, head, weight, scale or
# k-step shows as 1e-2 of A or more.
E4M3_MMA_BAND = 5e-4


def finite_logits(got, want):
    """got and want `(..., keys)` logits: -inf exactly where want has it, NaN exactly where want has it (relu keeps
    NaN: a NaN in q, k or a scale makes the logits it reaches NaN) and got finite wherever want is. Returns the mask
    of want's finite logits."""
    assert got.shape == want.shape
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), "-inf exactly outside each query's visible keys"
    assert torch.equal(torch.isnan(got), torch.isnan(want)), "NaN exactly where the reference has it"
    finite = torch.isfinite(want)
    assert torch.isfinite(got[finite]).all()
    return finite


def assert_within_absolute_band(got, want, absolute, band):
    """`finite_logits`, and |got - want| <= band * absolute element by element (absolute: the logits of |q|, |k|,
    |w|; E4M3_MMA_BAND for e4m3 MMAs)."""
    got, want, absolute = (x.detach().double().cpu() for x in (got, want, absolute))
    finite = finite_logits(got, want)
    error = (got[finite] - want[finite]).abs()
    bound = band * absolute[finite] + 1e-30
    assert (error <= bound).all(), f"largest error {(error / bound).max().item() * band:.3g} of A"


# ---------------------------------------------------------------- inputs


def bf16(*shape, scale=1.0, device="cpu"):
    return (torch.randn(*shape) * scale).to(torch.bfloat16).to(device)


def block_table_for(cache_seqlens, num_blocks, max_blocks_per_seq=None, garbage=True):
    """Distinct random blocks for every used block of every sequence; unused entries hold garbage (-1 or huge)
    that the ops must not read."""
    need = [-(-int(length) // PAGE_BLOCK_SIZE) for length in cache_seqlens]
    max_blocks_per_seq = max_blocks_per_seq or max([1, *need])
    assert sum(need) <= num_blocks
    order = torch.randperm(num_blocks).tolist()
    table = torch.randint(num_blocks, 1 << 30, (len(need), max_blocks_per_seq), dtype=torch.int32)
    if garbage:
        table[:, ::2] = -1
    for b, count in enumerate(need):
        table[b, :count] = torch.tensor(order[:count], dtype=torch.int32)
        order = order[count:]
    return table


def paged_cache(num_blocks, fp8, pad=0, h_kv=1, d_qk=D_QK, device="cpu"):
    """A random paged cache, optionally a slice of a wider buffer (block stride padded by `pad` elements).

    Returns (cache, flat_keys): flat_keys `(num_blocks * 64, d_qk)` float64 is what each slot holds (for FP8: its
    exact dequantized value), and cache is `(num_blocks, 64, h_kv, d_qk or 656)` bfloat16 / uint8.
    """
    content = bf16(num_blocks, PAGE_BLOCK_SIZE, h_kv, d_qk)
    if fp8:
        content = quantize_kv(content)
    row = content.shape[-1]
    if fp8:
        buffer = torch.randint(0, 256, (num_blocks, PAGE_BLOCK_SIZE * h_kv * row + pad), dtype=torch.uint8)
    else:
        buffer = bf16(num_blocks, PAGE_BLOCK_SIZE * h_kv * row + pad)
    buffer = buffer.to(device)
    cache = buffer[:, :PAGE_BLOCK_SIZE * h_kv * row].view(num_blocks, PAGE_BLOCK_SIZE, h_kv, row)
    cache.copy_(content)
    flat = content.reshape(num_blocks * PAGE_BLOCK_SIZE, h_kv, row)[:, 0]
    return cache, (dequantize_kv(flat) if fp8 else flat.double())


# ---------------------------------------------------------------- comparisons


def assert_attention_close(out, lse, ref_out, ref_lse, out_rtol=1e-2, lse_atol=1e-4, lse_dim=None):
    """out `(..., h, d_v)` vs float64 ref: per query position relative L2 error; empty positions (ref lse +inf)
    must be exactly 0 with lse +inf. lse compared elementwise (infinities exactly)."""
    out, lse = out.detach().cpu().double(), lse.detach().cpu().double()
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape, (out.shape, ref_out.shape, lse.shape, ref_lse.shape)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "lse is +inf exactly where no token is visible"
    assert not torch.isnan(lse).any() and not torch.isnan(out).any()
    assert (lse[torch.isinf(lse)] > 0).all()
    finite = torch.isfinite(ref_lse)
    assert torch.allclose(lse[finite], ref_lse[finite], rtol=0, atol=lse_atol), (lse - ref_lse)[finite].abs().max()
    flat_out, flat_ref = out.reshape(-1, *out.shape[-2:]), ref_out.reshape(-1, *ref_out.shape[-2:])
    for position, (o, r) in enumerate(zip(flat_out, flat_ref)):
        norm = r.norm()
        if norm == 0:
            assert (o == 0).all(), f"query position {position}: out must be 0 when nothing is visible"
        else:
            error = float((o - r).norm() / norm)
            assert error < out_rtol, f"query position {position}: relative error {error:.3g}"
