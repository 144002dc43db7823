"""FP8 cache layout (SPEC.md §3), quantize / dequantize, and the cache writes, against mla_oracle."""
import pytest
import torch

import mla_oracle as oracle

ops = torch.ops.flashmla


def kv_with_edge_tiles(*lead):
    """Random BF16 (..., 576) rows whose tiles span the scale rule's cases: tiny tiles (the 1e-4 floor), large
    ones, and tiles whose amax is exactly 448 * 2**k (ceil(log2) at a power of two)."""
    kv = oracle.bf16(*lead, oracle.D_QK, scale=3.0)
    rows = kv.view(-1, oracle.D_QK)
    rows[0::3, :128] *= 1e-4
    rows[1::3, 128:256] *= 300
    tile = rows[2::3, 256:384]
    peak = tile.float().abs().amax(-1, keepdim=True)
    rows[2::3, 256:384] = (tile.float() / peak * 448 * 2.0 ** torch.randint(-8, 4, peak.shape)).bfloat16()
    return kv


@pytest.mark.parametrize("lead", [(1,), (7,), (3, 5), (2, 64, 1), (0,)])
def test_quantize_byte_layout(device, lead):
    kv = kv_with_edge_tiles(*lead)
    packed = ops.quantize_kv_fp8(kv.to(device)).cpu()
    assert packed.dtype == torch.uint8 and packed.shape == (*lead, oracle.FP8_BYTES)
    expected = oracle.quantize_kv(kv)
    assert torch.equal(packed[..., 512:528], expected[..., 512:528]), "scales = 2**ceil(log2(max(amax/448, 1e-4)))"
    assert torch.equal(packed[..., 528:], kv[..., 512:].contiguous().view(torch.uint8)), "RoPE bytes bit-exact"
    assert torch.equal(packed[..., :512], expected[..., :512]), "latent = round-to-nearest-even e4m3(x / scale)"


def test_scale_rule_cases():
    """The scales themselves, on hand-picked tiles (amax exactly representable in bfloat16)."""
    cases = {448.0: 1.0, 450.0: 2.0, 446.0: 1.0, 0.875: 2.0 ** -9, 1e-3: 2.0 ** -13, -3584.0: 8.0}
    kv = oracle.bf16(len(cases), oracle.D_QK)
    for row, amax in enumerate(cases):
        kv[row, :128] = (torch.rand(128) * 0.9 * abs(amax)).bfloat16()
        kv[row, 17] = amax
    scales = ops.quantize_kv_fp8(kv)[:, 512:516].contiguous().view(torch.float32)[:, 0]
    assert scales.tolist() == list(cases.values())
    assert scales.tolist() == oracle.pow2_scale(kv[:, :128].double().abs().amax(-1)).tolist()


def test_quantize_nan_keeps_its_tiles_scale(device):
    """A NaN is stored as an e4m3 NaN and takes no part in its tile's amax: the tile's other values get the scale of
    their own amax (a tile of NaNs that of amax 0, 2**-13), in the latent cache and in the index cache."""
    kv = oracle.bf16(3, oracle.D_QK, scale=3.0)
    kv[0, 0], kv[0, 200], kv[1, 511], kv[2, 128:256] = (float("nan"),) * 4
    nan = kv.isnan()
    clean = kv.masked_fill(nan, 0)
    packed = ops.quantize_kv_fp8(kv.to(device)).cpu()
    want = oracle.quantize_kv(clean)
    assert torch.equal(oracle.e4m3_decode(packed[:, :512]).isnan(), nan[:, :512])
    assert torch.equal(packed[:, :512][~nan[:, :512]], want[:, :512][~nan[:, :512]])
    assert torch.equal(packed[:, 512:], want[:, 512:]), "scales of the tiles' other values, RoPE bytes as they are"
    index_cache = torch.zeros(1, oracle.PAGE_BLOCK_SIZE, 36, dtype=torch.uint8, device=device)
    ops.write_index_cache(index_cache, kv[:, 120:152].to(device), torch.arange(3, dtype=torch.int32, device=device))
    written, want = index_cache[0, :3].cpu(), oracle.quantize_index(clean[:, 120:152])
    keys_nan = nan[:, 120:152]
    assert torch.equal(oracle.e4m3_decode(written[:, :32]).isnan(), keys_nan)
    assert torch.equal(written[:, :32][~keys_nan], want[:, :32][~keys_nan])
    assert torch.equal(written[:, 32:], want[:, 32:]), "the scale of each key's other values"


def test_write_kv_cache_fp8_from_float32(device):
    """float32 rows into the FP8 cache: scales and e4m3 codes from the float32 values themselves (one rounding, not
    through bfloat16 first), RoPE values rounded to nearest-even bfloat16; slots -1 skipped."""
    num_tokens = 9
    kv = torch.randn(num_tokens, oracle.D_QK) * 3
    kv[0::3, :128] *= 1e-4
    kv[1::3, 128:256] *= 300
    buffer, cache = poisoned_cache(2, oracle.PAGE_BLOCK_SIZE, oracle.FP8_BYTES, True, 0, device)
    expected = buffer.cpu().clone().view(2, oracle.PAGE_BLOCK_SIZE, oracle.FP8_BYTES)
    slots = torch.tensor([0, 17, -1, 70, 5, 127, -1, 64, 1], dtype=torch.int32)
    ops.write_kv_cache(cache, kv[:, :512].to(device), kv[:, 512:].to(device), slots.to(device), True)
    rows = oracle.quantize_kv(kv)
    for token, slot in enumerate(slots.tolist()):
        if slot != -1:
            expected[slot // oracle.PAGE_BLOCK_SIZE, slot % oracle.PAGE_BLOCK_SIZE] = rows[token]
    assert torch.equal(buffer.cpu().view(expected.shape), expected)


@pytest.mark.parametrize("as_fp8_dtype", [False, True])
def test_dequantize_and_round_trip(device, as_fp8_dtype):
    kv = kv_with_edge_tiles(6, 3)
    packed = oracle.quantize_kv(kv)
    arg = packed.view(torch.float8_e4m3fn) if as_fp8_dtype else packed
    restored = ops.dequantize_kv_fp8(arg.to(device)).cpu()
    assert restored.dtype == torch.bfloat16 and restored.shape == kv.shape
    assert torch.equal(restored.double(), oracle.dequantize_kv(packed)), "e4m3 * pow2 scale is exact in bfloat16"
    assert torch.equal(restored[..., 512:], kv[..., 512:]), "RoPE values round-trip bit-exact"
    # e4m3 rounding: half an ulp is 2**-4 relative for normals, 2**-10 * scale in the subnormal range.
    x = kv[..., :512].double().reshape(6, 3, 4, 128)
    scale = oracle.pow2_scale(x.abs().amax(-1))[..., None]
    bound = torch.maximum(x.abs() * 2.0 ** -4, scale * 2.0 ** -10)
    error = (restored[..., :512].double().reshape(x.shape) - x).abs()
    assert (error <= bound).all(), float((error / bound).max())


def test_quantize_then_dequantize_ops_agree_with_each_other():
    kv = oracle.bf16(9, oracle.D_QK, scale=5.0)
    assert torch.equal(ops.dequantize_kv_fp8(ops.quantize_kv_fp8(kv)).double(), oracle.dequantize_kv(oracle.quantize_kv(kv)))


def poisoned_cache(num_blocks, block_size, row, fp8, pad, device):
    """A random cache that is a slice of a wider random buffer (block stride padded by `pad` elements)."""
    if fp8:
        buffer = torch.randint(0, 256, (num_blocks, block_size * row + pad), dtype=torch.uint8)
    else:
        buffer = oracle.bf16(num_blocks, block_size * row + pad)
    buffer = buffer.to(device)
    return buffer, buffer[:, :block_size * row].view(num_blocks, block_size, 1, row)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("pad,num_tokens,slot_dtype,fp8_view", [
    (0, 1, torch.int32, False), (0, 37, torch.int64, False), (48, 70, torch.int32, False), (656, 130, torch.int32, True),
    (0, 0, torch.int32, False)])
def test_write_kv_cache(device, fp8, pad, num_tokens, slot_dtype, fp8_view):
    num_blocks = 5
    row = oracle.FP8_BYTES if fp8 else oracle.D_QK
    buffer, cache = poisoned_cache(num_blocks, oracle.PAGE_BLOCK_SIZE, row, fp8, pad, device)
    before = buffer.clone()
    latent, rope = oracle.bf16(num_tokens, 512), oracle.bf16(num_tokens, 64)
    slots = torch.randperm(num_blocks * oracle.PAGE_BLOCK_SIZE)[:num_tokens]
    slots[torch.rand(num_tokens) < 0.3] = -1
    target = cache.view(torch.float8_e4m3fn) if (fp8 and fp8_view) else cache
    ops.write_kv_cache(target, latent.to(device), rope.to(device), slots.to(slot_dtype).to(device), fp8)

    rows = torch.cat([latent, rope], -1)
    expected_rows = oracle.quantize_kv(rows) if fp8 else rows
    expected = before.cpu().clone()
    expected_cache = expected[:, :oracle.PAGE_BLOCK_SIZE * row].view(num_blocks, oracle.PAGE_BLOCK_SIZE, 1, row)
    for token, slot in enumerate(slots.tolist()):
        if slot != -1:
            expected_cache[slot // oracle.PAGE_BLOCK_SIZE, slot % oracle.PAGE_BLOCK_SIZE, 0] = expected_rows[token]
    # Compares bytes of the whole buffer: written rows exact, every other slot and the padding untouched.
    assert torch.equal(buffer.cpu().view(torch.uint8), expected.view(torch.uint8))
    if (slots >= 0).any():
        assert not torch.equal(buffer.cpu().view(torch.uint8), before.cpu().view(torch.uint8))


@pytest.mark.parametrize("fp8,d_i", [(False, 128), (True, 128), (False, 64), (True, 32)])
def test_write_index_cache(device, fp8, d_i):
    num_blocks, num_tokens = 3, 100
    row = d_i + 4 if fp8 else d_i
    if fp8:
        index_cache = torch.randint(0, 256, (num_blocks, oracle.PAGE_BLOCK_SIZE, row), dtype=torch.uint8)
    else:
        index_cache = oracle.bf16(num_blocks, oracle.PAGE_BLOCK_SIZE, row)
    expected = index_cache.clone()
    index_cache = index_cache.to(device)
    k = oracle.bf16(num_tokens, d_i, scale=4.0)
    k[::5] *= 1e-5
    slots = torch.randperm(num_blocks * oracle.PAGE_BLOCK_SIZE)[:num_tokens].int()
    slots[::7] = -1
    ops.write_index_cache(index_cache, k.to(device), slots.to(device))
    rows = oracle.quantize_index(k) if fp8 else k
    for token, slot in enumerate(slots.tolist()):
        if slot != -1:
            expected[slot // oracle.PAGE_BLOCK_SIZE, slot % oracle.PAGE_BLOCK_SIZE] = rows[token]
    assert torch.equal(index_cache.cpu().view(torch.uint8), expected.view(torch.uint8))
    if fp8:
        written = index_cache.cpu()[slots[slots >= 0] // 64, slots[slots >= 0] % 64]
        error = (oracle.dequantize_index(written) - k[slots >= 0].double()).abs()
        scale = written[:, -4:].contiguous().view(torch.float32).double()
        assert (error <= torch.maximum(k[slots >= 0].double().abs() * 2.0 ** -4, scale * 2.0 ** -10)).all()


@pytest.mark.parametrize("fp8", [False, True])
def test_cache_writes_into_a_cache_without_blocks(device, fp8):
    """Every token skipped (-1) into a cache of no blocks (a pool not allocated yet): nothing to do, no error."""
    kv_cache = torch.zeros(0, 64, 1, 656, dtype=torch.uint8) if fp8 else oracle.bf16(0, 64, 1, oracle.D_QK)
    skip = torch.full((3,), -1, dtype=torch.int32, device=device)
    ops.write_kv_cache(kv_cache.to(device), oracle.bf16(3, 512, device=device), oracle.bf16(3, 64, device=device),
                       skip, fp8)
    index_cache = torch.zeros(0, 64, 36, dtype=torch.uint8) if fp8 else oracle.bf16(0, 64, 32)
    ops.write_index_cache(index_cache.to(device), oracle.bf16(3, 32, device=device), skip)


def test_dequantize_padded_cache_slice(device):
    """A cache that is a slice of a wider buffer (padded block stride) dequantizes by its strides."""
    cache, flat_keys = oracle.paged_cache(3, fp8=True, pad=656 * 2 + 16, device=device)
    assert not cache.is_contiguous()
    restored = ops.dequantize_kv_fp8(cache).cpu()
    assert restored.shape == (3, 64, 1, oracle.D_QK)
    assert torch.equal(restored.reshape(-1, oracle.D_QK).double(), flat_keys)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("checked", [False, True])
def test_cache_writes_never_write_past_the_cache(device, monkeypatch, fp8, checked):
    """Slots past the cache (a cache that is the first two blocks of a pool, as layers' caches may be): refused where
    values are checked (CPU tensors, FLASHMLA_CHECK=1); on a GPU without the check skipped like -1, whichever path
    runs, so nothing lands in the pool's third block. The latent cache and the indexer key cache alike."""
    if checked:
        monkeypatch.setenv("FLASHMLA_CHECK", "1")
    else:
        monkeypatch.delenv("FLASHMLA_CHECK", raising=False)
    slots = torch.tensor([128, 5, 2 * 128 + 3, -1, 127], dtype=torch.int32)
    kv = oracle.bf16(5, oracle.D_QK)
    kv_pool = torch.zeros(3, 64, 1, 656, dtype=torch.uint8) if fp8 else oracle.bf16(3, 64, 1, oracle.D_QK)
    k = oracle.bf16(5, 32)
    index_pool = torch.zeros(3, 64, 36, dtype=torch.uint8) if fp8 else oracle.bf16(3, 64, 32)
    kv_want, index_want = kv_pool.clone(), index_pool.clone()
    kv_pool, index_pool = kv_pool.to(device), index_pool.to(device)
    calls = [lambda: ops.write_kv_cache(kv_pool[:2], kv[:, :512].to(device), kv[:, 512:].to(device), slots.to(device),
                                        fp8),
             lambda: ops.write_index_cache(index_pool[:2], k.to(device), slots.to(device))]
    if device.type == "cpu" or checked:
        for call in calls:
            with pytest.raises(ValueError, match="slot_mapping entries must be -1"):
                call()
    else:
        for call in calls:
            call()
        kept = slots.where(slots < 128, -1)
        ops.write_kv_cache(kv_want[:2], kv[:, :512], kv[:, 512:], kept, fp8)
        ops.write_index_cache(index_want[:2], k, kept)
    assert torch.equal(kv_pool.cpu().view(torch.uint8), kv_want.view(torch.uint8))
    assert torch.equal(index_pool.cpu().view(torch.uint8), index_want.view(torch.uint8))


def test_scatter_rows_skips_slots_outside_the_cache():
    """The device-agnostic scatter behind the reference writes and `write_index_cache` on a GPU: a slot past the
    cache is skipped like -1 (the scatter would fail on a device-side assert), also when it comes first (the
    stand-in slot of skipped rows) or no row is kept."""
    from flashmla_ops.kv_cache import _scatter_rows

    pool = torch.zeros(3, 64, 8)
    _scatter_rows(pool[:2], torch.ones(4, 8), torch.tensor([200, 5, 128, -1]))
    expected = torch.zeros(3, 64, 8)
    expected[0, 5] = 1
    assert torch.equal(pool, expected)
    _scatter_rows(pool[:2], torch.full((2, 8), 2.0), torch.tensor([300, 128]))
    assert torch.equal(pool, expected)
