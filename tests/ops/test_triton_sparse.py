"""The Triton sparse decode and sparse prefill kernels against the reference: on the GPU, and on the CPU under
Triton's interpreter.

Inputs are fresh random data with -1 indices, duplicate indices, an all -1 query, topk_length shorter than topk and
(prefill) indices >= s_kv; outputs are poisoned before each run; LSE, max_logits and the indexer LSE are compared too.
"""
import dataclasses

import pytest
import torch
from decode_inputs import (DEVICE, LSE_TOLERANCE, SCALE, assert_close,  # noqa: F401
                           packed_prefill_inputs, paged_cache, poisoned, random_indices, spaced,
                           varied_scale_cache)
from triton_recording import RecordingKernel

from flashmla_ops import reference
from flashmla_ops.kv_cache import D_QK, KV_LORA_RANK, PAGE_BLOCK_SIZE

triton_sparse = pytest.importorskip("flashmla_ops.triton.sparse", exc_type=ImportError)


# (batch, s_q, h_q, topk, extra_topk, with_topk_length (and extra_topk_length with an extra cache)): the CPU
# interpreter gets small shapes (the first two are split over several programs + the combine: few queries against the
# interpreter's 4 stand-in SMs).
DECODE_CASES = [
    (1, 1, 16, 200, 0, False),
    (1, 1, 32, 150, 100, True),
    (1, 2, 128, 70, 30, True),
    (2, 2, 64, 130, 0, True),
    (2, 2, 16, 100, 0, True),
    (3, 1, 5, 64, 0, False),
    (2, 1, 16, 90, 70, False),  # an extra cache read to its full width (no extra_topk_length)
    (1, 21, 4, 70, 0, True),  # a prompt continued through the decode path (models.generation.prefill)
]
GPU_DECODE_CASES = [
    (batch, s_q, h_q, topk, extra_topk, with_topk_length)
    for h_q in (16, 64, 128)
    for s_q in (1, 2)
    for batch, topk, extra_topk, with_topk_length in ((2, 64, 0, False), (3, 1000, 0, True), (16, 2048, 0, False),
                                                      (1, 2048, 0, True), (4, 384, 100, True),
                                                      (4, 384, 100, False))
] + [(1, 37, 16, 300, 0, True), (2, 64, 128, 2048, 0, False)]  # prompts continued through the decode path
# (seq_lens, h_q, topk, indexer_topk, with_topk_length, with_sink): varlen-packed prefill batches.
PREFILL_CASES = [
    ([9, 3], 16, 100, 0, True, True),
    ([6], 64, 64, 40, False, False),
    ([2, 3], 128, 80, 100, True, False),
    ([4], 7, 30, 16, False, True),
]
GPU_PREFILL_CASES = [
    ([700, 300, 24], 16, 2048, 0, False, False),
    ([500, 77], 64, 1000, 512, True, True),
    ([256, 256], 128, 2048, 2048, False, False),
    ([129, 60], 128, 64, 30, True, True),
    ([1000], 64, 2000, 0, True, False),
]


def run_decode(batch, s_q, h_q, topk, extra_topk, with_topk_length, is_fp8, sink=False, varied_scales=False,
               config=None):
    generator = torch.Generator(DEVICE).manual_seed(batch * 7919 + s_q * 131 + h_q * 17 + topk + extra_topk + is_fp8)
    num_blocks = max(2, batch * topk // PAGE_BLOCK_SIZE)
    if varied_scales:
        assert is_fp8
        cache = varied_scale_cache(num_blocks, generator)
    else:
        cache = paged_cache(num_blocks, is_fp8, generator, pad=32)
    q = torch.randn(batch, s_q, h_q, D_QK, generator=generator, device=DEVICE).to(torch.bfloat16)
    indices = random_indices((batch, s_q, topk), num_blocks * PAGE_BLOCK_SIZE, generator)
    topk_length = None
    if with_topk_length:  # shorter than topk, one sequence with none, one with all
        topk_length = torch.randint(0, topk + 1, (batch,), generator=generator, device=DEVICE, dtype=torch.int32)
        topk_length[-1] = topk // 2 + 1
        if batch > 1:
            topk_length[0] = 0
    extra = (None, None, None)
    if extra_topk:
        extra_cache = paged_cache(2, is_fp8, generator, pad=0)
        extra_indices = random_indices((batch, s_q, extra_topk), 2 * PAGE_BLOCK_SIZE, generator, 0.1)
        extra_topk_length = (torch.full((batch,), extra_topk - 3, dtype=torch.int32, device=DEVICE)
                             if with_topk_length else None)
        extra = (extra_cache, extra_indices, extra_topk_length)
    attn_sink = torch.randn(h_q, generator=generator, device=DEVICE) if sink else None
    args = (q, cache, indices, topk_length, *extra, KV_LORA_RANK, SCALE, is_fp8, attn_sink)
    # only a config given goes in: test_triton_fitting.py gives its configs through a partial of sparse_decode
    out, lse = poisoned(triton_sparse.sparse_decode, *args, **({"config": config} if config is not None else {}))
    want_out, want_lse = reference.sparse_decode(*args)
    assert_close(out, lse, want_out, want_lse)
    if not extra_topk:  # the all -1 query
        assert torch.all(out[0, 0] == 0) and torch.all(torch.isposinf(lse[0, :, 0]))
    return (out, lse), args


def prefill_and_compare(*args, config=None):
    """The sparse prefill kernel on sparse_prefill's arguments (outputs poisoned first; with `config`, its tiles)
    against the reference: out and LSE, max_logits and the indexer LSE (infinities and their signs exactly)."""
    got = poisoned(triton_sparse.sparse_prefill, *args, **({"config": config} if config is not None else {}))
    want = reference.sparse_prefill(*args)
    assert_close(got[0], got[2], want[0], want[2])
    for name, value, want_value in (("max_logits", got[1], want[1]), ("lse_indexer", got[3], want[3])):
        assert value.shape == want_value.shape, name
        assert torch.equal(torch.isinf(value), torch.isinf(want_value)) and not torch.isnan(value).any(), name
        assert torch.equal(value > 0, want_value > 0), name  # the signs of the infinities
        finite = torch.isfinite(want_value)
        assert torch.allclose(value[finite], want_value[finite], atol=LSE_TOLERANCE, rtol=0), name
    return got


def run_prefill(seq_lens, h_q, topk, indexer_topk, with_topk_length, with_sink, config=None):
    generator = torch.Generator(DEVICE).manual_seed(sum(seq_lens) * 31 + h_q * 7 + topk + indexer_topk)
    q, kv, indices, topk_length = packed_prefill_inputs(seq_lens, h_q, topk, with_topk_length, generator)
    attn_sink = torch.randn(h_q, generator=generator, device=DEVICE) if with_sink else None
    args = (q, kv, indices, 0.05, KV_LORA_RANK, attn_sink, topk_length, indexer_topk)
    return prefill_and_compare(*args, config=config), args


@pytest.mark.parametrize("batch,s_q,h_q,topk,extra_topk,with_topk_length", DECODE_CASES)
@pytest.mark.parametrize("is_fp8", [False, True])
def test_triton_sparse_decode_matches_reference(batch, s_q, h_q, topk, extra_topk, with_topk_length, is_fp8):
    run_decode(batch, s_q, h_q, topk, extra_topk, with_topk_length, is_fp8, sink=extra_topk > 0)


def test_triton_sparse_decode_fp8_scales_that_differ_by_tile_and_token():
    """A kernel that scaled a value by another tile's or another row's scale would be off by 2x or more here."""
    run_decode(2, 2, 16, 130, 0, False, True, varied_scales=True)


@pytest.mark.parametrize("batch,s_q,h_q,topk,extra_topk,with_topk_length,varied_scales",
                         [(1, 1, 32, 150, 100, True, False), (2, 2, 64, 130, 0, True, False),
                          (2, 1, 16, 130, 0, False, True)])
def test_triton_sparse_decode_fp8_integer_decoding_matches_reference(monkeypatch, batch, s_q, h_q, topk, extra_topk,
                                                                     with_topk_length, varied_scales):
    """Before sm_89 and on AMD GPUs (common.hardware_fp8: FP8_INTEGER) the FP8 keys, of both caches, are decoded by
    integer ops (common.load_kv_tile), which neither the interpreter (it emulates the conversion) nor Hopper runs
    otherwise; with scales that differ by tile and token too."""
    from flashmla_ops.triton.common import FP8_INTEGER

    monkeypatch.setattr(triton_sparse, "hardware_fp8", lambda device: FP8_INTEGER)
    run_decode(batch, s_q, h_q, topk, extra_topk, with_topk_length, True, sink=extra_topk > 0,
               varied_scales=varied_scales)


@pytest.mark.parametrize("exponent", [40, -40])
def test_triton_sparse_decode_split_partials_hold_outputs_past_f16(monkeypatch, exponent):
    """Split partials in f16 rows times a power of two each (decode.Partials, the threshold lowered to 2 splits):
    latents scaled by 2**40 or 2**-40 (outputs past f16's 65504 or below its 2**-24; queries scaled inversely, so the
    logits are unchanged), one query split several ways: each output row within the BF16 band of its own norm."""
    from flashmla_ops.triton import decode as triton_decode

    monkeypatch.setattr(triton_decode, "HALF_PARTIALS_FROM_SPLITS", 2)
    recording = RecordingKernel(triton_sparse._sparse_decode_split_kernel)
    monkeypatch.setattr(triton_sparse, "_sparse_decode_split_kernel", recording)
    generator = torch.Generator(DEVICE).manual_seed(50 + exponent)
    cache = paged_cache(8, False, generator, pad=0)
    latent = cache.float()
    latent[..., :KV_LORA_RANK] *= 2.0 ** exponent
    q = torch.randn(1, 2, 16, D_QK, generator=generator, device=DEVICE)
    q[..., :KV_LORA_RANK] *= 2.0 ** -exponent
    args = (q.bfloat16(), latent.bfloat16(), random_indices((1, 2, 400), 8 * PAGE_BLOCK_SIZE, generator), None, None,
            None, None, KV_LORA_RANK, SCALE, False)
    multiprocessors, _ = triton_sparse.device_limits(torch.device(DEVICE))
    assert triton_sparse.num_splits_for(2, triton_sparse.triton.cdiv(400, 64), multiprocessors) > 1
    out, lse = triton_sparse.sparse_decode(*args)
    assert recording.options and all(options["HALF_PARTIALS"] for options in recording.options)
    want_out, want_lse = reference.sparse_decode(*args)
    assert_close(out, lse, want_out, want_lse)  # each row that sees a key within the band of its own norm


def lookahead_config(h_q, block_n=32, num_stages=3):
    """The default tiles with each tile's indices read one step early (TileConfig.lookahead)."""
    return dataclasses.replace(triton_sparse.tile_configs(h_q)[0], block_n=block_n, num_stages=num_stages,
                               lookahead=True)


@pytest.mark.parametrize("batch,s_q,h_q,topk,extra_topk,with_topk_length", DECODE_CASES)
@pytest.mark.parametrize("is_fp8", [False, True])
@pytest.mark.parametrize("block_n", [32, 64])
def test_triton_sparse_decode_lookahead_matches_reference(batch, s_q, h_q, topk, extra_topk, with_topk_length,
                                                          is_fp8, block_n):
    """Each step must gather its own tile's keys with its own mask, the split's first tile included."""
    # (BF16 at 64 x 64 tiles takes two stages: three need 288 KiB of shared memory on the GPU)
    run_decode(batch, s_q, h_q, topk, extra_topk, with_topk_length, is_fp8, sink=extra_topk > 0,
               config=lookahead_config(h_q, block_n, 2 if block_n == 64 and not is_fp8 else 3))


def apart_config(h_q, is_fp8=False, num_warps=None):
    """The tiles the op takes on Hopper, with the logits masked behind a branch (TileConfig.apart_logits); 64-head
    tiles at `num_warps` if given."""
    config = dataclasses.replace(triton_sparse.tile_configs(h_q, fp8_decode=is_fp8, apart=True)[0], apart_logits=True)
    if num_warps is not None and config.block_h == 64:
        config = dataclasses.replace(config, num_warps=num_warps)
    return config


# warps of the 64-head tiles: on a GPU also 16 (the interpreter runs a program as one)
APART_WARPS = [8, 16] if DEVICE == "cuda" else [8]


@pytest.mark.parametrize("batch,s_q,h_q,topk,extra_topk,with_topk_length", DECODE_CASES[1:4])
@pytest.mark.parametrize("is_fp8", [False, True])
@pytest.mark.parametrize("num_warps", APART_WARPS)
def test_triton_sparse_decode_apart_logits_match_reference(batch, s_q, h_q, topk, extra_topk, with_topk_length,
                                                           is_fp8, num_warps):
    """The logits masked behind a branch on the loop's own condition (common.mask_logits_apart), each product scaled
    before the sum: missing keys and keys past topk_length in partial tiles, in the main and the extra cache, with
    splits and the lookahead (the FP8 default's)."""
    run_decode(batch, s_q, h_q, topk, extra_topk, with_topk_length, is_fp8, sink=extra_topk > 0,
               config=apart_config(h_q, is_fp8, num_warps))


@pytest.mark.parametrize("seq_lens,h_q,topk,indexer_topk,with_topk_length,with_sink", PREFILL_CASES[:3])
@pytest.mark.parametrize("num_warps", APART_WARPS)
def test_triton_sparse_prefill_apart_logits_match_reference(seq_lens, h_q, topk, indexer_topk, with_topk_length,
                                                            with_sink, num_warps):
    run_prefill(seq_lens, h_q, topk, indexer_topk, with_topk_length, with_sink,
                config=apart_config(h_q, num_warps=num_warps))


# The tiles the op takes on Hopper (apart_config) at 32 keys a step, three and four stages deep (so that on a GPU one
# or two steps' gathers are in flight: stop 57; the interpreter has no stages), with the indices a step early
DEEP_STEPS = [(32, 3), (32, 4)]


def deep_config(h_q, is_fp8, block_n, num_stages):
    return dataclasses.replace(apart_config(h_q, is_fp8), block_n=block_n, num_stages=num_stages, lookahead=True)


@pytest.mark.parametrize("batch,s_q,h_q,topk,extra_topk,with_topk_length", DECODE_CASES[1:4])
@pytest.mark.parametrize("is_fp8", [False, True])
@pytest.mark.parametrize("block_n,num_stages", DEEP_STEPS)
def test_triton_sparse_decode_deep_pipelines_match_reference(batch, s_q, h_q, topk, extra_topk, with_topk_length,
                                                             is_fp8, block_n, num_stages):
    run_decode(batch, s_q, h_q, topk, extra_topk, with_topk_length, is_fp8, sink=extra_topk > 0,
               config=deep_config(h_q, is_fp8, block_n, num_stages))


@pytest.mark.parametrize("seq_lens,h_q,topk,indexer_topk,with_topk_length,with_sink", PREFILL_CASES[:3])
@pytest.mark.parametrize("block_n,num_stages", DEEP_STEPS)
def test_triton_sparse_prefill_deep_pipelines_match_reference(seq_lens, h_q, topk, indexer_topk, with_topk_length,
                                                              with_sink, block_n, num_stages):
    run_prefill(seq_lens, h_q, topk, indexer_topk, with_topk_length, with_sink,
                config=deep_config(h_q, False, block_n, num_stages))


@pytest.mark.parametrize("seq_lens,h_q,topk,indexer_topk,with_topk_length,with_sink",
                         PREFILL_CASES + (GPU_PREFILL_CASES if DEVICE == "cuda" else []))
@pytest.mark.parametrize("apart", [True, False])
def test_triton_sparse_prefill_lookahead_matches_reference(seq_lens, h_q, topk, indexer_topk, with_topk_length,
                                                           with_sink, apart):
    """Each tile's indices read a step early (TileConfig.lookahead): the first tile's before the loop, the next's past
    topk_length masked to -1; with the logits apart or not, on a GPU over many tiles."""
    config = dataclasses.replace(apart_config(h_q), lookahead=True, apart_logits=apart)
    run_prefill(seq_lens, h_q, topk, indexer_topk, with_topk_length, with_sink, config=config)


def test_triton_sparse_tiles_take_apart_logits_with_warpgroup_products():
    """With wgmma (Hopper) the 64-head tiles mask their logits apart, and the FP8 decode's first tiles take two
    stages (three would not fit with the exchange of P); elsewhere no tile does."""
    for is_fp8 in (False, True):
        hopper = triton_sparse.tile_configs(64, fp8_decode=is_fp8, apart=True)
        assert all(config.apart_logits == (config.block_h == 64) for config in hopper)
        assert not any(config.apart_logits for config in triton_sparse.tile_configs(64, fp8_decode=is_fp8))
    first = triton_sparse.tile_configs(128, fp8_decode=True, apart=True)[0]
    assert (first.block_h, first.block_n, first.num_stages, first.lookahead) == (64, 64, 2, True)
    assert triton_sparse.tile_configs(128, fp8_decode=True)[0].num_stages == 3


def test_triton_sparse_prefill_reads_indices_ahead_by_default_with_warpgroup_products(monkeypatch):
    """With wgmma (Hopper) the prefill from 64 heads first tries its 64 x 64 tiles with each tile's indices read a
    step early (stop 55), then without; fewer heads, or no wgmma, keep the ladder as it was."""
    prefill = triton_sparse.tile_configs(128, apart=True, prefill=True)
    assert prefill[0] == dataclasses.replace(prefill[1], lookahead=True) and prefill[0].apart_logits
    assert prefill[1:] == triton_sparse.tile_configs(128, apart=True)
    assert triton_sparse.tile_configs(128, prefill=True) == triton_sparse.tile_configs(128)
    assert triton_sparse.tile_configs(32, apart=True, prefill=True) == triton_sparse.tile_configs(32, apart=True)
    monkeypatch.setattr(triton_sparse, "warpgroup_products", lambda device: True)
    recording = RecordingKernel(triton_sparse._sparse_prefill_kernel)
    monkeypatch.setattr(triton_sparse, "_sparse_prefill_kernel", recording)
    run_prefill([6], 64, 64, 40, False, False)
    assert recording.options and all(options["LOOKAHEAD"] for options in recording.options)  # a GPU runs it twice


@pytest.mark.parametrize("seq_lens,h_q,topk,indexer_topk,with_topk_length,with_sink", PREFILL_CASES)
def test_triton_sparse_prefill_matches_reference(seq_lens, h_q, topk, indexer_topk, with_topk_length, with_sink):
    run_prefill(seq_lens, h_q, topk, indexer_topk, with_topk_length, with_sink)


def test_triton_sparse_strided_inputs():
    """q a slice of a wider tensor (every other head), indices a transposed view: the kernels follow the strides."""
    generator = torch.Generator(DEVICE).manual_seed(3)
    cache = paged_cache(3, False, generator, pad=0)
    q = torch.randn(2, 2, 32, D_QK, generator=generator, device=DEVICE).to(torch.bfloat16)[:, :, ::2]
    indices = random_indices((2, 90, 2), 3 * PAGE_BLOCK_SIZE, generator).transpose(1, 2)
    args = (q, cache, indices, None, None, None, None, KV_LORA_RANK, SCALE, False, None)
    assert_close(*triton_sparse.sparse_decode(*args), *reference.sparse_decode(*args))
    kv = cache.view(-1, 1, D_QK)[:150]
    args = (q[0], kv, indices[0, :, None], 0.05, KV_LORA_RANK, None, None, 20)
    got, want = triton_sparse.sparse_prefill(*args), reference.sparse_prefill(*args)
    assert_close(got[0], got[2], want[0], want[2])


def test_triton_sparse_strided_lengths_and_sink():
    """topk_length, extra_topk_length and attn_sink as views with gaps (0 and a large sink in them): the wrappers
    hand the kernels packed copies (they read the gaps before)."""
    generator = torch.Generator(DEVICE).manual_seed(5)
    cache, extra_cache = paged_cache(3, True, generator, pad=0), paged_cache(2, True, generator, pad=0)
    q = torch.randn(3, 1, 16, D_QK, generator=generator, device=DEVICE).to(torch.bfloat16)
    indices = random_indices((3, 1, 70), 3 * PAGE_BLOCK_SIZE, generator)
    extra_indices = random_indices((3, 1, 20), 2 * PAGE_BLOCK_SIZE, generator)
    topk_length = torch.tensor([70, 33, 5], dtype=torch.int32, device=DEVICE)
    extra_topk_length = torch.tensor([20, 7, 1], dtype=torch.int32, device=DEVICE)
    attn_sink = torch.randn(16, generator=generator, device=DEVICE)
    packed = (q, cache, indices, topk_length, extra_cache, extra_indices, extra_topk_length, KV_LORA_RANK, SCALE, True,
              attn_sink)
    strided = (*packed[:3], spaced(topk_length, 0), *packed[4:6], spaced(extra_topk_length, 0), *packed[7:10],
               spaced(attn_sink, 50.0))
    assert_close(*triton_sparse.sparse_decode(*strided), *reference.sparse_decode(*packed))
    kv = torch.randn(150, 1, D_QK, generator=generator, device=DEVICE).to(torch.bfloat16)
    prefill_indices = random_indices((6, 1, 70), 150, generator)
    lengths = torch.tensor([70, 0, 64, 1, 40, 69], dtype=torch.int32, device=DEVICE)
    packed = (q[0, 0, :6, None].expand(6, 16, D_QK).contiguous(), kv, prefill_indices, 0.05, KV_LORA_RANK, attn_sink,
              lengths, 0)
    strided = (*packed[:5], spaced(attn_sink, 50.0), spaced(lengths, 0), 0)
    got, want = triton_sparse.sparse_prefill(*strided), reference.sparse_prefill(*packed)
    assert_close(got[0], got[2], want[0], want[2])


def test_triton_sparse_empty_inputs():
    q = torch.empty(0, 1, 16, D_QK, dtype=torch.bfloat16, device=DEVICE)
    cache = torch.zeros(0, PAGE_BLOCK_SIZE, 1, D_QK, dtype=torch.bfloat16, device=DEVICE)
    out, lse = triton_sparse.sparse_decode(q, cache, torch.zeros(0, 1, 8, dtype=torch.int32, device=DEVICE), None,
                                           None, None, None, KV_LORA_RANK, SCALE, False)
    assert out.shape == (0, 1, 16, KV_LORA_RANK) and lse.shape == (0, 16, 1)
    # a cache without blocks and a kv without rows: every index is -1, every query sees nothing
    q = torch.randn(1, 1, 16, D_QK, device=DEVICE).to(torch.bfloat16)
    out, lse = triton_sparse.sparse_decode(q, cache, torch.full((1, 1, 8), -1, dtype=torch.int32, device=DEVICE),
                                           None, None, None, None, KV_LORA_RANK, SCALE, False)
    assert torch.all(out == 0) and torch.all(torch.isposinf(lse))
    no_index = torch.full((1, 1, 8), -1, dtype=torch.int32, device=DEVICE)
    out, max_logits, lse, lse_indexer = triton_sparse.sparse_prefill(q[0], cache.new_zeros(0, 1, D_QK), no_index, 0.1,
                                                                     KV_LORA_RANK)
    assert torch.all(out == 0) and torch.all(torch.isposinf(lse)) and torch.all(torch.isneginf(max_logits))
    assert lse_indexer.numel() == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("batch,s_q,h_q,topk,extra_topk,with_topk_length", GPU_DECODE_CASES)
@pytest.mark.parametrize("is_fp8", [False, True])
def test_triton_sparse_decode_gpu_grid_and_bit_identical_reruns(batch, s_q, h_q, topk, extra_topk,
                                                                with_topk_length, is_fp8):
    (out, lse), args = run_decode(batch, s_q, h_q, topk, extra_topk, with_topk_length, is_fp8,
                                  sink=bool(extra_topk))
    again_out, again_lse = triton_sparse.sparse_decode(*args)
    assert torch.equal(out, again_out) and torch.equal(lse, again_lse)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("seq_lens,h_q,topk,indexer_topk,with_topk_length,with_sink", GPU_PREFILL_CASES)
def test_triton_sparse_prefill_gpu_grid_and_bit_identical_reruns(seq_lens, h_q, topk, indexer_topk,
                                                                 with_topk_length, with_sink):
    got, args = run_prefill(seq_lens, h_q, topk, indexer_topk, with_topk_length, with_sink)
    again = triton_sparse.sparse_prefill(*args)
    assert all(torch.equal(a, b) for a, b in zip(got, again))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("batch,s_q,h_q,topk,extra_topk,with_topk_length", GPU_DECODE_CASES)
@pytest.mark.parametrize("block_n", [32, 64])
def test_triton_sparse_decode_lookahead_gpu_grid_and_bit_identical_reruns(batch, s_q, h_q, topk, extra_topk,
                                                                          with_topk_length, block_n):
    config = lookahead_config(h_q, block_n)
    (out, lse), args = run_decode(batch, s_q, h_q, topk, extra_topk, with_topk_length, True, sink=bool(extra_topk),
                                  config=config)
    again_out, again_lse = triton_sparse.sparse_decode(*args, config=config)
    assert torch.equal(out, again_out) and torch.equal(lse, again_lse)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("op,is_fp8", [("sparse_decode", False), ("sparse_decode", True),
                                       ("sparse_prefill", False)])  # sparse prefill reads a BF16 kv
def test_sparse_ops_use_triton_and_capture_in_cuda_graph(op, is_fp8, monkeypatch):
    """With FLASHMLA_BACKEND=triton (on Hopper the CUDA kernels come first) the ops dispatch to the Triton kernels,
    and replay in a CUDA graph with new index values."""
    import flashmla_ops

    monkeypatch.setenv("FLASHMLA_BACKEND", "triton")
    assert flashmla_ops.backend(op, "cuda") == "triton"
    generator = torch.Generator(DEVICE).manual_seed(5 + is_fp8)
    if op == "sparse_decode":
        (_, _), args = run_decode(2, 1, 64, 512, 0, True, is_fp8)
        call = lambda: torch.ops.flashmla.sparse_decode(*args[:7], None, None, *args[7:])  # noqa: E731
        indices = args[2]
        want = lambda: reference.sparse_decode(*args)  # noqa: E731
    else:
        _, args = run_prefill([100, 30], 64, 256, 128, True, True)
        call = lambda: torch.ops.flashmla.sparse_prefill(*args)  # noqa: E731
        indices = args[2]
        want = lambda: reference.sparse_prefill(*args)  # noqa: E731
    # the path these inputs take (the reference, which captures and replays too, would compare with itself)
    from flashmla_ops import decode, sparse_prefill
    q, cache = args[:2]
    path = (decode.sparse_decode_path(q, cache, None, KV_LORA_RANK, is_fp8) if op == "sparse_decode"
            else sparse_prefill.sparse_prefill_path(q, cache, args[4], args[7]))
    assert path == "triton"
    call()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = call()
    indices.copy_(indices[torch.randperm(indices.shape[0], generator=generator, device=DEVICE)])  # new index values
    graph.replay()
    torch.cuda.synchronize()
    expected = want()
    assert_close(got[0], got[-1] if op == "sparse_decode" else got[2], expected[0],
                 expected[-1] if op == "sparse_decode" else expected[2])
