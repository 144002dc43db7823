"""KV-cache ops: the 656-byte FP8 layout (SPEC.md §3), and writing new tokens into the paged caches.

FP8 latent cache, per token (one KV head):
    bytes   0..511  512 float8_e4m3fn: latent / scale of its 128-wide tile
    bytes 512..527  4 float32 scales, scale = 2 ** ceil(log2(max(amax(tile) / 448, 1e-4)))
    bytes 528..655  64 bfloat16 RoPE values, unquantized
FP8 indexer key cache, per token: `d_i` float8_e4m3fn values then one float32 scale (same rule, one tile
of `d_i` values), `d_i + 4` bytes; a BF16 indexer key cache is `(num_blocks, page_block_size, d_i)`.
"""
import torch

from . import _ext
from ._checks import (FLOAT_DTYPES, FP8_LAYOUT_DTYPES, below, check, check_contiguous_last_dim, check_fp8_flag,
                      check_no_overlap, check_same_device, check_tensor, dense_aligned, require_tensor,
                      value_checks_apply)

KV_LORA_RANK = 512
ROPE_DIM = 64
D_QK = KV_LORA_RANK + ROPE_DIM
FP8_TILE = 128
FP8_BYTES = KV_LORA_RANK + 4 * 4 + ROPE_DIM * 2  # 656
FP8_MAX = 448.0
FP8_MIN_SCALE = 1e-4
PAGE_BLOCK_SIZE = 64


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """Power-of-two scale 2 ** ceil(log2(max(amax / 448, 1e-4))), computed exactly via frexp."""
    ratio = torch.clamp_min(amax.float() / FP8_MAX, FP8_MIN_SCALE)
    mantissa, exponent = torch.frexp(ratio)  # ratio = mantissa * 2**exponent, mantissa in [0.5, 1)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    return torch.ldexp(torch.ones_like(ratio), exponent)


def fp8_amax(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """max |x| over `dim` for the scale rule, NaNs skipped (as the kernels' fmaxf / tl.max skip them): a NaN is stored
    as an e4m3 NaN and the rest of its tile keeps the scale of its other values."""
    return x.abs().nan_to_num(nan=0.0, posinf=float("inf")).amax(dim, keepdim=keepdim)


def _to_fp8(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # Saturating cast (the CUDA kernels use __NV_SATFINITE); the scale rule keeps |values/scale| <= 448, a NaN a NaN.
    return torch.clamp(values / scale, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def quantize_kv_fp8_reference(kv: torch.Tensor) -> torch.Tensor:
    lead = kv.shape[:-1]
    nope = kv[..., :KV_LORA_RANK].float().reshape(*lead, KV_LORA_RANK // FP8_TILE, FP8_TILE)
    scale = fp8_scale(fp8_amax(nope, -1))
    out = torch.empty(*lead, FP8_BYTES, dtype=torch.uint8, device=kv.device)
    out[..., :KV_LORA_RANK] = _to_fp8(nope, scale[..., None]).reshape(*lead, KV_LORA_RANK).view(torch.uint8)
    out[..., KV_LORA_RANK:KV_LORA_RANK + 16] = scale.contiguous().view(torch.uint8)
    out[..., KV_LORA_RANK + 16:] = kv[..., KV_LORA_RANK:].to(torch.bfloat16).contiguous().view(torch.uint8)
    return out


def dequantize_kv_fp8_reference(kv_fp8: torch.Tensor) -> torch.Tensor:
    kv_fp8 = kv_fp8.view(torch.uint8)
    lead = kv_fp8.shape[:-1]
    values = kv_fp8[..., :KV_LORA_RANK].contiguous().view(torch.float8_e4m3fn).float()
    scale = kv_fp8[..., KV_LORA_RANK:KV_LORA_RANK + 16].contiguous().view(torch.float32)
    nope = values.reshape(*lead, KV_LORA_RANK // FP8_TILE, FP8_TILE) * scale[..., None]
    rope = kv_fp8[..., KV_LORA_RANK + 16:].contiguous().view(torch.bfloat16)
    return torch.cat([nope.reshape(*lead, KV_LORA_RANK).to(torch.bfloat16), rope], dim=-1)


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., d) -> float8_e4m3fn values `(..., d)` and float32 scales `(...)`, one power-of-two scale per row: the FP8
    indexer key cache's rule, so keys quantized here are what `write_index_cache` stores. The indexer ops' e4m3
    operands (`q` with `q_scale`, `k` with `k_scale`) come in this form."""
    x = x.float()
    scale = fp8_scale(fp8_amax(x, -1, keepdim=True))
    return _to_fp8(x, scale), scale[..., 0]


def quantize_index_fp8_reference(k: torch.Tensor) -> torch.Tensor:
    values, scale = quantize_fp8_rows(k)
    return torch.cat([values.view(torch.uint8), scale[..., None].contiguous().view(torch.uint8)], dim=-1)


def dequantize_index_fp8_reference(k_fp8: torch.Tensor) -> torch.Tensor:
    """(..., d_i + 4) uint8 -> (..., d_i) float32."""
    k_fp8 = k_fp8.view(torch.uint8)
    values = k_fp8[..., :-4].contiguous().view(torch.float8_e4m3fn).float()
    return values * k_fp8[..., -4:].contiguous().view(torch.float32)


# ---------------------------------------------------------------- quantize / dequantize ops


def _check_quantize(op: str, kv: torch.Tensor) -> None:
    require_tensor(op, "kv", kv)
    check_tensor(op, "kv", kv, (torch.bfloat16,), (None,) * (kv.dim() - 1) + (D_QK,), {})


def _check_dequantize(op: str, kv_fp8: torch.Tensor) -> None:
    require_tensor(op, "kv_fp8", kv_fp8)
    check_tensor(op, "kv_fp8", kv_fp8, FP8_LAYOUT_DTYPES, (None,) * (kv_fp8.dim() - 1) + (FP8_BYTES,), {})


@torch.library.custom_op("flashmla::quantize_kv_fp8", mutates_args=())
def quantize_kv_fp8(kv: torch.Tensor) -> torch.Tensor:
    """BF16 `(..., 576)` -> uint8 `(..., 656)` in the FP8 cache layout (SPEC.md §3)."""
    _check_quantize("quantize_kv_fp8", kv)
    for path in _ext.paths("quantize_kv_fp8", kv.device):
        if path == "cuda":
            return _ext.extension().quantize_kv_fp8(dense_aligned(kv))
        if path == "triton":
            from .triton import kv_cache as triton_kv_cache

            return triton_kv_cache.quantize_kv_fp8(kv)
    _ext.reference_fallback("quantize_kv_fp8", kv.device)
    return quantize_kv_fp8_reference(kv)


@quantize_kv_fp8.register_fake
def _(kv):
    _check_quantize("quantize_kv_fp8", kv)
    return kv.new_empty(*kv.shape[:-1], FP8_BYTES, dtype=torch.uint8)


@torch.library.custom_op("flashmla::dequantize_kv_fp8", mutates_args=())
def dequantize_kv_fp8(kv_fp8: torch.Tensor) -> torch.Tensor:
    """uint8 `(..., 656)` in the FP8 cache layout -> BF16 `(..., 576)`."""
    _check_dequantize("dequantize_kv_fp8", kv_fp8)
    ext = _ext.kernels("dequantize_kv_fp8", kv_fp8.device)
    if ext is not None:
        return ext.dequantize_kv_fp8(dense_aligned(kv_fp8.view(torch.uint8)))
    _ext.reference_fallback("dequantize_kv_fp8", kv_fp8.device)
    return dequantize_kv_fp8_reference(kv_fp8)


@dequantize_kv_fp8.register_fake
def _(kv_fp8):
    _check_dequantize("dequantize_kv_fp8", kv_fp8)
    return kv_fp8.new_empty(*kv_fp8.shape[:-1], D_QK, dtype=torch.bfloat16)


# ---------------------------------------------------------------- cache writes


def _check_slots(op: str, slot_mapping: torch.Tensor, num_slots: int, cache_name: str) -> None:
    if value_checks_apply(slot_mapping):
        bad = (slot_mapping < -1) | ~below(slot_mapping, num_slots)
        check(op, ~bad, f"slot_mapping entries must be -1 (skip) or in [0, {num_slots}) ({cache_name}'s num_blocks * "
                        f"page_block_size), got {slot_mapping[bad][:8].tolist()}")


def _check_write_kv(op, kv_cache, latent, rope, slot_mapping, is_fp8) -> None:
    dims = {}
    check_fp8_flag(op, "kv_cache", kv_cache, "is_fp8", is_fp8, FLOAT_DTYPES)
    row = FP8_BYTES if is_fp8 else D_QK
    dtypes = FP8_LAYOUT_DTYPES if is_fp8 else FLOAT_DTYPES
    check_tensor(op, "kv_cache", kv_cache, dtypes, ("num_blocks", "page_block_size", 1, row), dims)
    check_contiguous_last_dim(op, "kv_cache", kv_cache)
    check_no_overlap(op, "kv_cache", kv_cache)
    if is_fp8:
        check_tensor(op, "latent", latent, FLOAT_DTYPES, ("num_tokens", KV_LORA_RANK), dims)
    else:
        check_tensor(op, "latent", latent, (kv_cache.dtype,), ("num_tokens", KV_LORA_RANK), dims, dtype_from="kv_cache")
    check_tensor(op, "rope", rope, (latent.dtype,), ("num_tokens", ROPE_DIM), dims, dtype_from="latent")
    check_tensor(op, "slot_mapping", slot_mapping, (torch.int32, torch.int64), ("num_tokens",), dims)
    check_same_device(op, kv_cache=kv_cache, latent=latent, rope=rope, slot_mapping=slot_mapping)
    _check_slots(op, slot_mapping, kv_cache.shape[0] * kv_cache.shape[1], "kv_cache")  # values: never while tracing


def _aligned(cache: torch.Tensor, num_bytes: int) -> bool:
    """Whether the cache's base and block/row strides are multiples of `num_bytes`: the CUDA write kernel moves
    16-byte vectors, the Triton one stores the FP8 row's float32 scales."""
    element = cache.element_size()
    return all(x % num_bytes == 0 for x in (cache.data_ptr(), cache.stride(0) * element, cache.stride(1) * element))


def _scatter_rows(cache: torch.Tensor, rows: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """cache (num_blocks, page_block_size, ...) strided as it is; rows (num_tokens, ...); slot -1 skips a row, and so
    does a slot outside the cache (refused by the ops where they check values; on a GPU without FLASHMLA_CHECK it
    is skipped, as the kernels do, and not left to the scatter's device-side assert).

    Without a host sync (boolean indexing needs one, which a CUDA graph cannot capture): a skipped row repeats the
    first kept row's write (same slot, same values), or where no row is kept rewrites a slot with what it holds."""
    num_slots = cache.shape[0] * cache.shape[1]
    if slot_mapping.numel() == 0 or num_slots == 0:
        return  # no slot to write (a cache without slots: every slot_mapping entry must be -1, checked by the caller)
    keep = (slot_mapping >= 0) & below(slot_mapping, num_slots)
    first = keep.int().argmax().view(1)  # index_select, not t[first]: a 0-d index tensor would be read on the host
    slots = torch.where(keep, slot_mapping, slot_mapping.index_select(0, first).clamp(0, num_slots - 1)).long()
    block_size = cache.shape[1]
    blocks, offsets = slots // block_size, slots % block_size
    rows = rows.to(cache.dtype)
    fill = torch.where(keep.any(), rows.index_select(0, first), cache[blocks[:1], offsets[:1]])
    cache[blocks, offsets] = torch.where(keep.view(-1, *[1] * (rows.dim() - 1)), rows, fill)


def write_kv_cache_reference(kv_cache, latent, rope, slot_mapping, is_fp8) -> None:
    kv = torch.cat([latent, rope], dim=-1)
    if is_fp8:
        _scatter_rows(kv_cache.view(torch.uint8), quantize_kv_fp8_reference(kv)[:, None], slot_mapping)
    else:
        _scatter_rows(kv_cache, kv[:, None], slot_mapping)


@torch.library.custom_op("flashmla::write_kv_cache", mutates_args=("kv_cache",))
def write_kv_cache(kv_cache: torch.Tensor, latent: torch.Tensor, rope: torch.Tensor, slot_mapping: torch.Tensor,
                   is_fp8: bool) -> None:
    """Store new tokens in the paged latent cache.

    kv_cache: `(num_blocks, page_block_size, 1, 576)` bfloat16 (or float32), or
        `(num_blocks, page_block_size, 1, 656)` uint8 / float8_e4m3fn with `is_fp8` (SPEC.md §3 layout; the block
        stride may be padded).
    latent: `(num_tokens, 512)`, rope: `(num_tokens, 64)`: the cache's dtype (bfloat16 or float32 for FP8).
    slot_mapping: `(num_tokens,)` int32/int64 flat slot `block * page_block_size + row`; -1 skips the token. Two
        tokens with one slot: one of their rows lands, which one unspecified (as for any scatter). Other values
        outside `[0, num_blocks * page_block_size)` raise ValueError where values are checked (CPU tensors, or
        FLASHMLA_CHECK=1); otherwise the GPU kernels skip them like -1, never writing past the cache.
    """
    op = "write_kv_cache"
    _check_write_kv(op, kv_cache, latent, rope, slot_mapping, is_fp8)
    if kv_cache.shape[0] * kv_cache.shape[1] == 0:
        return  # no slot any token could go to (every slot is -1: checked above where values are checked)
    path = write_kv_cache_path(kv_cache, latent)
    if path == "cuda":
        _ext.extension().write_kv_cache(
            kv_cache.view(torch.uint8) if is_fp8 else kv_cache, dense_aligned(latent), dense_aligned(rope),
            slot_mapping.contiguous(), is_fp8)
        return
    if path == "triton":
        from .triton import kv_cache as triton_kv_cache

        triton_kv_cache.write_kv_cache(kv_cache, latent, rope, slot_mapping.contiguous(), is_fp8)
        return
    _ext.reference_fallback("write_kv_cache", kv_cache.device)
    write_kv_cache_reference(kv_cache, latent, rope, slot_mapping, is_fp8)


def write_kv_cache_path(kv_cache: torch.Tensor, latent: torch.Tensor) -> str:
    """The path `flashmla::write_kv_cache` takes for this cache and these rows: 'cuda' (csrc/kv_cache.cu: bfloat16
    rows, a 16-byte aligned cache), 'triton' (float32 rows too, a 4-byte aligned cache) or 'reference'."""
    for path in _ext.paths("write_kv_cache", kv_cache.device):
        if path == "cuda" and latent.dtype == torch.bfloat16 and _aligned(kv_cache, 16):
            return "cuda"
        if path == "triton" and _aligned(kv_cache, 4):
            return "triton"
    return "reference"


@write_kv_cache.register_fake
def _(kv_cache, latent, rope, slot_mapping, is_fp8):
    _check_write_kv("write_kv_cache", kv_cache, latent, rope, slot_mapping, is_fp8)


def _check_write_index(op, index_cache, k, slot_mapping) -> None:
    dims = {}
    check_tensor(op, "k", k, FLOAT_DTYPES, ("num_tokens", "d_i"), dims)
    is_fp8 = require_tensor(op, "index_cache", index_cache).dtype in FP8_LAYOUT_DTYPES
    if is_fp8 and dims["d_i"] == 0:  # no values to take a scale from (the reference's amax raised IndexError)
        raise ValueError(f"{op}: k must have shape (num_tokens, d_i) with d_i >= 1 for an FP8 index_cache, got "
                         f"{tuple(k.shape)}")
    if is_fp8:  # d_i e4m3 values and a float32 scale
        check_tensor(op, "index_cache", index_cache, FP8_LAYOUT_DTYPES, ("num_blocks", "page_block_size", ("d_i", 4)),
                     dims)
    else:
        check_tensor(op, "index_cache", index_cache, (k.dtype,), ("num_blocks", "page_block_size", "d_i"), dims,
                     dtype_from="k")
    check_contiguous_last_dim(op, "index_cache", index_cache)
    check_no_overlap(op, "index_cache", index_cache)
    check_tensor(op, "slot_mapping", slot_mapping, (torch.int32, torch.int64), ("num_tokens",), dims)
    check_same_device(op, index_cache=index_cache, k=k, slot_mapping=slot_mapping)
    _check_slots(op, slot_mapping, index_cache.shape[0] * index_cache.shape[1], "index_cache")  # never while tracing


@torch.library.custom_op("flashmla::write_index_cache", mutates_args=("index_cache",))
def write_index_cache(index_cache: torch.Tensor, k: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store new tokens' indexer keys in the paged indexer key cache.

    index_cache: `(num_blocks, page_block_size, d_i)` bfloat16, or `(num_blocks, page_block_size, d_i + 4)` uint8
        (FP8: d_i >= 1 float8_e4m3fn values and one float32 power-of-two scale per token).
    k: `(num_tokens, d_i)` bfloat16 (float32 for a float32 cache); slot_mapping: `(num_tokens,)` int32/int64, -1 skips
    the token.
    """
    op = "write_index_cache"
    _check_write_index(op, index_cache, k, slot_mapping)
    if index_cache.shape[0] * index_cache.shape[1] == 0:
        return  # no slot any token could go to (every slot is -1: checked above where values are checked)
    is_fp8 = index_cache.dtype not in FLOAT_DTYPES
    for path in _ext.paths("write_index_cache", index_cache.device):
        if path == "triton" and (not is_fp8 or (_aligned(index_cache, 4) and k.shape[1] % 4 == 0)):
            from .triton import kv_cache as triton_kv_cache

            triton_kv_cache.write_index_cache(index_cache, k, slot_mapping.contiguous(), is_fp8)
            return
    _ext.reference_fallback("write_index_cache", index_cache.device)
    write_index_cache_reference(index_cache, k, slot_mapping)  # plain torch ops on any device, no host sync


def write_index_cache_reference(index_cache, k, slot_mapping) -> None:
    if index_cache.dtype in FLOAT_DTYPES:
        _scatter_rows(index_cache, k, slot_mapping)
    else:
        _scatter_rows(index_cache.view(torch.uint8), quantize_index_fp8_reference(k), slot_mapping)


@write_index_cache.register_fake
def _(index_cache, k, slot_mapping):
    _check_write_index("write_index_cache", index_cache, k, slot_mapping)
