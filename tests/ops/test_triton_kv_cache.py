"""The Triton KV-cache kernels against the references, bit for bit: on the CPU under Triton's interpreter (integer e4m3
encoder), and on a GPU (hardware e4m3 conversion on sm_89+, and the integer encoder); and the ops dispatching to them.

Inputs cover every e4m3 rounding case: values exactly halfway between two e4m3 numbers (ties to even), subnormals,
values that saturate, tiles whose amax / 448 is exactly a power of two, all-zero tiles (scale 1e-4 -> 2**-13) and
huge/tiny magnitudes.
"""
import pytest
import torch

from flashmla_ops import reference
from flashmla_ops.kv_cache import (D_QK, FP8_BYTES, KV_LORA_RANK, ROPE_DIM, quantize_kv_fp8_reference,
                                   write_index_cache_reference, write_kv_cache_reference)

triton_kv_cache = pytest.importorskip("flashmla_ops.triton.kv_cache", exc_type=ImportError)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def e4m3_halfway_points() -> torch.Tensor:
    """Every midpoint between consecutive finite e4m3 values, both signs (float32: exact)."""
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    finite = values[torch.isfinite(values)].unique().sort().values
    middle = (finite[1:] + finite[:-1]) / 2
    return torch.cat([middle, -middle])


def hard_rows(num_tokens: int, generator: torch.Generator, dtype=torch.bfloat16) -> torch.Tensor:
    """(num_tokens, 576): random rows over six decades; in the first six tokens, tiles of e4m3 halfway points times
    2**k whose amax is exactly 448 * 2**k (amax / 448 a power of two) and RoPE values halfway between two bfloat16
    numbers (float32 rows: ties to even); an all-zero latent; a 1e-30-scaled latent with one tile scaled back up
    (subnormal results)."""
    kv = torch.randn(num_tokens, D_QK, generator=generator) * torch.logspace(-3, 3, num_tokens)[:, None]
    rope = torch.randn(min(num_tokens, 6), ROPE_DIM, generator=generator).bfloat16().float()
    kv[:len(rope), KV_LORA_RANK:] = (rope.view(torch.int32) | 0x8000).view(torch.float32)  # half a bfloat16 ulp up
    halfway = e4m3_halfway_points()
    halfway = halfway[halfway.abs() <= 448]
    tiles = kv[:, :KV_LORA_RANK].view(num_tokens, 4, 128)
    for token in range(min(num_tokens, 6)):
        for tile in range(4):
            picks = halfway[torch.randint(len(halfway), (128,), generator=generator)]
            picks[0] = 448.0
            tiles[token, tile] = picks * 2.0 ** (3 * token - 6 + tile)
    if num_tokens > 7:
        kv[6, :KV_LORA_RANK] = 0.0
        kv[7, :KV_LORA_RANK] *= 1e-30
        tiles[7, 1] *= 1e30
    return kv.to(dtype)


def test_integer_e4m3_encoder_matches_torch_on_every_halfway_point():
    import triton
    import triton.language as tl

    @triton.jit
    def encode_kernel(X, Y, N, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(X + offsets, mask=offsets < N)
        tl.store(Y + offsets, triton_kv_cache.encode_e4m3(x, HW_FP8=False), mask=offsets < N)

    halfway = e4m3_halfway_points()
    values = torch.cat([halfway, halfway.nextafter(torch.zeros_like(halfway)), halfway.nextafter(halfway * 2),
                        torch.tensor([0.0, -0.0, 1e-30, -1e-30, 2.0 ** -10, 3 * 2.0 ** -11, 447.99, 448.0, -448.0,
                                      460.0, -1e6, 2.0 ** -9, 2.0 ** -6, 2.0 ** -6 - 2.0 ** -10])]).to(DEVICE)
    codes = torch.empty(values.shape, dtype=torch.uint8, device=DEVICE)
    encode_kernel[(triton.cdiv(values.numel(), 1024),)](values, codes, values.numel(), BLOCK=1024)
    want = values.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(codes, want), values[codes != want][:8]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_quantize_kv_fp8_is_bit_exact(dtype):
    kv = hard_rows(13, torch.Generator().manual_seed(1), dtype).to(DEVICE).view(13, 1, D_QK)
    out = triton_kv_cache.quantize_kv_fp8(kv)
    want = quantize_kv_fp8_reference(kv)
    assert out.shape == (13, 1, FP8_BYTES) and out.dtype == torch.uint8
    assert torch.equal(out, want)


def test_triton_quantize_kv_fp8_keeps_subnormal_rope_bits():
    """RoPE values are stored as they are, bit for bit, subnormal bfloat16 ones too: the kernel widened bfloat16 RoPE to
    float32 and rounded it back, and the CPU interpreter widens bfloat16 subnormals wrongly (bits 11 stored as 48)."""
    kv = hard_rows(3, torch.Generator().manual_seed(8)).to(DEVICE)
    subnormal = (torch.arange(3 * ROPE_DIM, dtype=torch.int16) % 127 + 1).view(torch.bfloat16).view(3, ROPE_DIM)
    kv[:, KV_LORA_RANK:] = subnormal.to(DEVICE) * torch.tensor([1.0, -1.0], device=DEVICE).repeat(ROPE_DIM // 2)
    out = triton_kv_cache.quantize_kv_fp8(kv)
    assert torch.equal(out[:, KV_LORA_RANK + 16:], kv[:, KV_LORA_RANK:].contiguous().view(torch.uint8))
    assert torch.equal(out, quantize_kv_fp8_reference(kv))


def test_triton_fp8_writes_saturate_an_infinite_value_as_the_reference():
    """A tile (or index key) holding +-inf: scale 1 and the infinity saturated to +-448, as the reference's frexp (and
    CUDA's frexpf) give; the Triton scale came out as 2**128 with an inverse of -inf, every value of the tile +-inf with
    its sign flipped."""

    kv = hard_rows(3, torch.Generator().manual_seed(5)).to(DEVICE)
    kv[0, 3], kv[1, 300], kv[2, 0], kv[2, 200] = float("inf"), float("-inf"), float("inf"), float("-inf")
    assert torch.equal(triton_kv_cache.quantize_kv_fp8(kv), quantize_kv_fp8_reference(kv))
    cache = torch.zeros(1, 64, 36, dtype=torch.uint8, device=DEVICE)
    want = cache.clone()
    slots = torch.arange(3, device=DEVICE)
    triton_kv_cache.write_index_cache(cache, kv[:, :32], slots, True)
    write_index_cache_reference(want, kv[:, :32], slots)
    assert torch.equal(cache, want)


def test_fp8_writes_keep_a_nan_a_nan_and_its_tiles_scale():
    """A NaN in a tile (or index key) is stored as an e4m3 NaN, the rest of the tile quantized with the scale of its
    other values (the kernels' fmaxf / tl.max skip NaNs), by the reference and the Triton kernel alike: the kernels'
    clamp turned the NaN into -448 * scale (a silent finite value), the reference's frexp(NaN) gave the tile scale 1."""
    from flashmla_ops.kv_cache import fp8_scale

    kv = hard_rows(3, torch.Generator().manual_seed(6)).to(DEVICE)
    clean = kv.clone()
    kv[0, 0], kv[0, 200], kv[1, 511], kv[2, 128:256] = float("nan"), float("nan"), float("nan"), float("nan")
    want = quantize_kv_fp8_reference(kv)
    assert torch.equal(triton_kv_cache.quantize_kv_fp8(kv), want)
    values = want[..., :KV_LORA_RANK].view(torch.float8_e4m3fn).float()
    assert torch.equal(values.isnan(), kv[..., :KV_LORA_RANK].isnan())
    scales = want[..., KV_LORA_RANK:KV_LORA_RANK + 16].view(torch.float32)
    clean[2, 128:256] = 0.0  # an all-NaN tile: the scale of no values, 2**-13
    assert torch.equal(scales, fp8_scale(clean[:, :KV_LORA_RANK].float().view(3, 4, 128).abs().amax(-1)))
    cache = torch.zeros(1, 64, 36, dtype=torch.uint8, device=DEVICE)
    want = cache.clone()
    slots = torch.arange(3, device=DEVICE)
    triton_kv_cache.write_index_cache(cache, kv[:, 128:160], slots, True)
    write_index_cache_reference(want, kv[:, 128:160], slots)
    assert torch.equal(cache, want)
    assert want[0, 2, :32].view(torch.float8_e4m3fn).float().isnan().all()


def make_cache(num_blocks, page_block_size, is_fp8, padded, dtype=torch.bfloat16):
    row = FP8_BYTES if is_fp8 else D_QK
    cache_dtype = torch.uint8 if is_fp8 else dtype
    pad = 48 if padded else 0  # a slice of a wider buffer: block stride > page_block_size * row
    buffer = torch.randint(0, 255, (num_blocks, page_block_size * row + pad), dtype=torch.uint8, device=DEVICE)
    if not is_fp8:
        buffer = torch.randn(num_blocks, page_block_size * row + pad, device=DEVICE).to(cache_dtype)
    return buffer[:, :page_block_size * row].view(num_blocks, page_block_size, 1, row)


@pytest.mark.parametrize("is_fp8", [False, True])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("padded", [False, True])
def test_triton_write_kv_cache_matches_reference(is_fp8, slot_dtype, padded):
    generator = torch.Generator().manual_seed(7 + is_fp8)
    num_blocks, page_block_size, num_tokens = 5, 64, 11
    kv = hard_rows(num_tokens, generator).to(DEVICE)
    slots = torch.randperm(num_blocks * page_block_size, generator=generator)[:num_tokens].to(DEVICE, slot_dtype)
    slots[[2, 5]] = -1  # padding tokens are skipped
    slots[0] = num_blocks * page_block_size - 1  # the very last row
    cache = make_cache(num_blocks, page_block_size, is_fp8, padded)
    want = cache.clone()
    triton_kv_cache.write_kv_cache(cache, kv[:, :KV_LORA_RANK], kv[:, KV_LORA_RANK:], slots, is_fp8)
    write_kv_cache_reference(want, kv[:, :KV_LORA_RANK], kv[:, KV_LORA_RANK:], slots, is_fp8)
    assert torch.equal(cache.view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("is_fp8", [False, True])
def test_triton_write_kv_cache_skips_slots_past_the_cache(is_fp8):
    """A slot past the cache (the op refuses it on the CPU, but on a GPU checks values only with FLASHMLA_CHECK=1) is
    skipped like -1: it must not land in the memory after the cache, here the next layer's cache of one pool."""
    generator = torch.Generator().manual_seed(11 + is_fp8)
    kv = hard_rows(5, generator).to(DEVICE)
    pool = make_cache(3, 64, is_fp8, padded=False)
    cache = pool[:2]
    slots = torch.tensor([128, 5, 2 * 128 + 3, -1, 127], dtype=torch.int64, device=DEVICE)
    want = pool.clone()
    triton_kv_cache.write_kv_cache(cache, kv[:, :KV_LORA_RANK], kv[:, KV_LORA_RANK:], slots, is_fp8)
    write_kv_cache_reference(want[:2], kv[:, :KV_LORA_RANK], kv[:, KV_LORA_RANK:], slots.where(slots < 128, -1),
                             is_fp8)
    assert torch.equal(pool.view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("index", [False, True])
@pytest.mark.parametrize("is_fp8", [False, True])
def test_triton_cache_writes_skip_minus_one_slots_before_the_cache(index, is_fp8):
    """-1 slots (padding tokens) write nothing, not even a row's scale before the cache (its row -1, the previous
    layer's last row in one pool): the KV cache and the index cache, with the cache in the middle of the pool."""
    generator = torch.Generator().manual_seed(19 + 2 * index + is_fp8)
    pool = make_index_cache(4, 32, is_fp8, padded=False) if index else make_cache(4, 64, is_fp8, padded=False)
    cache = pool[1:3]
    slots = torch.tensor([-1, 5, -1, 127, -1], dtype=torch.int64, device=DEVICE)
    want = pool.clone()
    if index:
        keys = index_keys(5, 32, generator).to(DEVICE)
        triton_kv_cache.write_index_cache(cache, keys, slots, is_fp8)
        write_index_cache_reference(want[1:3], keys, slots)
    else:
        kv = hard_rows(5, generator).to(DEVICE)
        triton_kv_cache.write_kv_cache(cache, kv[:, :KV_LORA_RANK], kv[:, KV_LORA_RANK:], slots, is_fp8)
        write_kv_cache_reference(want[1:3], kv[:, :KV_LORA_RANK], kv[:, KV_LORA_RANK:], slots, is_fp8)
    assert torch.equal(pool.view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("is_fp8", [False, True])
def test_triton_write_kv_cache_takes_strided_slots(is_fp8):
    """slot_mapping as a strided view (every other entry of a wider tensor): the kernel read it as packed and wrote
    rows to the gaps' slots."""
    generator = torch.Generator().manual_seed(13 + is_fp8)
    kv = hard_rows(3, generator).to(DEVICE)
    cache = make_cache(2, 64, is_fp8, padded=False)
    want = cache.clone()
    slots = torch.tensor([1, 99, 2, 99, 3, 99], dtype=torch.int64, device=DEVICE)[::2]
    triton_kv_cache.write_kv_cache(cache, kv[:, :KV_LORA_RANK], kv[:, KV_LORA_RANK:], slots, is_fp8)
    write_kv_cache_reference(want, kv[:, :KV_LORA_RANK], kv[:, KV_LORA_RANK:], slots, is_fp8)
    assert torch.equal(cache.view(torch.uint8), want.view(torch.uint8))


def test_triton_write_kv_cache_fp8_from_float32_and_other_page_size():
    generator = torch.Generator().manual_seed(3)
    kv = hard_rows(9, generator, torch.float32).to(DEVICE)
    slots = torch.tensor([0, 17, -1, 33, 5, 40, -1, 1, 39], dtype=torch.int32, device=DEVICE)
    cache = make_cache(3, 16, True, padded=True)
    want = cache.clone()
    triton_kv_cache.write_kv_cache(cache, kv[:, :KV_LORA_RANK], kv[:, KV_LORA_RANK:], slots, True)
    write_kv_cache_reference(want, kv[:, :KV_LORA_RANK], kv[:, KV_LORA_RANK:], slots, True)
    assert torch.equal(cache, want)


def test_triton_kv_cache_empty_inputs():
    assert triton_kv_cache.quantize_kv_fp8(torch.empty(0, D_QK, dtype=torch.bfloat16, device=DEVICE)).shape == (0, FP8_BYTES)
    cache = make_cache(1, 64, True, False)
    before = cache.clone()
    empty = torch.empty(0, KV_LORA_RANK, dtype=torch.bfloat16, device=DEVICE)
    triton_kv_cache.write_kv_cache(cache, empty, empty[:, :64], torch.empty(0, dtype=torch.int32, device=DEVICE), True)
    assert torch.equal(cache, before)


@pytest.mark.parametrize("hardware", [True, False])
@pytest.mark.parametrize("is_fp8", [False, True])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_kv_cache_gpu_large_bit_exact_and_rerun(monkeypatch, hardware, is_fp8):
    """Many tokens, both e4m3 encoders (the hardware one is what sm_89+ runs), bit-identical reruns."""
    if hardware and not triton_kv_cache.hardware_e4m3_encode(torch.device(DEVICE)):
        pytest.skip("no hardware e4m3 conversion before sm_89")
    monkeypatch.setattr(triton_kv_cache, "hardware_e4m3_encode", lambda device: hardware)
    generator = torch.Generator().manual_seed(5)
    num_blocks, num_tokens = 600, 20000
    kv = hard_rows(num_tokens, generator).to(DEVICE)
    assert torch.equal(triton_kv_cache.quantize_kv_fp8(kv), reference.quantize_kv_fp8(kv))
    slots = torch.randperm(num_blocks * 64, generator=generator)[:num_tokens].to(DEVICE)
    slots[::7] = -1
    cache = make_cache(num_blocks, 64, is_fp8, padded=True)
    want, again = cache.clone(), cache.clone()
    triton_kv_cache.write_kv_cache(cache, kv[:, :KV_LORA_RANK], kv[:, KV_LORA_RANK:], slots, is_fp8)
    triton_kv_cache.write_kv_cache(again, kv[:, :KV_LORA_RANK], kv[:, KV_LORA_RANK:], slots, is_fp8)
    write_kv_cache_reference(want, kv[:, :KV_LORA_RANK], kv[:, KV_LORA_RANK:], slots, is_fp8)
    assert torch.equal(cache.view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(cache.view(torch.uint8), again.view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("is_fp8", [False, True])
def test_kv_cache_ops_use_triton_and_capture_in_cuda_graph(monkeypatch, reference_runs, is_fp8):
    """With FLASHMLA_BACKEND=triton the ops run these kernels, replay in a CUDA graph with new slots, bit-exact."""
    import flashmla_ops

    monkeypatch.setenv("FLASHMLA_BACKEND", "triton")
    assert flashmla_ops.backend("write_kv_cache", DEVICE) == "triton"
    assert flashmla_ops.backend("quantize_kv_fp8", DEVICE) == "triton"
    generator = torch.Generator().manual_seed(11 + is_fp8)
    num_blocks, num_tokens = 40, 300
    kv = hard_rows(num_tokens, generator).to(DEVICE)
    slots = torch.randperm(num_blocks * 64, generator=generator)[:num_tokens].to(DEVICE)
    slots[::5] = -1
    cache = make_cache(num_blocks, 64, is_fp8, padded=True)
    want = cache.clone()

    def call():
        torch.ops.flashmla.write_kv_cache(cache, kv[:, :KV_LORA_RANK], kv[:, KV_LORA_RANK:], slots, is_fp8)

    call()  # compile outside the capture
    assert reference_runs == []  # the Triton kernel wrote (the padded cache is 4-byte aligned)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    first_slots = slots.clone()
    slots.copy_(slots.flip(0))  # new slot values
    graph.replay()
    torch.cuda.synchronize()
    for written in (first_slots, slots):
        write_kv_cache_reference(want, kv[:, :KV_LORA_RANK], kv[:, KV_LORA_RANK:], written, is_fp8)
    assert torch.equal(cache.view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(torch.ops.flashmla.quantize_kv_fp8(kv), quantize_kv_fp8_reference(kv))


# ---------------------------------------------------------------- the indexer's key cache


def index_keys(num_tokens: int, d_i: int, generator: torch.Generator, dtype=torch.bfloat16) -> torch.Tensor:
    """(num_tokens, d_i) keys with hard_rows' cases (e4m3 halfway points times powers of two, amax / 448 a power of
    two, an all-zero key, subnormal results) in their first 128 columns."""
    rows = hard_rows(num_tokens, generator, dtype)[:, :KV_LORA_RANK].float()
    keys = torch.cat([rows, rows * 1e-3], dim=1)[:, :d_i]
    return keys.to(dtype)


def make_index_cache(num_blocks: int, d_i: int, is_fp8: bool, padded: bool, dtype=torch.bfloat16) -> torch.Tensor:
    """An index cache of random bytes (bf16 / float32 or FP8 rows of d_i + 4 bytes), a slice of a wider buffer when
    `padded` (block stride past 64 rows)."""
    row = d_i + 4 if is_fp8 else d_i
    pad = 16 if padded else 0
    if is_fp8:
        buffer = torch.randint(0, 255, (num_blocks, 64 * row + pad), dtype=torch.uint8, device=DEVICE)
    else:
        buffer = torch.randn(num_blocks, 64 * row + pad, device=DEVICE).to(dtype)
    return buffer[:, :64 * row].view(num_blocks, 64, row)


@pytest.mark.parametrize("is_fp8,dtype", [(False, torch.bfloat16), (False, torch.float32), (True, torch.bfloat16)])
@pytest.mark.parametrize("d_i", [128, 32, 100])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("padded", [False, True])
def test_triton_write_index_cache_matches_reference(is_fp8, dtype, d_i, slot_dtype, padded):
    """Bit for bit against `write_index_cache_reference`, every byte of the buffer (rows not written untouched): -1
    and slots past the cache skipped, the cache's last row written, d_i off a power of two, a padded block stride."""

    generator = torch.Generator().manual_seed(d_i + is_fp8 + 3 * padded)
    num_blocks, num_tokens = 3, 11
    keys = index_keys(num_tokens, d_i, generator, dtype).to(DEVICE)
    pool = make_index_cache(num_blocks + 1, d_i, is_fp8, padded, dtype)
    cache = pool[:num_blocks]  # the block after it is the next layer's: a slot past the cache must not reach it
    slots = torch.randperm(num_blocks * 64, generator=generator)[:num_tokens].to(DEVICE, slot_dtype)
    slots[[2, 5]] = -1
    slots[7] = num_blocks * 64  # past the cache (the op refuses it where it checks values)
    slots[0] = num_blocks * 64 - 1  # the very last row
    want = pool.clone()
    triton_kv_cache.write_index_cache(cache, keys, slots, is_fp8)
    write_index_cache_reference(want[:num_blocks], keys, slots.where(slots < num_blocks * 64, -1))
    assert torch.equal(pool.view(torch.uint8), want.view(torch.uint8))


def test_triton_write_index_cache_of_no_columns_writes_nothing():
    """d_i 0 (which the op's checks let through for a BF16 cache): nothing to write, no kernel (arange(0, 0) fails)."""
    cache = torch.zeros(1, 64, 0, dtype=torch.bfloat16, device=DEVICE)
    triton_kv_cache.write_index_cache(cache, torch.zeros(2, 0, dtype=torch.bfloat16, device=DEVICE),
                                      torch.arange(2, device=DEVICE), False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("is_fp8", [False, True])
def test_write_index_cache_op_uses_triton_and_captures_in_cuda_graph(reference_runs, is_fp8):
    """On a GPU the op runs the Triton kernel (it has no CUDA one), bit-exact with the reference over many tokens,
    and replays in a CUDA graph with new slots."""
    import flashmla_ops

    assert flashmla_ops.backend("write_index_cache", DEVICE) == "triton"
    generator = torch.Generator().manual_seed(17 + is_fp8)
    num_blocks, num_tokens, d_i = 300, 15000, 128
    keys = index_keys(num_tokens, d_i, generator).to(DEVICE)
    slots = torch.randperm(num_blocks * 64, generator=generator)[:num_tokens].to(DEVICE)
    slots[::9] = -1
    cache = make_index_cache(num_blocks, d_i, is_fp8, padded=True)
    want = cache.clone()

    def call():
        torch.ops.flashmla.write_index_cache(cache, keys, slots)

    call()  # compile outside the capture
    assert reference_runs == []
    write_index_cache_reference(want, keys, slots)
    assert torch.equal(cache.view(torch.uint8), want.view(torch.uint8))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    slots.copy_(torch.randperm(num_blocks * 64, generator=generator)[:num_tokens].to(DEVICE))
    graph.replay()
    write_index_cache_reference(want, keys, slots)
    assert torch.equal(cache.view(torch.uint8), want.view(torch.uint8))
