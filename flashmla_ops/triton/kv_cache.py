"""KV-cache writes in Triton: FP8 quantization to the 656-byte layout (SPEC.md §3) and stores into the paged cache,
and the indexer's keys into its paged key cache.

`flashmla::quantize_kv_fp8` and `flashmla::write_kv_cache` run these where the CUDA kernels are not built (or with
FLASHMLA_BACKEND=triton); `flashmla::write_index_cache` on any GPU (it has no CUDA kernel: its reference is some
twenty small torch ops a layer and decode step). Under the CPU interpreter the hardware e4m3 conversion cannot be
checked (the interpreter's own conversion does not round to nearest-even); the GPU tests check it.

One program stores one token row, bit-exact with `quantize_kv_fp8_reference`:
    scale_t = 2 ** ceil(log2(max(amax_t / 448, 1e-4)))   per 128-wide latent tile t, from the float32 exponent bits
    e4m3    = saturating round-to-nearest-even of x * (1 / scale_t)   (a power of two: exact, so equal to x / scale_t)
The cast is the hardware one on sm_89+ and an integer encoder otherwise (and under the interpreter).
"""
import torch
import triton
import triton.language as tl

from .._checks import last_dim_contiguous
from ..kv_cache import FP8_BYTES, FP8_TILE, KV_LORA_RANK, ROPE_DIM
from .common import INTERPRET, hardware_fp8


@triton.jit
def fp8_power_of_two_scale(amax):
    """(scale, 1 / scale) = 2 ** ceil(log2(max(amax / 448, 1e-4))) (`kv_cache.fp8_scale`): the exponent of the
    ratio, plus one unless its mantissa is zero (the ratio is then a power of two); scale 1 for an infinite amax. The
    division is correctly rounded, as in the reference (Triton's `/` may not be)."""
    ratio = tl.maximum(tl.math.div_rn(amax, 448.0), 1e-4)
    bits = ratio.to(tl.int32, bitcast=True)
    exponent = (bits >> 23) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    # an infinite (or NaN) ratio: scale 1, as frexp gives the reference (and frexpf the CUDA kernel), not 2**128
    # with an inverse of -inf (every value of the tile an infinity of the wrong sign)
    exponent = tl.where((bits & 0x7FFFFFFF) >= 0x7F800000, 127, exponent)
    return (exponent << 23).to(tl.float32, bitcast=True), ((254 - exponent) << 23).to(tl.float32, bitcast=True)


@triton.jit
def encode_e4m3(x, HW_FP8: tl.constexpr):
    """float32 -> float8_e4m3fn bits (uint8), saturating to +-448, round to nearest even.
    Integer path: normals round the float32 mantissa to 3 bits (a carry moves into the exponent) and rebias 127 -> 7;
    below 2**-6 the e4m3 subnormal count round(|x| * 2**9) comes from adding 2**23 (float32 ulp 1 there). A NaN stays a
    NaN (0x7F, with its sign), as the reference's cast keeps it (Triton's maximum / minimum would drop it: -448)."""
    clamped = tl.where(x == x, tl.minimum(tl.maximum(x, -448.0), 448.0), x)
    if HW_FP8:
        code = clamped.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    else:
        bits = clamped.to(tl.int32, bitcast=True)
        magnitude = bits & 0x7FFFFFFF
        normal = ((magnitude + 0x7FFFF + ((magnitude >> 20) & 1)) >> 20) - (120 << 3)
        subnormal = ((magnitude.to(tl.float32, bitcast=True) * 512.0 + 8388608.0).to(tl.int32, bitcast=True)
                     & 0xF)
        code = tl.where(magnitude >= 0x3C800000, normal, subnormal)  # 0x3C800000 = 2**-6
        code = tl.where(magnitude > 0x7F800000, 0x7F, code)  # NaN
        code = (code | ((bits >> 24) & 0x80)).to(tl.uint8)
    return code


@triton.jit
def to_bfloat16(x, INTERPRET: tl.constexpr):
    """Round to nearest even to bfloat16; the CPU interpreter truncates, so it gets the rounding in integers. A
    bfloat16 x is kept as it is: the interpreter widens bfloat16 subnormals to wrong float32 values."""
    if x.dtype == tl.bfloat16:
        rounded = x
    elif INTERPRET:
        bits = x.to(tl.float32).to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = bits.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        rounded = x.to(tl.bfloat16)
    return rounded


@triton.jit
def _store_kv_rows_kernel(Latent, Rope, Slots, Cache, stride_latent, stride_rope, stride_block, stride_row,
                          page_block_size, num_slots,
                          HAS_SLOTS: tl.constexpr, IS_FP8: tl.constexpr, HW_FP8: tl.constexpr,
                          D_NOPE: tl.constexpr, D_ROPE: tl.constexpr, TILE: tl.constexpr, INTERPRET: tl.constexpr):
    """Token `program_id` -> cache row `Slots[token]` (block slot // page_block_size, row slot % page_block_size;
    skipped when -1 and, whatever the caller checked, when past the cache's `num_slots`: a bad slot must not write
    into the memory after it), or row `token` of a `(num_tokens, 1, row)` output without slots. Cache strides in
    elements (bytes for FP8)."""
    token = tl.program_id(0).to(tl.int64)
    if HAS_SLOTS:
        slot = tl.load(Slots + token).to(tl.int64)
    else:
        slot = token
    nope_cols = tl.arange(0, D_NOPE)
    rope_cols = tl.arange(0, D_ROPE)
    scale_cols = tl.arange(0, D_NOPE // TILE)
    inside = (slot >= 0) & (slot < num_slots)  # -1 skips the token
    nope_mask = (tl.zeros([D_NOPE], dtype=tl.int32) + inside.to(tl.int32)) != 0
    rope_mask = (tl.zeros([D_ROPE], dtype=tl.int32) + inside.to(tl.int32)) != 0
    scale_mask = (tl.zeros([D_NOPE // TILE], dtype=tl.int32) + inside.to(tl.int32)) != 0
    row = Cache + (slot // page_block_size) * stride_block + (slot % page_block_size) * stride_row
    latent = tl.load(Latent + token * stride_latent + nope_cols, mask=nope_mask, other=0.0)
    rope = tl.load(Rope + token * stride_rope + rope_cols, mask=rope_mask, other=0.0)
    if IS_FP8:
        tiles = tl.reshape(latent.to(tl.float32), (D_NOPE // TILE, TILE))
        scale, inverse = fp8_power_of_two_scale(tl.max(tl.where(tiles == tiles, tl.abs(tiles), 0.0), 1))  # NaN: 0
        codes = encode_e4m3(tiles * inverse[:, None], HW_FP8)
        tl.store(row + nope_cols, tl.reshape(codes, (D_NOPE,)), mask=nope_mask)
        tl.store((row + D_NOPE).to(tl.pointer_type(tl.float32), bitcast=True) + scale_cols, scale, mask=scale_mask)
        rope_ptr = (row + D_NOPE + 4 * (D_NOPE // TILE)).to(tl.pointer_type(tl.bfloat16), bitcast=True)
        tl.store(rope_ptr + rope_cols, to_bfloat16(rope, INTERPRET), mask=rope_mask)
    else:
        tl.store(row + nope_cols, latent.to(Cache.dtype.element_ty), mask=nope_mask)
        tl.store(row + D_NOPE + rope_cols, rope.to(Cache.dtype.element_ty), mask=rope_mask)


@triton.jit
def _store_index_rows_kernel(Keys, Slots, Cache, stride_keys, stride_block, stride_row, page_block_size, num_slots,
                             IS_FP8: tl.constexpr, HW_FP8: tl.constexpr, D_I: tl.constexpr, BLOCK: tl.constexpr):
    """Token `program_id` -> index-cache row `Slots[token]` (skipped when -1 and when past the cache's `num_slots`):
    the key as it is (BF16 / float32 cache) or, FP8, its D_I e4m3 codes of key / scale and the float32 power-of-two
    scale after them, one a row (`kv_cache.quantize_fp8_rows`, the KV cache's scale rule over the whole row), bit-exact
    with the reference for finite keys (as `encode_e4m3`'s). Cache strides in elements (bytes for FP8)."""
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(Slots + token).to(tl.int64)
    inside = (slot >= 0) & (slot < num_slots)  # -1 skips the token
    cols = tl.arange(0, BLOCK)
    mask = (cols < D_I) & ((tl.zeros([BLOCK], dtype=tl.int32) + inside.to(tl.int32)) != 0)
    row = Cache + (slot // page_block_size) * stride_block + (slot % page_block_size) * stride_row
    key = tl.load(Keys + token * stride_keys + cols, mask=mask, other=0.0)
    if IS_FP8:
        values = key.to(tl.float32)
        scale, inverse = fp8_power_of_two_scale(tl.max(tl.where(values == values, tl.abs(values), 0.0), 0))  # NaN: 0
        tl.store(row + cols, encode_e4m3(values * inverse, HW_FP8), mask=mask)
        tl.store((row + D_I).to(tl.pointer_type(tl.float32), bitcast=True), scale, mask=inside)
    else:
        tl.store(row + cols, key.to(Cache.dtype.element_ty), mask=mask)


def hardware_e4m3_encode(device: torch.device) -> bool:
    """The e4m3 cast is trusted to Triton only on a GPU that has the conversion (sm_89+): the interpreter's own
    conversion does not round to nearest-even, so under it the integer encoder runs."""
    return device.type == "cuda" and bool(hardware_fp8(device))


def _store_rows(cache, latent, rope, slot_mapping, is_fp8, page_block_size):
    num_tokens = latent.shape[0]
    if num_tokens == 0:
        return
    latent, rope = last_dim_contiguous(latent), last_dim_contiguous(rope)
    _store_kv_rows_kernel[(num_tokens,)](
        latent, rope, slot_mapping if slot_mapping is not None else latent, cache, latent.stride(0), rope.stride(0),
        cache.stride(0), cache.stride(1), page_block_size, cache.shape[0] * cache.shape[1],
        HAS_SLOTS=slot_mapping is not None, IS_FP8=is_fp8, HW_FP8=hardware_e4m3_encode(cache.device),
        D_NOPE=KV_LORA_RANK, D_ROPE=ROPE_DIM, TILE=FP8_TILE, INTERPRET=INTERPRET, num_warps=4)


def quantize_kv_fp8(kv: torch.Tensor) -> torch.Tensor:
    """BF16 `(..., 576)` -> uint8 `(..., 656)`; same contract as `flashmla::quantize_kv_fp8`."""
    lead = kv.shape[:-1]
    rows = kv.reshape(-1, KV_LORA_RANK + ROPE_DIM)
    out = torch.empty(rows.shape[0], 1, FP8_BYTES, dtype=torch.uint8, device=kv.device)
    _store_rows(out, rows[:, :KV_LORA_RANK], rows[:, KV_LORA_RANK:], None, True, 1)
    return out.view(*lead, FP8_BYTES)


def write_index_cache(index_cache, k, slot_mapping, is_fp8) -> None:
    """Same contract as `flashmla::write_index_cache` (`is_fp8`: a byte cache; the cache's strides as they are); the
    caller has checked shapes and slots, and for an FP8 cache 4-byte aligned rows (the scale's store)."""
    num_tokens, d_i = k.shape
    if num_tokens == 0 or d_i == 0:
        return
    cache = index_cache.view(torch.uint8) if is_fp8 else index_cache
    k = last_dim_contiguous(k)
    _store_index_rows_kernel[(num_tokens,)](
        k, slot_mapping, cache, k.stride(0), cache.stride(0), cache.stride(1), cache.shape[1],
        cache.shape[0] * cache.shape[1], IS_FP8=is_fp8, HW_FP8=hardware_e4m3_encode(cache.device), D_I=d_i,
        BLOCK=triton.next_power_of_2(d_i), num_warps=1 if d_i <= 128 else 4)


def write_kv_cache(kv_cache, latent, rope, slot_mapping, is_fp8) -> None:
    """Same contract as `flashmla::write_kv_cache` (the cache's strides are used as they are: padded blocks are
    fine); the caller has checked shapes and slots."""
    cache = kv_cache.view(torch.uint8) if is_fp8 else kv_cache
    # the kernel reads the slots packed (a strided view wrote rows to other tokens' slots)
    _store_rows(cache[:, :, 0], latent, rope, slot_mapping.contiguous(), is_fp8, kv_cache.shape[1])

