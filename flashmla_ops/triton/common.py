"""Triton building blocks shared by the MLA kernels: the MMA wrapper, KV-tile loads from BF16 and FP8 cache rows,
the final normalisation, device limits, and the launch that falls back to smaller tiles where a GPU's shared memory
is smaller than Hopper's."""
import functools
import logging
import os
from collections.abc import Callable, Hashable, Sequence

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from ..kv_cache import KV_LORA_RANK

LOG2E = 1.4426950408889634
# Whether Triton runs kernels in its interpreter: its own reading of TRITON_INTERPRET (which takes "1", "true",
# "on", ...), where the Triton version has `knobs` (3.4 on), else the "1" older versions test for.
INTERPRET = (bool(triton.knobs.runtime.interpret) if hasattr(triton, "knobs")
             else os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def mma(a, b, INTERPRET: tl.constexpr):
    """bf16 x bf16 -> fp32 on the tensor cores; the CPU interpreter mis-multiplies bf16, so it gets the same (exact)
    bf16 values as float32."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


@triton.jit
def mask_logits_apart(s, keep, taken):
    """`tl.where(keep, s, -inf)` inside a branch on `taken`, which the caller's loop makes true (its own condition:
    false, the mask would not apply). Triton 3.x lays out a product whose result reaches another product (the logits
    reach P V through the softmax) with every warp on its rows (the chained-dot rule of its AccelerateMatmul pass):
    with 64 rows and 8 warps both warpgroups then compute all of S, 1.53x the MLA FLOPs (docs/HISTORY.md, stop 52).
    The pass looks for that reach in the forward slice of the product's result, which ends at a branch's yield, so
    behind the branch S's products split their columns over the warpgroups and P goes to P V's layout through
    shared memory. Each of the logits' products must be scaled before the sum (`mma(a, b) * c + mma(d, e) * c`):
    a product added to another's result becomes its accumulator, and so reaches it."""
    if taken:
        s = tl.where(keep, s, float("-inf"))
    return s


# How the kernels decode e4m3 (their HW_FP8 constexpr, from hardware_fp8): with integer ops before sm_89; on sm_89
# (Ada) to f16 by the conversion instructions and to bf16 with integer ops; from sm_90 by the conversion instructions
# both ways. The Triton 3.6 of torch 2.11 (the device machine's, stop 43) compiles e4m3 -> bf16 for sm_89 to a
# `cvt.bf16.f16` that ptxas takes from sm_90 only, so the FP8 dense decode's bf16 products did not build for Ada.
FP8_INTEGER, FP8_TO_F16, FP8_HARDWARE = 0, 1, 2


def fp8_conversion(capability: tuple[int, int]) -> int:
    """The e4m3 decoding (FP8_INTEGER, FP8_TO_F16, FP8_HARDWARE) for a GPU of compute capability `capability`."""
    if capability >= (9, 0):
        return FP8_HARDWARE
    return FP8_TO_F16 if capability >= (8, 9) else FP8_INTEGER


@triton.jit
def e4m3_to_bf16(raw, HW_FP8: tl.constexpr):
    """e4m3 bytes (uint8) as bf16, exactly: the conversion instructions from sm_90 (HW_FP8 FP8_HARDWARE), else the
    e4m3 bits shifted into a float32 (the value times 2**-120) and rescaled."""
    if HW_FP8 >= 2:  # FP8_HARDWARE
        values = raw.to(tl.float8e4nv, bitcast=True).to(tl.bfloat16)
    else:
        bits = raw.to(tl.int32)
        bits = ((bits & 0x80) << 24) | ((bits & 0x7F) << 20)
        values = (bits.to(tl.float32, bitcast=True) * 1.329227995784916e36).to(tl.bfloat16)  # 2**120
    return values


@triton.jit
def e4m3_to_f16(raw, HW_FP8: tl.constexpr):
    """e4m3 bytes (uint8) as f16, exactly: the value (one conversion per pair, sm_89+), or without hardware conversion
    the value times 2**-8 (the e4m3 bits shifted into an f16's sign/exponent/mantissa: biases 15 and 7, subnormals
    included), which the caller's scale must undo."""
    if HW_FP8:
        values = raw.to(tl.float8e4nv, bitcast=True).to(tl.float16)
    else:
        bits = raw.to(tl.int16)
        values = (((bits & 0x80) << 8) | ((bits & 0x7F) << 7)).to(tl.float16, bitcast=True)
    return values


@triton.jit
def f16_row_scaling(largest):
    """(multiplier, inverse): powers of two such that `largest` (a row's largest magnitude, float32) times the
    multiplier lies in [2**14, 2**15): in f16's normal range, so a bf16 row so scaled is exact in f16 (11 significant
    bits against bf16's 8) down to 2**-29 of its largest value. Built from the exponent bits, so both are exact; rows
    below 2**-112 (zeros included) take 2**126 and 2**-126."""
    exponent = tl.minimum(tl.maximum((largest.to(tl.int32, bitcast=True) >> 23) & 0xFF, 15), 254)
    multiplier = ((268 - exponent) << 23).to(tl.float32, bitcast=True)  # 2**(14 - floor(log2(largest)))
    inverse = ((exponent - 14) << 23).to(tl.float32, bitcast=True)
    return multiplier, inverse


@triton.jit
def load_latent_subtile(KV, row_offset, tok_mask, COL0: tl.constexpr, WIDTH: tl.constexpr, IS_FP8: tl.constexpr,
                        HW_FP8: tl.constexpr, F16: tl.constexpr = False, CACHE: tl.constexpr = None):
    """Latent columns [COL0, COL0 + WIDTH) of the rows at `row_offset` (elements of KV: bf16 for a BF16 cache, bytes
    for FP8) as bf16, or FP8 as f16 with `F16` (see e4m3_to_f16: without hardware conversion those come times
    2**-8); FP8 values come unscaled (the caller applies the tile's scale to the products). The bf16 values are exact
    either way (e4m3_to_bf16). `CACHE`: the FP8 load's cache modifier (load_fp8_bytes)."""
    if IS_FP8:
        values = fp8_values(load_fp8_bytes(KV, row_offset, tok_mask, COL0, WIDTH, CACHE), HW_FP8, F16)
    else:
        cols = COL0 + tl.arange(0, WIDTH)
        values = tl.load(KV + row_offset[:, None] + cols[None, :], mask=tok_mask[:, None], other=0.0)
    return values


@triton.jit
def load_fp8_bytes(KV, row_offset, tok_mask, COL0: tl.constexpr, WIDTH: tl.constexpr, CACHE: tl.constexpr = None):
    """The e4m3 bytes of latent columns [COL0, COL0 + WIDTH) of the rows at `row_offset` (bytes of an FP8 cache).
    `CACHE`: tl.load's cache modifier; a second load of the same bytes with another one stays a load of its own (not
    merged with the first), which the compiler's pipelining then takes through shared memory (decode's RELOAD)."""
    cols = COL0 + tl.arange(0, WIDTH)
    if CACHE is None:  # not a default of "": Triton 3.6 does not take a str default of a nested call as a constexpr
        return tl.load(KV + row_offset[:, None] + cols[None, :], mask=tok_mask[:, None], other=0)
    return tl.load(KV + row_offset[:, None] + cols[None, :], mask=tok_mask[:, None], other=0, cache_modifier=CACHE)


@triton.jit
def fp8_values(raw, HW_FP8: tl.constexpr, F16: tl.constexpr):
    """e4m3 bytes as bf16 (e4m3_to_bf16), or as f16 with `F16` (e4m3_to_f16)."""
    if F16:
        values = e4m3_to_f16(raw, HW_FP8)
    else:
        values = e4m3_to_bf16(raw, HW_FP8)
    return values


@triton.jit
def load_tile_scale(KV, row_offset, tok_mask, TILE_INDEX: tl.constexpr, D_NOPE: tl.constexpr):
    """The float32 scale of FP8 tile TILE_INDEX for each row (bytes D_NOPE + 4 * TILE_INDEX of the row)."""
    scale_ptr = (KV + row_offset + D_NOPE + 4 * TILE_INDEX).to(tl.pointer_type(tl.float32), bitcast=True)
    return tl.load(scale_ptr, mask=tok_mask, other=0.0)


@triton.jit
def load_rope(KV, row_offset, tok_mask, IS_FP8: tl.constexpr, D_NOPE: tl.constexpr, D_ROPE: tl.constexpr,
              NUM_TILES: tl.constexpr):
    """The bf16 RoPE columns of the rows: after the latent in a BF16 row, after the latent and scales in FP8."""
    cols = tl.arange(0, D_ROPE)
    if IS_FP8:
        rope_ptr = (KV + row_offset + D_NOPE + 4 * NUM_TILES).to(tl.pointer_type(tl.bfloat16), bitcast=True)
        rope = tl.load(rope_ptr[:, None] + cols[None, :], mask=tok_mask[:, None], other=0.0)
    else:
        rope = tl.load(KV + row_offset[:, None] + D_NOPE + cols[None, :], mask=tok_mask[:, None], other=0.0)
    return rope


@triton.jit
def load_kv_tile(KV, row_offset, tok_mask, IS_FP8: tl.constexpr, D_NOPE: tl.constexpr, D_ROPE: tl.constexpr,
                  TILE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows at `row_offset` (elements of KV: bf16 for a BF16 cache, bytes for FP8) -> (nope, rope) bf16 tiles."""
    nope_cols = tl.arange(0, D_NOPE)
    rope_cols = tl.arange(0, D_ROPE)
    if IS_FP8:
        raw = tl.load(KV + row_offset[:, None] + nope_cols[None, :], mask=tok_mask[:, None], other=0).to(tl.int32)
        bits = ((raw & 0x80) << 24) | ((raw & 0x7F) << 20)
        values = bits.to(tl.float32, bitcast=True) * 1.329227995784916e36  # 2**120: float32 bias 127 - e4m3 bias 7
        scale_ptr = (KV + row_offset + D_NOPE).to(tl.pointer_type(tl.float32), bitcast=True)
        scales = tl.load(scale_ptr[:, None] + tl.arange(0, D_NOPE // TILE)[None, :], mask=tok_mask[:, None], other=0.0)
        values = tl.reshape(values, (BLOCK_N, D_NOPE // TILE, TILE)) * scales[:, :, None]
        nope = tl.reshape(values, (BLOCK_N, D_NOPE)).to(tl.bfloat16)
        rope_ptr = (KV + row_offset + D_NOPE + 4 * (D_NOPE // TILE)).to(tl.pointer_type(tl.bfloat16), bitcast=True)
        rope = tl.load(rope_ptr[:, None] + rope_cols[None, :], mask=tok_mask[:, None], other=0.0)
    else:
        nope = tl.load(KV + row_offset[:, None] + nope_cols[None, :], mask=tok_mask[:, None], other=0.0)
        rope = tl.load(KV + row_offset[:, None] + D_NOPE + rope_cols[None, :], mask=tok_mask[:, None], other=0.0)
    return nope, rope


@triton.jit
def latent_logits(q_nope, q_rope, k_nope, k_rope, keep, taken, sm_scale_log2, INTERPRET: tl.constexpr,
                  APART: tl.constexpr):
    """Base-2 logits of the 576-wide rows (the latent's product and the RoPE columns'), -inf where not `keep`. With
    APART each product is scaled before the sum and the mask is behind a branch on `taken` (the caller's loop
    condition, true; mask_logits_apart)."""
    if APART:
        s = (mma(q_nope, tl.trans(k_nope), INTERPRET) * sm_scale_log2
             + mma(q_rope, tl.trans(k_rope), INTERPRET) * sm_scale_log2)
        return mask_logits_apart(s, keep, taken)
    s = mma(q_nope, tl.trans(k_nope), INTERPRET) + mma(q_rope, tl.trans(k_rope), INTERPRET)
    return tl.where(keep, s * sm_scale_log2, float("-inf"))


@triton.jit
def softmax_weights(s, m_i, l_i):
    """The online softmax (base 2) over one more tile of logits `s` (rows x tokens), from the running maximum `m_i`
    and sum `l_i`: (the new maximum, the tile's weights p, alpha: what moves the earlier sum and accumulators to the
    new maximum, the new sum). Rows that have seen no key keep maximum -inf, weights 0."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - shift[:, None])
    alpha = tl.exp2(m_i - shift)
    return m_new, p, alpha, l_i * alpha + tl.sum(p, 1)


@triton.jit
def softmax_step(s, values, m_i, l_i, acc, INTERPRET: tl.constexpr):
    """One online-softmax update (base 2) with a tile of logits `s` and its values."""
    m_new, p, alpha, l_i = softmax_weights(s, m_i, l_i)
    acc = acc * alpha[:, None] + mma(p.to(tl.bfloat16), values, INTERPRET)
    return m_new, l_i, acc


@triton.jit
def finish(acc, m_i, l_i, Sink, heads, row_mask, APPLY_SINK: tl.constexpr):
    """Normalised output and natural-log LSE (0 and +inf for rows that saw nothing), attention sink applied."""
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    if APPLY_SINK:
        sink = tl.load(Sink + heads, mask=row_mask, other=0.0)
        out = out * tl.where(empty, 1.0, 1.0 / (1.0 + tl.exp(sink - lse)))[:, None]  # empty: 0, even at sink +inf
    return out, lse


def require_d_v(op: str, name: str, d_v: int) -> None:
    """The attention kernels store the 512 value columns whatever the output's width: another would be written past
    (the ops send other widths to their references)."""
    if d_v != KV_LORA_RANK:
        raise ValueError(f"triton {op}: the kernel writes {name} {KV_LORA_RANK} columns, got {d_v} (the op sends "
                         f"other widths to its reference)")


def nonempty(cache: torch.Tensor) -> torch.Tensor:
    """A cache of no blocks (rows) has nothing a kernel may read, but a kernel still takes its pointer: one zero
    block (row) in its place, never read (every length is then 0 and every index invalid)."""
    return cache if cache.shape[0] else cache.new_zeros(1, *cache.shape[1:])


def amd_gpus() -> bool:
    """Whether this torch is ROCm's: it names AMD GPUs "cuda" devices too, and their capability is the gfx version
    (gfx90a reads (9, 0), as Hopper does), so no rule keyed on an sm_XY applies to them."""
    return torch.version.hip is not None


@functools.cache
def hardware_fp8(device: torch.device) -> int:
    """How the kernels decode e4m3 on `device` (fp8_conversion's level, nonzero from sm_89, where Triton has some
    conversion instructions): FP8_HARDWARE under the interpreter, which emulates the conversion. On AMD GPUs the
    integer decoding, the interpreter's bit-for-bit checked one: Triton's conversions of the cache's OCP e4m3 (its
    float8e4nv) there, its own sequence on CDNA3 (whose instructions take the FNUZ format) and native on gfx950, have
    run nowhere."""
    if device.type != "cuda":
        return FP8_HARDWARE
    if amd_gpus():
        return FP8_INTEGER
    return fp8_conversion(torch.cuda.get_device_capability(device))


@functools.cache
def warpgroup_products(device: torch.device) -> bool:
    """Whether Triton lowers 64-row products to wgmma on `device` (sm_90), where the chained-dot rule that
    mask_logits_apart works around doubles the logits' products; mma.sync (sm_80, sm_89, sm_120) lays the same
    kernels out without the doubling (compiled for sm_80, 64 x 32 tiles at 8 warps issue 208 mma.sync either way).
    AMD GPUs have no wgmma (CDNA's gfx9xx read a major of 9 all the same)."""
    device = torch.device(device)
    return (device.type == "cuda" and torch.cuda.is_available() and not amd_gpus()
            and torch.cuda.get_device_capability(device)[0] == 9)


@functools.cache
def device_limits(device: torch.device) -> tuple[int, int]:
    """(multiprocessors, shared memory per block) of a CUDA device; small stand-ins for the CPU interpreter."""
    if device.type != "cuda":
        return 4, 100 * 1024
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count, getattr(props, "shared_memory_per_block_optin", 100 * 1024)


_FITTING: dict[Hashable, object] = {}


def launch_fitting(key: Hashable, configs: Sequence, launch: Callable) -> None:
    """`launch(config)` with the first of `configs` (the preferred first) whose kernels the GPU can hold. Hopper takes
    every op's first tiles; GPUs with less shared memory per block (Ampere 163 KiB, Ada and consumer Blackwell 99 KiB,
    CDNA 64 KiB) refuse some, as a B200 does the dense decode's 64-row tiles for their tensor memory (576 columns of
    its 512), and Triton says so by OutOfResources when it loads the compiled kernel, before anything is launched:
    the next config is tried. Refused kernels never ran, and the kernels overwrite their outputs, so a retry writes
    each output once. The config that ran is kept per `key` (the op, its ladder, its variant, the device), and later
    calls start from it; variants under one key that differ in no more than a split flag may thus take tiles a
    little smaller than they could."""
    saved = _FITTING.get(key)
    start = configs.index(saved) if saved in configs else 0
    refused = []
    for config in configs[start:]:
        try:
            launch(config)
        except OutOfResources as error:
            refused.append(f"{config}: {error}")
            continue
        if refused:  # once per key (later calls start from the config that ran): which tiles this GPU takes instead
            logging.getLogger("flashmla_ops").info("flashmla_ops: %s: the GPU refused %s; running %s", key, refused,
                                                    config)
        _FITTING[key] = config
        return
    raise RuntimeError(f"{key}: no tile config fits this GPU; refused: {refused}")


# Programs a launch grid may have in its second and third dimensions (CUDA's limit; the first takes 2**31 - 1)
MAX_GRID_Y = 65535


def batch_grid(tiles: int, batch: int, *rest: int) -> tuple[tuple[int, ...], bool]:
    """The grid of a launch of `tiles` programs (of query rows) per sequence, then `rest` (splits): (tiles, batch,
    *rest), or (tiles x batch, *rest) for more sequences than MAX_GRID_Y; and whether it is the latter, the kernel's
    WIDE_BATCH (grid_position). Either way a sequence's tiles are launched together (they read the same keys: L2)."""
    if batch > MAX_GRID_Y:
        return (tiles * batch, *rest), True
    return (tiles, batch, *rest), False


@triton.jit
def grid_position(tiles, WIDE_BATCH: tl.constexpr):
    """(tile, sequence, split) of a program of batch_grid's launch (split: the dimension after the batch's, 0 where
    there is none). Only the wide launch divides: the division keeps the sequence in a register through the kernel
    (compiled for sm_90, the 64-row BF16 default then spills 24-32 bytes a thread), where the grid's second index is
    read again for free."""
    if WIDE_BATCH:
        pid = tl.program_id(0)
        tile, sequence, split = pid % tiles, (pid // tiles).to(tl.int64), tl.program_id(1)
    else:
        tile, sequence, split = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    return tile, sequence, split
