"""CUDA kernels of the KV-cache ops against the reference: bit-exact, poisoned outputs, odd sizes, CUDA graphs."""
import pytest
import torch
from decode_inputs import HOPPER

import flashmla_ops
from flashmla_ops import reference
from flashmla_ops.kv_cache import D_QK, FP8_BYTES, KV_LORA_RANK, PAGE_BLOCK_SIZE

pytestmark = [pytest.mark.gpu, HOPPER]
DEVICE = "cuda"
POISON = 0xA5


@pytest.fixture(autouse=True)
def _no_reference_runs(reference_runs):
    """No op here falls back to its reference (the writes' expected values come from that very function)."""
    yield
    assert reference_runs == []


def random_kv(num_tokens: int, generator: torch.Generator) -> torch.Tensor:
    # Magnitudes spread over many binades so every scale exponent and subnormal FP8 values occur.
    magnitude = torch.exp2(torch.randint(-12, 10, (num_tokens, 1), generator=generator, device=DEVICE).float())
    values = torch.randn(num_tokens, D_QK, generator=generator, device=DEVICE) * magnitude
    return values.to(torch.bfloat16)


@pytest.mark.parametrize("op", ["quantize_kv_fp8", "dequantize_kv_fp8", "write_kv_cache"])
def test_cuda_backend_is_built(op):
    assert flashmla_ops.backend(op, DEVICE) == "cuda"


@pytest.mark.parametrize("num_tokens", [0, 1, 7, 64, 1000, 4099])
def test_quantize_matches_reference_bit_exactly(num_tokens):
    generator = torch.Generator(DEVICE).manual_seed(num_tokens)
    kv = random_kv(num_tokens, generator)
    got = torch.ops.flashmla.quantize_kv_fp8(kv)
    want = reference.quantize_kv_fp8(kv)
    assert got.shape == (num_tokens, FP8_BYTES) and got.dtype == torch.uint8
    assert torch.equal(got, want)


@pytest.mark.parametrize("shape", [(0,), (3,), (5, 64), (2, 33, 1)])
def test_dequantize_matches_reference_bit_exactly(shape):
    generator = torch.Generator(DEVICE).manual_seed(sum(shape) + 1)
    kv = random_kv(int(torch.tensor(shape).prod()), generator).reshape(*shape, D_QK)
    packed = reference.quantize_kv_fp8(kv)
    got = torch.ops.flashmla.dequantize_kv_fp8(packed)
    assert got.shape == kv.shape and got.dtype == torch.bfloat16
    assert torch.equal(got.view(torch.int16), reference.dequantize_kv_fp8(packed).view(torch.int16))
    assert torch.equal(got[..., KV_LORA_RANK:], kv[..., KV_LORA_RANK:])  # RoPE is stored exactly


@pytest.mark.parametrize("is_fp8", [False, True])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("num_tokens", [1, 63, 300])
@pytest.mark.parametrize("padded_blocks", [False, True])
def test_write_kv_cache_matches_reference(is_fp8, slot_dtype, num_tokens, padded_blocks):
    generator = torch.Generator(DEVICE).manual_seed(num_tokens * 7 + is_fp8)
    num_blocks = 9
    row = FP8_BYTES if is_fp8 else D_QK
    dtype = torch.uint8 if is_fp8 else torch.bfloat16
    # A padded buffer: the cache is a slice whose block stride exceeds page_block_size * row.
    pad = 16 if padded_blocks else 0
    buffer = torch.empty(num_blocks, PAGE_BLOCK_SIZE * row + pad, dtype=dtype, device=DEVICE)
    buffer.view(torch.uint8).fill_(POISON)
    cache = buffer[:, :PAGE_BLOCK_SIZE * row].view(num_blocks, PAGE_BLOCK_SIZE, 1, row)
    expected = cache.clone()
    kv = random_kv(num_tokens, generator)
    slots = torch.randperm(num_blocks * PAGE_BLOCK_SIZE, generator=generator, device=DEVICE)[:num_tokens]
    slots[::5] = -1  # padding tokens are skipped
    slots = slots.to(slot_dtype)
    latent, rope = kv[:, :KV_LORA_RANK], kv[:, KV_LORA_RANK:]
    torch.ops.flashmla.write_kv_cache(cache, latent, rope, slots, is_fp8)
    reference.write_kv_cache(expected, latent, rope, slots, is_fp8)
    assert torch.equal(cache.view(torch.uint8), expected.view(torch.uint8))
    assert torch.all(buffer.view(torch.uint8)[:, PAGE_BLOCK_SIZE * row * cache.element_size():] == POISON)


@pytest.mark.parametrize("is_fp8", [False, True])
def test_write_kv_cache_skips_slots_past_the_cache(monkeypatch, is_fp8):
    """Without FLASHMLA_CHECK the op does not read slot values on the GPU (no host sync): the kernel skips a slot past
    the cache like -1, so it cannot write into the memory after it (here the next layer's cache of one pool)."""
    monkeypatch.delenv("FLASHMLA_CHECK", raising=False)
    generator = torch.Generator(DEVICE).manual_seed(17 + is_fp8)
    row = FP8_BYTES if is_fp8 else D_QK
    dtype = torch.uint8 if is_fp8 else torch.bfloat16
    pool = torch.full((3, PAGE_BLOCK_SIZE, 1, row * dtype.itemsize), POISON, dtype=torch.uint8, device=DEVICE)
    pool = pool.view(dtype)
    cache = pool[:2]
    kv = random_kv(5, generator)
    slots = torch.tensor([128, 5, 2 * 128 + 3, -1, 127], dtype=torch.int32, device=DEVICE)
    expected = pool.clone()
    torch.ops.flashmla.write_kv_cache(cache, kv[:, :KV_LORA_RANK], kv[:, KV_LORA_RANK:], slots, is_fp8)
    reference.write_kv_cache(expected[:2], kv[:, :KV_LORA_RANK], kv[:, KV_LORA_RANK:], slots.where(slots < 128, -1),
                             is_fp8)
    torch.cuda.synchronize()
    assert torch.equal(pool.view(torch.uint8), expected.view(torch.uint8))


def test_non_finite_values_are_quantized_as_the_reference_does():
    """A NaN is stored as an e4m3 NaN and its tile keeps the scale of its other values; an infinity takes scale 1 and
    saturates to +-448 (the reference's frexp, the kernel's frexpf). The kernel's clamp had turned a NaN into -448
    times the scale, a silent finite value (stop 62; the Triton kernel likewise, tests/ops/test_triton_kv_cache.py)."""
    generator = torch.Generator(DEVICE).manual_seed(62)
    kv = random_kv(5, generator)
    kv[0, 0], kv[0, 200], kv[1, 511], kv[2, 128:256] = float("nan"), float("nan"), float("nan"), float("nan")
    kv[3, 3], kv[4, 300], kv[4, 0] = float("inf"), float("-inf"), float("inf")
    got = torch.ops.flashmla.quantize_kv_fp8(kv)
    want = reference.quantize_kv_fp8(kv)
    values, want_values = (t[:, :KV_LORA_RANK].view(torch.float8_e4m3fn).float() for t in (got, want))
    assert torch.equal(values.isnan(), kv[:, :KV_LORA_RANK].isnan())
    # NaN bytes may differ in their sign bit (the reference's cast and the conversion instruction): compare the rest
    finite = ~want_values.isnan()
    assert torch.equal(values[finite], want_values[finite])
    assert torch.equal(got[:, KV_LORA_RANK:], want[:, KV_LORA_RANK:])


def test_write_kv_cache_in_cuda_graph():
    generator = torch.Generator(DEVICE).manual_seed(3)
    cache = torch.zeros(4, PAGE_BLOCK_SIZE, 1, FP8_BYTES, dtype=torch.uint8, device=DEVICE)
    kv = random_kv(16, generator)
    slots = torch.arange(16, device=DEVICE, dtype=torch.int32) * 3
    latent, rope = kv[:, :KV_LORA_RANK].clone(), kv[:, KV_LORA_RANK:].clone()
    torch.ops.flashmla.write_kv_cache(cache, latent, rope, slots, True)  # warm-up outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.flashmla.write_kv_cache(cache, latent, rope, slots, True)
    fresh = random_kv(16, generator)
    latent.copy_(fresh[:, :KV_LORA_RANK])
    rope.copy_(fresh[:, KV_LORA_RANK:])
    graph.replay()
    torch.cuda.synchronize()
    expected = torch.zeros_like(cache)
    reference.write_kv_cache(expected, fresh[:, :KV_LORA_RANK], fresh[:, KV_LORA_RANK:], slots, True)
    assert torch.equal(cache, expected)


def test_quantize_under_compile():
    kv = random_kv(130, torch.Generator(DEVICE).manual_seed(5))
    compiled = torch.compile(lambda x: torch.ops.flashmla.dequantize_kv_fp8(torch.ops.flashmla.quantize_kv_fp8(x)),
                             fullgraph=True)
    assert torch.equal(compiled(kv), reference.dequantize_kv_fp8(reference.quantize_kv_fp8(kv)))


def test_misaligned_rows_are_copied_for_the_kernels():
    """Contiguous rows viewed from a flat buffer 4 elements (8 bytes) in: the kernels' 16-byte loads would fault on
    them, so the ops hand the kernels aligned copies (quantize, dequantize, and write's latent and rope)."""
    generator = torch.Generator(DEVICE).manual_seed(3)
    kv = random_kv(5, generator)
    flat = torch.empty(4 + kv.numel(), dtype=torch.bfloat16, device=DEVICE)
    flat[4:] = kv.reshape(-1)
    misaligned = flat[4:].view(5, D_QK)
    assert misaligned.is_contiguous() and misaligned.data_ptr() % 16 == 8
    packed = torch.ops.flashmla.quantize_kv_fp8(misaligned)
    assert torch.equal(packed, reference.quantize_kv_fp8(kv))
    flat_bytes = torch.empty(8 + packed.numel(), dtype=torch.uint8, device=DEVICE)
    flat_bytes[8:] = packed.reshape(-1)
    assert torch.equal(torch.ops.flashmla.dequantize_kv_fp8(flat_bytes[8:].view(5, FP8_BYTES)),
                       reference.dequantize_kv_fp8(packed))
    latent, rope = misaligned[:, :KV_LORA_RANK], flat[4:4 + 5 * 64].view(5, 64)
    slots = torch.tensor([0, 70, -1, 3, 127], dtype=torch.int32, device=DEVICE)
    for is_fp8 in (False, True):
        shape = (2, PAGE_BLOCK_SIZE, 1, FP8_BYTES if is_fp8 else D_QK)
        got = torch.zeros(shape, dtype=torch.uint8 if is_fp8 else torch.bfloat16, device=DEVICE)
        want = got.clone()
        torch.ops.flashmla.write_kv_cache(got, latent, rope, slots, is_fp8)
        reference.write_kv_cache(want, latent.contiguous(), rope.contiguous(), slots, is_fp8)
        assert torch.equal(got, want)
