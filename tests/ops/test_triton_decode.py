"""The Triton dense decode kernel against the reference: on the GPU, and on the CPU under Triton's interpreter.

Outputs are poisoned before each run; LSE is compared too; lengths are mixed within a batch (0, 1, non-multiples of
the 64-token page, one long sequence among short ones), with causal s_q > 1, the FP8 cache and the attention sink.
"""
import dataclasses

import pytest
import torch
from decode_inputs import (DEVICE, GARBAGE_PARTS, GARBAGE_SCHEDULES, GARBAGE_SEQLENS, assert_decode_close,
                           assert_rows_close, bad_table_inputs, check_dense_decode_op_replays_in_cuda_graph,
                           garbage_schedule, huge_and_small_scale_inputs, in_pool, make_inputs, poisoned, spaced)
from triton_recording import RecordingKernel

from flashmla_ops import reference
from flashmla_ops.kv_cache import D_QK, KV_LORA_RANK, PAGE_BLOCK_SIZE

triton_decode = pytest.importorskip("flashmla_ops.triton.decode", exc_type=ImportError)
from flashmla_ops.triton.common import FP8_HARDWARE, FP8_INTEGER, FP8_TO_F16, hardware_fp8  # noqa: E402
from flashmla_ops.triton import common as triton_common  # noqa: E402


def skip_unless_gpu_decodes(level):
    """On a GPU, skip an e4m3 decoding (common.fp8_conversion) it cannot compile: hardware conversion before sm_89,
    bf16 straight from e4m3 before sm_90."""
    if DEVICE == "cuda" and level > hardware_fp8(torch.device(DEVICE)):
        pytest.skip(f"e4m3 decoding {level} does not compile for this GPU")


# (seqlens, s_q, h_q): the CPU interpreter gets the small end of the grid, the GPU all of it.
CASES = [
    ([0, 1, 70, 130], 1, 16),
    ([64, 1, 200], 2, 16),
    ([5, 1000], 1, 64),
    ([129], 2, 128),
    ([3, 513], 4, 16),
]
GPU_CASES = [
    ([4096] * 8, 1, 16),
    ([1, 16384, 2, 63], 1, 128),
    ([32768], 1, 128),
    ([4096] * 4, 2, 128),
    ([1000, 31, 4097], 4, 64),
]


def run_and_compare(seqlens, s_q, h_q, causal, is_fp8, sink, padded=False, **kernel_options):
    generator = torch.Generator(DEVICE).manual_seed(len(seqlens) * 1000 + s_q * 10 + h_q + causal + 2 * is_fp8)
    q, cache, block_table, cache_seqlens = make_inputs(seqlens, s_q, h_q, is_fp8, generator, padded)
    attn_sink = torch.randn(h_q, generator=generator, device=DEVICE) if sink else None
    scale = D_QK ** -0.5
    out, lse = poisoned(triton_decode.dense_decode, q, cache, block_table, cache_seqlens, KV_LORA_RANK, scale, causal,
                        is_fp8, attn_sink, **kernel_options)
    want_out, want_lse = reference.dense_decode(q, cache, block_table, cache_seqlens, KV_LORA_RANK, scale, causal,
                                                is_fp8, attn_sink)
    assert_decode_close(out, lse, want_out, want_lse)
    return out, lse, (q, cache, block_table, cache_seqlens, attn_sink)


@pytest.mark.parametrize("is_fp8", [False, True])
def test_triton_dense_decode_strided_table_lengths_and_sink(is_fp8):
    """block_table, cache_seqlens and attn_sink as views with gaps (block 0, length 0 and a large sink in them): the
    wrapper hands the kernel packed copies, so the result is the packed inputs' (it read the gaps before)."""
    generator = torch.Generator(DEVICE).manual_seed(11)
    q, cache, block_table, cache_seqlens = make_inputs([70, 1, 130], 1, 16, is_fp8, generator)
    attn_sink = torch.randn(16, generator=generator, device=DEVICE)
    packed = (q, cache, block_table, cache_seqlens, KV_LORA_RANK, D_QK ** -0.5, False, is_fp8, attn_sink)
    strided = (q, cache, spaced(block_table, 0), spaced(cache_seqlens, 0), *packed[4:8], spaced(attn_sink, 50.0))
    assert strided[2].stride(-1) == 2 and strided[3].stride(-1) == 2 and strided[8].stride(-1) == 2
    out, lse = triton_decode.dense_decode(*strided)
    assert_decode_close(out, lse, *reference.dense_decode(*packed))


@pytest.mark.parametrize("seqlens,s_q,h_q", CASES)
@pytest.mark.parametrize("is_fp8", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_triton_dense_decode_matches_reference(seqlens, s_q, h_q, is_fp8, causal):
    run_and_compare(seqlens, s_q, h_q, causal, is_fp8, sink=False)


# prompts continued through the decode path (models.generation.prefill): many causal queries a sequence, one of them
# shorter than s_q; on the GPU also 64 x 128 heads (128 row tiles of one sequence) and s_q 130
CONTINUATION_CASES = [([20, 150], 33, 4)] + ([([1000], 64, 128), ([4097], 130, 8)] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("seqlens,s_q,h_q", CONTINUATION_CASES)
@pytest.mark.parametrize("is_fp8", [False, True])
def test_triton_dense_decode_continued_prompts(seqlens, s_q, h_q, is_fp8):
    run_and_compare(seqlens, s_q, h_q, causal=True, is_fp8=is_fp8, sink=False)


@pytest.mark.parametrize("is_fp8", [False, True])
def test_triton_dense_decode_sink_and_padded_fp8_cache(is_fp8):
    run_and_compare([77, 300], 2, 16, causal=True, is_fp8=is_fp8, sink=True, padded=is_fp8)


@pytest.mark.parametrize("schedule", ["uniform", "balanced"])
@pytest.mark.parametrize("is_fp8", [False, True])
def test_triton_dense_decode_never_reads_past_the_cache_or_the_table(schedule, is_fp8):
    """Block-table entries outside the cache and a length past the table's row, which the op does not check on a GPU
    without FLASHMLA_CHECK: the kernel reads page 0 for the first and cuts the second at the table's capacity, never
    reading the memory after the cache or the table's next row."""
    generator = torch.Generator(DEVICE).manual_seed(23 + is_fp8)
    (q, cache, block_table, cache_seqlens), (valid_table, valid_seqlens) = bad_table_inputs(is_fp8, generator)
    config = dataclasses.replace(triton_decode.default_config(2, 16, q.device, is_fp8), schedule=schedule)
    out, lse = triton_decode.dense_decode(q, cache, block_table, cache_seqlens, KV_LORA_RANK, D_QK ** -0.5, False,
                                          is_fp8, None, config=config)
    assert_decode_close(out, lse, *reference.dense_decode(q, cache, valid_table, valid_seqlens, KV_LORA_RANK,
                                                          D_QK ** -0.5, False, is_fp8))


@pytest.mark.parametrize("is_fp8", [False, True])
def test_triton_dense_decode_never_reads_slots_past_the_lengths(is_fp8):
    """Every cache slot no sequence holds (rows past a length in its last page, blocks of no table entry) NaN bytes,
    as an allocator's leftovers may be: a token past a length that were loaded would bring its NaN into P V (0 times
    NaN), even masked. Split over several programs, so that splits end short of the length."""
    generator = torch.Generator(DEVICE).manual_seed(41 + is_fp8)
    seqlens, s_q, h_q = [65, 1, 130], 2, 16
    q, cache, block_table, cache_seqlens = make_inputs(seqlens, s_q, h_q, is_fp8, generator)
    held = torch.zeros(cache.shape[:2], dtype=torch.bool, device=DEVICE)
    for b, length in enumerate(seqlens):
        tokens = torch.arange(length, device=DEVICE)
        held[block_table[b, tokens // PAGE_BLOCK_SIZE].long(), tokens % PAGE_BLOCK_SIZE] = True
    want = reference.dense_decode(q, cache, block_table, cache_seqlens, KV_LORA_RANK, D_QK ** -0.5, True, is_fp8)
    cache.view(torch.uint8)[~held] = 0xFF  # NaN as bf16, e4m3, the float32 scales
    config = dataclasses.replace(triton_decode.default_config(len(seqlens), s_q * h_q, q.device, is_fp8),
                                 programs_per_sm=4)
    out, lse = triton_decode.dense_decode(q, cache, block_table, cache_seqlens, KV_LORA_RANK, D_QK ** -0.5, True,
                                          is_fp8, None, config=config)
    assert_decode_close(out, lse, *want)


def test_triton_dense_decode_empty_batch():
    q = torch.empty(0, 1, 16, D_QK, dtype=torch.bfloat16, device=DEVICE)
    cache = torch.randn(2, PAGE_BLOCK_SIZE, 1, D_QK, device=DEVICE).to(torch.bfloat16)
    out, lse = triton_decode.dense_decode(q, cache, torch.zeros(0, 1, dtype=torch.int32, device=DEVICE),
                                          torch.zeros(0, dtype=torch.int32, device=DEVICE), KV_LORA_RANK, 0.1, False,
                                          False, None)
    assert out.shape == (0, 1, 16, KV_LORA_RANK) and lse.shape == (0, 16, 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("seqlens,s_q,h_q", GPU_CASES)
@pytest.mark.parametrize("is_fp8", [False, True])
def test_triton_dense_decode_gpu_grid_and_bit_identical_reruns(seqlens, s_q, h_q, is_fp8):
    out, lse, inputs = run_and_compare(seqlens, s_q, h_q, causal=s_q > 1, is_fp8=is_fp8, sink=False)
    again_out, again_lse = triton_decode.dense_decode(*inputs[:4], KV_LORA_RANK, D_QK ** -0.5, s_q > 1, is_fp8, None)
    assert torch.equal(out, again_out) and torch.equal(lse, again_lse)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dense_decode_op_uses_triton_and_captures_in_cuda_graph(monkeypatch):
    import flashmla_ops

    monkeypatch.setenv("FLASHMLA_BACKEND", "triton")
    assert flashmla_ops.backend("dense_decode", "cuda") == "triton"
    check_dense_decode_op_replays_in_cuda_graph(11)


def test_triton_fp8_integer_decode_path(monkeypatch):
    """GPUs without FP8 conversion instructions (before sm_89) decode e4m3 with integer ops: same results."""
    monkeypatch.setattr(triton_decode, "hardware_fp8", lambda device: FP8_INTEGER)
    run_and_compare([77, 300], 2, 16, causal=True, is_fp8=True, sink=False)


def test_triton_split_policy_rounds_down_and_doubles_programs_from_8_sequences(monkeypatch):
    """On a 132-SM GPU with Hopper's shared memory: splits rounded down (no tail wave), never 0, never over the table's
    tiles or 256; up to 16 rows two programs per SM from 8 sequences on, one below; an FP8 cache up to 16 rows takes
    32-token tiles, the f16 products and the prefetch of the next tile's bytes (64-row tiles neither); with 64-token
    tiles 64-row ones from 64 rows (FP8 from 17), 32-row tiles below a full GPU with less shared memory."""
    monkeypatch.setattr(triton_decode, "device_limits", lambda device: (132, 227 * 1024))
    split = triton_decode.num_splits_for
    assert split(8, 1, 512, 132, 1) == 16  # b8 h16 32k at one per SM: 128 programs, not 17 splits (136)
    assert split(8, 1, 512, 132, 2) == 33  # two per SM: 264 programs
    assert split(128, 1, 64, 132, 2) == 2
    assert split(256, 1, 64, 132, 1) == 1  # the row tiles alone fill the GPU
    assert split(1, 1, 512, 132, 2) == 256  # capped
    assert split(4, 1, 8, 132, 1) == 8  # at most the table's tiles
    assert split(0, 1, 8, 132, 1) >= 1  # empty batch: a valid launch shape
    config = triton_decode.default_config
    assert [config(batch, 16, "cuda").programs_per_sm for batch in (1, 4, 7, 8, 128)] == [1, 1, 1, 2, 2]
    fp8 = config(8, 16, "cuda", is_fp8=True)
    assert (fp8.block_n, fp8.fp8_f16, fp8.prefetch, fp8.programs_per_sm) == (32, True, True, 2)
    wide = config(128, 128, "cuda", is_fp8=True)
    assert not wide.fp8_f16 and not wide.prefetch  # 64-row tiles keep the bf16 products, no prefetch (not timed)
    assert not config(8, 16, "cuda").prefetch  # a BF16 cache has no bytes to prefetch
    # 64-row tiles, one program per SM, from 64 rows (FP8: 17) whether or not the batch's tiles fill the GPU (stop 43),
    # at two stages (three take 296 KiB with the table lookups a step early, stop 54)
    for batch, rows, is_fp8 in ((1, 128, False), (1, 32, True), (128, 48, True), (16, 128, False), (256, 64, False)):
        tiles = config(batch, rows, "cuda", is_fp8=is_fp8)
        assert (tiles.block_h, tiles.num_warps, tiles.programs_per_sm, tiles.num_stages) == (64, 8, 1, 2)
    for batch in (1, 128):  # BF16 below 64 rows: 32-row tiles, two programs per SM
        assert (config(batch, 32, "cuda").block_h, config(batch, 32, "cuda").programs_per_sm) == (32, 2)
    # With less shared memory (Ampere's 163 KiB: 32-token tiles, not timed with 64 rows below a full GPU) as before
    monkeypatch.setattr(triton_decode, "device_limits", lambda device: (108, 163 * 1024))
    assert (config(1, 128, "cuda").block_h, config(1, 128, "cuda").programs_per_sm) == (32, 2)
    assert (config(128, 128, "cuda").block_h, config(128, 128, "cuda").block_n) == (64, 32)


def test_triton_split_partials_are_f16_from_8_splits():
    """Partials in f16 (with their row scales) from 8 splits a sequence, float32 below (slower in f16 at 2 splits,
    decode.Partials), the output itself (placeholders) unsplit."""
    out = torch.empty(3, 2, 16, KV_LORA_RANK, dtype=torch.bfloat16, device=DEVICE)
    lse = torch.empty(3, 16, 2, device=DEVICE)
    unsplit = triton_decode.split_buffers(out, lse, 1)
    assert unsplit.out is out and unsplit.lse is lse and not unsplit.half
    for splits, dtype in ((2, torch.float32), (7, torch.float32), (8, torch.float16), (66, torch.float16)):
        partials = triton_decode.split_buffers(out, lse, splits)
        assert partials.out.dtype == dtype and partials.half == (dtype == torch.float16)
        assert partials.out.shape == (3, splits, 32, KV_LORA_RANK) and partials.out.is_contiguous()
        assert partials.lse.shape == partials.scale.shape == (3, splits, 32) and partials.lse.is_contiguous()
        separate_scale = partials.scale.data_ptr() != partials.lse.data_ptr()
        assert partials.scale.is_contiguous() and separate_scale == partials.half


@pytest.mark.parametrize("half", [False, True])
def test_triton_combine_reads_more_splits_than_one_chunk(monkeypatch, half):
    """20 splits a sequence, past the combine's 16 at a time (SPLIT_CHUNK): the second chunk's 4 count, the 12 lanes
    past them (the next sequence's partials) do not; float32 and f16 partials."""
    monkeypatch.setattr(triton_decode, "device_limits", lambda device: (40, 227 * 1024))
    monkeypatch.setattr(triton_decode, "HALF_PARTIALS_FROM_SPLITS", 2 if half else 1 << 20)
    splits, count = [], triton_decode.num_splits_for
    monkeypatch.setattr(triton_decode, "num_splits_for", lambda *args: splits.append(count(*args)) or splits[-1])
    run_and_compare([1300, 1400], 1, 16, False, False, sink=True)
    assert splits and set(splits) == {20}  # a launch each call (on a GPU `poisoned` calls twice)


@pytest.mark.parametrize("is_fp8", [False, True])
def test_triton_dense_decode_combines_few_rows_in_column_parts(monkeypatch, is_fp8):
    """A batch of fewer rows than SMs (1000 here) splits each sequence many ways and combines each row in four column
    parts (combine_parts): the whole op against the reference, f16 partials, a sink, an empty sequence."""
    monkeypatch.setattr(triton_decode, "device_limits", lambda device: (1000, 227 * 1024))
    kernel = RecordingKernel(triton_decode._combine_kernel)
    monkeypatch.setattr(triton_decode, "_combine_kernel", kernel)
    run_and_compare([1300, 0, 700], 1, 16, False, is_fp8, sink=True)
    assert kernel.grids[-1] == (16, 3, 4) and kernel.options[-1]["COLUMNS"] == 128
    assert kernel.options[-1]["HALF_PARTIALS"]


def combined(partial_out, partial_lse, partial_scale, sink, s_q, h_q):
    """What the combine should give, in float64, from one sequence's `(splits, rows, d_v)` partials: out
    `(s_q, h_q, d_v)` and the natural-log lse `(h_q, s_q)`; a split of lse -inf counts nothing (its rows may be NaN)."""
    lse = partial_lse.double()
    largest = lse.max(0).values
    shift = torch.where(largest == float("-inf"), torch.zeros_like(largest), largest)
    weights = torch.where(lse == float("-inf"), torch.zeros_like(lse), torch.exp2(lse - shift))
    total = weights.sum(0)
    rows = torch.where(weights[..., None] > 0, partial_out.double() * partial_scale.double()[..., None], 0.0)
    out = (weights[..., None] * rows).sum(0) / torch.where(total > 0, total, 1.0)[:, None]
    natural = torch.where(total > 0, (shift + torch.log2(total)) * torch.log(torch.tensor(2.0, dtype=torch.float64)),
                          float("inf"))
    if sink is not None:
        out = out * torch.where(total > 0, torch.sigmoid(natural - sink.double().repeat(s_q)), 1.0)[:, None]
    return out.view(s_q, h_q, -1), natural.view(s_q, h_q).T


@pytest.mark.parametrize("max_parts", [1, 2, 4])
@pytest.mark.parametrize("half,variable,wide,uniform_splits,lse_chunk", [
    (False, False, False, 70, 128), (True, False, True, 70, 16), (False, False, True, 3, 128),
    (False, False, False, 2, 128), (True, False, False, 8, 128), (True, True, False, 0, 128),
    (False, True, True, 0, 16)])
def test_triton_combine_in_column_parts_matches_float64(monkeypatch, max_parts, half, variable, wide,
                                                        uniform_splits, lse_chunk):
    """The combine with each row cut into 1, 2 or 4 column parts (combine_parts; more splits read a step the more
    parts), checked against the sum in float64: 70 splits a sequence (past one step's splits at every part count), a
    uniform 2, 3 or 8 (_combine_few_kernel: four rows of two lanes, the last tile two rows past the six; two rows of
    four lanes, one lane past the splits; a row of eight), balanced 3, 20 and 70; float32 and f16 partials, the
    uniform and balanced layouts, wide batches, an attention sink, LSEs hundreds apart (weights that underflow, across
    and within lanes), splits that saw nothing (rows and scales of NaN, selected away) and a row no split saw (out 0,
    lse +inf); the row's largest LSE found in one step or (COMBINE_LSE_CHUNK 16) over several. Poisoned outputs: every
    column part writes; the launch is the one combine_parts (or the few-splits tile) asks for."""
    monkeypatch.setattr(triton_decode, "COMBINE_MAX_PARTS", max_parts)
    monkeypatch.setattr(triton_decode, "COMBINE_LSE_CHUNK", lse_chunk)
    monkeypatch.setattr(triton_decode, "device_limits", lambda device: (1000, 227 * 1024))
    kernel = RecordingKernel(triton_decode._combine_kernel)
    monkeypatch.setattr(triton_decode, "_combine_kernel", kernel)
    few = RecordingKernel(triton_decode._combine_few_kernel)
    monkeypatch.setattr(triton_decode, "_combine_few_kernel", few)
    if wide:
        monkeypatch.setattr(triton_common, "MAX_GRID_Y", 2)
    s_q, h_q, d_v, splits = 2, 3, KV_LORA_RANK, [3, 20, 70] if variable else [uniform_splits] * 3
    rows = s_q * h_q
    generator = torch.Generator(DEVICE).manual_seed(max_parts * 1000 + uniform_splits * 8 + 4 * half + 2 * variable
                                                    + wide + lse_chunk)
    out = torch.empty(len(splits), s_q, h_q, d_v, dtype=torch.bfloat16, device=DEVICE)
    total = sum(splits) if variable else len(splits) * max(splits)
    partials = triton_decode.Partials.empty(out, *((total,) if variable else (len(splits), max(splits))), half=half)
    partials.out.copy_(torch.randn(partials.out.shape, generator=generator, device=DEVICE))
    partials.lse.copy_(torch.randn(partials.lse.shape, generator=generator, device=DEVICE) * 8)
    if half:
        partials.scale.copy_(torch.exp2(torch.randint(-20, 20, partials.scale.shape, generator=generator,
                                                      device=DEVICE).float()))
    offsets = torch.tensor([0, *splits], device=DEVICE).cumsum(0).to(torch.int32)
    flat_out = partials.out.view(-1, rows, d_v)
    flat_lse, flat_scale = partials.lse.view(-1, rows), partials.scale.view(-1, rows)
    first = [int(offsets[b]) if variable else b * max(splits) for b in range(len(splits))]
    for b, count in enumerate(splits):  # every third split saw nothing; sequence 1's row 4 nothing at all
        flat_lse[first[b]:first[b] + count:3] = float("-inf")
        flat_out[first[b]:first[b] + count:3] = float("nan")
        if half:
            flat_scale[first[b]:first[b] + count:3] = float("nan")
    flat_lse[first[1]:first[1] + splits[1], 4] = float("-inf")
    spread = flat_lse[first[2]:first[2] + splits[2]]  # sequence 2: LSEs hundreds apart, each row's largest 5
    spread.mul_(40).sub_(spread.max(0).values - 5)  # (so that the sink leaves its outputs in float32's normals)
    sink = torch.randn(h_q, generator=generator, device=DEVICE)
    lse = torch.empty(len(splits), h_q, s_q, device=DEVICE)
    out.fill_(float("nan"))
    lse.fill_(float("nan"))
    triton_decode.combine(partials, sink, out, lse, split_offsets=offsets if variable else None)
    for b, count in enumerate(splits):
        chosen = slice(first[b], first[b] + count)
        scale = flat_scale[chosen] if half else torch.ones_like(flat_lse[chosen])
        want_out, want_lse = combined(flat_out[chosen], flat_lse[chosen], scale, sink, s_q, h_q)
        torch.testing.assert_close(out[b].double(), want_out.to(torch.bfloat16).double(), rtol=2 ** -7, atol=0)
        torch.testing.assert_close(lse[b].double(), want_lse, rtol=1e-6, atol=1e-5)
    assert out[1, 1, 1].eq(0).all() and lse[1, 1, 1] == float("inf")  # row 4: query 1, head 1
    if not variable and uniform_splits <= 8:
        lanes = 1 << (uniform_splits - 1).bit_length()
        tiles = -(-rows // (8 // lanes))
        assert not kernel.grids and few.grids == [(tiles * 3,) if wide else (tiles, 3)]
        assert (few.options[-1]["SPLITS"], few.options[-1]["ROWS"], few.options[-1]["COLUMNS"]) == (lanes, 8 // lanes,
                                                                                                     d_v)
        return
    assert not few.grids
    columns = d_v // max_parts
    chunk = 16 * max_parts if variable else min(16 * max_parts, 1 << (uniform_splits - 1).bit_length())
    parts = [max_parts] if max_parts > 1 else []
    assert kernel.grids[-1] == ((rows * 3, *parts) if wide else (rows, 3, *parts))
    assert (kernel.options[-1]["COLUMNS"], kernel.options[-1]["SPLIT_CHUNK"]) == (columns, chunk)
    assert kernel.options[-1]["LSE_CHUNK"] == lse_chunk


BALANCED_CASES = [
    ([0, 1, 70, 700], 1, 16, False, False),
    ([1000, 3, 0, 64, 65], 2, 16, True, True),
    ([129], 1, 64, False, True),
    ([5, 2, 513], 4, 16, True, False),
]


@pytest.mark.parametrize("seqlens,s_q,h_q,causal,is_fp8", BALANCED_CASES)
@pytest.mark.parametrize("parts", [1, 3, 7, 40])
def test_triton_balanced_schedule_matches_reference(seqlens, s_q, h_q, causal, is_fp8, parts):
    """The balanced schedule: parts that span several sequences, sequences split over several parts (partials placed
    by the cumulative num_splits), idle parts, empty sequences; with the metadata given as the op receives it."""
    rows = s_q * h_q
    config = dataclasses.replace(triton_decode.default_config(len(seqlens), rows, torch.device(DEVICE)),
                                 schedule="balanced")
    lengths = torch.tensor(seqlens, dtype=torch.int32, device=DEVICE)
    metadata, num_splits = reference.get_mla_metadata(lengths, parts)
    run_and_compare(seqlens, s_q, h_q, causal, is_fp8, sink=parts == 3, config=config,
                    tile_scheduler_metadata=metadata, num_splits=num_splits)


APART_CASES = [([5, 1000], 1, 64), ([129], 2, 128), ([70, 1, 0], 3, 32)]
# Hopper's 64-row tiles (one page a tile); on a GPU also at 16 warps (four warpgroups split the logits and P V's
# columns; the interpreter runs a program as one), 32 tokens a tile, and without the logits apart (the default off
# wgmma GPUs, which Hopper no longer runs by itself)
APART_WARPS = [8, 16] if DEVICE == "cuda" else [8]
APART_TOKENS = [64, 32] if DEVICE == "cuda" else [64]
APART_FLAGS = [True, False] if DEVICE == "cuda" else [True]


@pytest.mark.parametrize("seqlens,s_q,h_q", APART_CASES)
@pytest.mark.parametrize("products", ["bf16 cache", "fp8 bf16", "fp8 f16"])
@pytest.mark.parametrize("schedule", ["uniform", "balanced"])
@pytest.mark.parametrize("num_warps", APART_WARPS)
@pytest.mark.parametrize("block_n", APART_TOKENS)
@pytest.mark.parametrize("apart", APART_FLAGS)
def test_triton_apart_logits_match_reference(seqlens, s_q, h_q, products, schedule, num_warps, block_n, apart):
    """64-row tiles with the logits masked behind a branch on the loop's own condition (common.mask_logits_apart),
    each product scaled to base 2 before the sum, in each of the kernel's three logit sums: tokens past a length in
    partial tiles, causal queries, an empty sequence, splits and parts that span sequences."""
    if num_warps == 16 and not apart:
        pytest.skip("16 warps are timed with the logits apart only")
    is_fp8 = products != "bf16 cache"
    config = dataclasses.replace(triton_decode.default_config(len(seqlens), s_q * h_q, torch.device(DEVICE), is_fp8),
                                 block_h=64, num_warps=num_warps, block_n=block_n, num_stages=2, programs_per_sm=1,
                                 apart_logits=apart, fp8_f16=products == "fp8 f16", prefetch=False, schedule=schedule)
    run_and_compare(seqlens, s_q, h_q, s_q > 1, is_fp8, sink=schedule == "uniform", config=config)


# the whole-latent kernel's steps: one stage ahead at 64 tokens, and on a GPU 32 tokens three and four stages deep
WHOLE_STEPS = [(64, 2)] + ([(32, 3), (32, 4)] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("seqlens,s_q,h_q", APART_CASES + [([0, 1, 70, 130], 1, 16)])
@pytest.mark.parametrize("schedule", ["uniform", "balanced"])
@pytest.mark.parametrize("block_n,num_stages", WHOLE_STEPS)
@pytest.mark.parametrize("apart", APART_FLAGS)
def test_triton_whole_latent_matches_reference(seqlens, s_q, h_q, schedule, block_n, num_stages, apart):
    """The BF16 cache's latent as one 512-wide tile (LaunchConfig.whole) over 64-row tiles: partial and empty tiles,
    causal queries, empty sequences (their splits still take one masked step), parts that span sequences."""
    config = dataclasses.replace(triton_decode.default_config(len(seqlens), s_q * h_q, torch.device(DEVICE)),
                                 block_h=64, num_warps=8, block_n=block_n, num_stages=num_stages, programs_per_sm=1,
                                 apart_logits=apart, schedule=schedule, whole=True)
    run_and_compare(seqlens, s_q, h_q, s_q > 1, False, sink=schedule == "uniform", config=config)


@pytest.mark.parametrize("seqlens,s_q,h_q", [([1300, 0, 700], 1, 64), ([129, 2000], 2, 128)])
def test_triton_whole_latent_f16_partials_match_reference(monkeypatch, seqlens, s_q, h_q):
    """_store_whole's f16 partials (the row scaled by a power of two over its largest, HALF_PARTIALS): eight splits a
    sequence (empty ones included), every split launch half."""
    monkeypatch.setattr(triton_decode, "device_limits", lambda device: (8 * len(seqlens) * s_q * h_q // 64, 227 * 1024))
    monkeypatch.setattr(triton_decode, "HALF_PARTIALS_FROM_SPLITS", 2)
    recording = RecordingKernel(triton_decode._dense_decode_split_kernel)
    monkeypatch.setattr(triton_decode, "_dense_decode_split_kernel", recording)
    config = dataclasses.replace(triton_decode.default_config(len(seqlens), s_q * h_q, torch.device(DEVICE)),
                                 block_h=64, num_warps=8, block_n=64, num_stages=2, programs_per_sm=1,
                                 apart_logits=True, whole=True)
    run_and_compare(seqlens, s_q, h_q, s_q > 1, False, sink=True, config=config)
    assert recording.options and all(options["HALF_PARTIALS"] and options["WHOLE"] for options in recording.options)


# 16-row tiles, and Hopper's 64-row BF16 default (the latent whole, the logits apart)
WIDE_CONFIGS = {"16-rows": triton_decode.LaunchConfig(block_h=16, block_n=32, num_warps=4, num_stages=1,
                                                      programs_per_sm=4),
                "64-rows-whole": triton_decode.LaunchConfig(block_h=64, block_n=64, num_warps=8, num_stages=2,
                                                            programs_per_sm=4, apart_logits=True, whole=True)}


@pytest.mark.parametrize("config", WIDE_CONFIGS.values(), ids=WIDE_CONFIGS.keys())
@pytest.mark.parametrize("s_q,h_q,causal,sink", [(2, 16, True, False), (1, 64, False, True)])
def test_triton_wide_batches_take_the_batch_in_the_grids_first_dimension(monkeypatch, s_q, h_q, causal, sink,
                                                                          config):
    """More sequences than a grid's second dimension holds (MAX_GRID_Y, 65535 on CUDA; 2 here): the split and combine
    kernels launch the batch in the first (WIDE_BATCH, common.batch_grid), with every sequence's splits and
    rows in place; at most MAX_GRID_Y sequences keep the batch in the second. (On a GPU `poisoned` runs each op
    twice: the last launches count.)"""
    monkeypatch.setattr(triton_common, "MAX_GRID_Y", 2)
    monkeypatch.setattr(triton_decode, "device_limits", lambda device: (64, 227 * 1024))  # several splits
    kernels = {name: RecordingKernel(getattr(triton_decode, name))
               for name in ("_dense_decode_split_kernel", "_combine_kernel", "_combine_few_kernel")}
    for name, kernel in kernels.items():
        monkeypatch.setattr(triton_decode, name, kernel)
    rows = s_q * h_q
    row_tiles = -(-rows // config.block_h)
    launches = []
    for seqlens in ([130, 64], [130, 0, 7, 300, 1]):
        run_and_compare(seqlens, s_q, h_q, causal, False, sink=sink, config=config)
        launches.append({name: (kernel.grids[-1], kernel.options[-1]["WIDE_BATCH"])
                         for name, kernel in kernels.items() if kernel.grids})
        for kernel in kernels.values():
            kernel.grids.clear()
    (narrow, narrow_wide), (wide, wide_wide) = (launch["_dense_decode_split_kernel"] for launch in launches)
    assert narrow[:2] == (row_tiles, 2) and wide[0] == row_tiles * 5 and min(narrow[-1], wide[-1]) > 1, (narrow, wide)
    for launch, batch, is_wide in zip(launches, (2, 5), (False, True)):  # the combine its split count takes
        splits = launch["_dense_decode_split_kernel"][0][-1]
        if splits <= triton_decode.COMBINE_FEW_SPLITS:  # row tiles of COMBINE_FEW_TILE values a column
            tiles = -(-rows // (triton_decode.COMBINE_FEW_TILE // (1 << (splits - 1).bit_length())))
            name, grid = "_combine_few_kernel", (tiles * batch,) if is_wide else (tiles, batch)
        else:
            parts = triton_decode.combine_parts(rows * batch, 64)  # column parts where rows are few
            name, grid = "_combine_kernel", (*((rows * batch,) if is_wide else (rows, batch)), *[parts] * (parts > 1))
        assert launch[name] == (grid, is_wide), (name, splits)
    assert (narrow_wide, wide_wide) == (False, True)


def test_triton_wide_batches_of_the_balanced_schedule(monkeypatch):
    """The balanced schedule's launch has no batch dimension (its parts), its combine does: with more sequences than
    MAX_GRID_Y (2 here) that takes (rows x sequences,) too, each sequence's splits where SplitOffsets puts them."""
    monkeypatch.setattr(triton_common, "MAX_GRID_Y", 2)
    kernel = RecordingKernel(triton_decode._combine_kernel)
    monkeypatch.setattr(triton_decode, "_combine_kernel", kernel)
    seqlens = [130, 0, 7, 300, 1]
    config = dataclasses.replace(triton_decode.default_config(5, 32, torch.device(DEVICE)), schedule="balanced")
    metadata, num_splits = reference.get_mla_metadata(torch.tensor(seqlens, dtype=torch.int32, device=DEVICE), 3)
    run_and_compare(seqlens, 2, 16, True, False, sink=True, config=config, tile_scheduler_metadata=metadata,
                    num_splits=num_splits)
    parts = triton_decode.combine_parts(32 * 5, triton_decode.device_limits(torch.device(DEVICE))[0])
    assert kernel.grids[-1] == (32 * 5, *([parts] if parts > 1 else []))
    assert kernel.options[-1]["VARIABLE"] and kernel.options[-1]["WIDE_BATCH"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("h_q", [16, 64])
def test_triton_decode_wide_batch_matches_its_halves(h_q):
    """MAX_GRID_Y + 2 sequences of 1 to 64 tokens in one launch (WIDE_BATCH) give, bit for bit, what the two halves
    give each in a launch of its own (the batch in the grid's second dimension), and match the reference on a sample
    of their sequences. 16 heads take 16-row tiles, 64 Hopper's 64-row default (the latent whole, the logits apart);
    16 heads' outputs are poisoned first (64 heads' would take 16 times their 4.3 GB: see `poisoned`)."""
    generator = torch.Generator("cuda").manual_seed(65537 + h_q)
    batch, blocks = triton_common.MAX_GRID_Y + 2, 64
    cache = torch.randn(blocks, PAGE_BLOCK_SIZE, 1, D_QK, generator=generator, device="cuda").to(torch.bfloat16)
    block_table = torch.randint(0, blocks, (batch, 1), generator=generator, device="cuda", dtype=torch.int32)
    seqlens = torch.randint(1, PAGE_BLOCK_SIZE + 1, (batch,), generator=generator, device="cuda", dtype=torch.int32)
    q = torch.randn(batch, 1, h_q, D_QK, generator=generator, device="cuda").to(torch.bfloat16)
    scale = D_QK ** -0.5

    def decode(part):
        run = poisoned if h_q == 16 else (lambda kernel, *args: kernel(*args))
        return run(triton_decode.dense_decode, q[part], cache, block_table[part], seqlens[part], KV_LORA_RANK, scale,
                   False, False, None)
    out, lse = decode(slice(None))
    half = batch // 2
    for part in (slice(0, half), slice(half, None)):
        part_out, part_lse = decode(part)
        assert torch.equal(out[part], part_out) and torch.equal(lse[part], part_lse)
        del part_out, part_lse
    sample = torch.randperm(batch, generator=generator, device="cuda")[:64]
    want_out, want_lse = reference.dense_decode(q[sample], cache, block_table[sample], seqlens[sample], KV_LORA_RANK,
                                                scale, False, False, None)
    assert_decode_close(out[sample], lse[sample], want_out, want_lse)


def test_triton_default_takes_apart_logits_only_with_64_row_warpgroup_products(monkeypatch):
    """64-row tiles of 8 warps mask their logits apart where the products are wgmma (common.warpgroup_products);
    narrower tiles, and GPUs whose products are mma.sync, never."""
    device = torch.device(DEVICE)
    monkeypatch.setattr(triton_decode, "device_limits", lambda device: (132, 227 * 1024))  # Hopper's: 64-token tiles
    for wgmma in (False, True):
        monkeypatch.setattr(triton_decode, "warpgroup_products", lambda device, wgmma=wgmma: wgmma)
        for batch, rows, is_fp8 in ((128, 128, False), (1, 128, True), (128, 16, False), (2, 32, False)):
            config = triton_decode.default_config(batch, rows, device, is_fp8)
            assert config.apart_logits == (wgmma and config.block_h == 64 and config.num_warps == 8), config
            # the latent whole (stop 58): those tiles over a BF16 cache at 64 tokens, and none of their fallbacks
            assert config.whole == (config.apart_logits and config.block_n == 64 and not is_fp8), config
            assert not any(smaller.whole for smaller in triton_decode.fitting_configs(config)[1:])


def test_triton_balanced_schedule_idle_parts_write_no_partial(monkeypatch):
    """Parts past the batch (40 for 3 sequences) are idle: they touch no sequence (one past the batch would read
    its length and table row past their ends), so the partial slots from num_splits[-1] on keep what they held."""
    buffers = []

    def sentinel_partials(out, *splits, half):
        partials = triton_decode.Partials(*(torch.full_like(t, 7.0) for t in empty(out, *splits, half=half)))
        buffers.append(partials)
        return partials

    empty = triton_decode.Partials.empty
    monkeypatch.setattr(triton_decode.Partials, "empty", staticmethod(sentinel_partials))
    config = dataclasses.replace(triton_decode.default_config(3, 16, torch.device(DEVICE)), schedule="balanced")
    lengths = torch.tensor([300, 1, 90], dtype=torch.int32, device=DEVICE)
    metadata, num_splits = reference.get_mla_metadata(lengths, 40)
    run_and_compare(lengths.tolist(), 1, 16, causal=False, is_fp8=False, sink=False, config=config,
                    tile_scheduler_metadata=metadata, num_splits=num_splits)
    assert buffers and all(torch.all(partials.lse[num_splits[-1]:] == 7.0) for partials in buffers)


# (lengths the schedule was made for, lengths of the call, parts): sequences that grew (one the last of its part, one
# split over parts), shrank (pieces past the new end), emptied and filled
OTHER_LENGTHS = [([70, 1, 300], [200, 1, 400], 3), ([300, 1, 90], [30, 200, 500], 4), ([1000, 3, 0], [0, 700, 65], 7)]


@pytest.mark.parametrize("made_for,seqlens,parts", OTHER_LENGTHS)
def test_triton_balanced_schedule_made_for_other_lengths(made_for, seqlens, parts):
    """Metadata made for other lengths of the same batch (reused after a write to cache_seqlens that its version
    counter missed; values are not checked on a GPU): each sequence's last piece runs to the sequence's end, so the
    output is still the reference's, where the blocks past a part's old end_block went unread."""
    config = dataclasses.replace(triton_decode.default_config(len(seqlens), 16, torch.device(DEVICE)),
                                 schedule="balanced")
    metadata, num_splits = reference.get_mla_metadata(torch.tensor(made_for, dtype=torch.int32, device=DEVICE), parts)
    run_and_compare(seqlens, 1, 16, causal=False, is_fp8=False, sink=False, config=config,
                    tile_scheduler_metadata=metadata, num_splits=num_splits)


@pytest.mark.parametrize("name", list(GARBAGE_SCHEDULES))
def test_triton_balanced_schedule_stays_in_bounds_whatever_the_metadata(monkeypatch, name):
    """Metadata that is not get_mla_metadata's pair for the batch (GARBAGE_SCHEDULES: sequences, blocks and slots
    before and past their ends, slot counts of 0 and below, int32's extremes, halves of two calls, random values;
    unchecked on a GPU without FLASHMLA_CHECK): the kernels cut each value to the batch, the sequence's blocks and the
    partial slots, so the output may be wrong but no loop runs past the batch and nothing outside them is read or
    written. The lengths, table, metadata and num_splits sit in pools (num_splits' guard values name slot 8, past the
    7), the partials between slots of NaN: every byte of each pool is kept, and the output (each element written,
    from finite partials) is finite: no NaN slot was read."""
    guard = 8
    partial_pools = []

    def guarded_partials(out, *splits, half):
        assert splits == (len(GARBAGE_SEQLENS) + GARBAGE_PARTS,) and not half
        partials = empty(out, *splits, half=half)
        out_pool, out_partial = in_pool(torch.zeros_like(partials.out), guard, float("nan"))
        lse_pool, lse_partial = in_pool(torch.zeros_like(partials.lse), guard, float("nan"))
        partial_pools.extend([out_pool, lse_pool])
        return triton_decode.Partials(out_partial, lse_partial, lse_partial)

    empty = triton_decode.Partials.empty
    monkeypatch.setattr(triton_decode.Partials, "empty", staticmethod(guarded_partials))
    generator = torch.Generator(DEVICE).manual_seed(43)
    q, cache, block_table, cache_seqlens = make_inputs(GARBAGE_SEQLENS, 1, 16, False, generator)
    pools, inputs = zip(*(in_pool(t, guard, fill) for t, fill in ((block_table, 1), (cache_seqlens, 10 ** 6),
                                                                  *zip(garbage_schedule(name), (-1, 8)))))
    want_pools = [pool.clone() for pool in pools]
    config = dataclasses.replace(triton_decode.default_config(len(GARBAGE_SEQLENS), 16, torch.device(DEVICE)),
                                 schedule="balanced")
    out, lse = triton_decode.dense_decode(q, cache, inputs[0], inputs[1], KV_LORA_RANK, D_QK ** -0.5, False, False,
                                          config=config, tile_scheduler_metadata=inputs[2], num_splits=inputs[3])
    assert all(torch.equal(pool, want) for pool, want in zip(pools, want_pools))
    guards_kept = [bool(torch.isnan(pool[:guard]).all() and torch.isnan(pool[-guard:]).all())
                   for pool in partial_pools]
    assert guards_kept and all(guards_kept), guards_kept
    assert torch.isfinite(out).all() and not torch.isnan(lse).any()


def test_triton_balanced_schedule_computes_its_own_metadata():
    config = dataclasses.replace(triton_decode.default_config(3, 16, torch.device(DEVICE)), schedule="balanced")
    run_and_compare([300, 1, 90], 1, 16, causal=False, is_fp8=False, sink=False, config=config)


def f16_products_ran(monkeypatch):
    """Records the split kernel's launches; the returned check says that there were some and that each took the f16
    products (False: none did)."""
    recording = RecordingKernel(triton_decode._dense_decode_split_kernel)
    monkeypatch.setattr(triton_decode, "_dense_decode_split_kernel", recording)

    def ran():
        assert recording.options, "the split kernel was not launched"
        f16 = {options["F16"] for options in recording.options}
        assert len(f16) == 1, "some launches took the f16 products and some did not"
        return f16.pop()
    return ran


def f16_config(batch, rows, f16=True):
    """The default launch config over an FP8 cache for `batch` sequences of `rows` query rows, with the FP8 products
    in f16 (or not)."""
    return dataclasses.replace(triton_decode.default_config(batch, rows, torch.device(DEVICE), is_fp8=True),
                               fp8_f16=f16)


F16_CASES = [([0, 1, 70, 130], 1, 16, False), ([64, 1, 200], 2, 16, True), ([5, 300], 1, 64, True)]


@pytest.mark.parametrize("seqlens,s_q,h_q,causal", F16_CASES)
@pytest.mark.parametrize("hardware", [FP8_HARDWARE, FP8_TO_F16, FP8_INTEGER])
@pytest.mark.parametrize("f16", [True, False])
def test_triton_fp8_products_match_reference(monkeypatch, seqlens, s_q, h_q, causal, hardware, f16):
    """The FP8 cache's products with f16 operands (`fp8_f16`, the default up to 16 rows) and with bf16 operands, with
    each e4m3 decoding (common.fp8_conversion): the conversion instructions (sm_90), to f16 by them and to bf16 by
    integer ops (sm_89), integer ops."""
    skip_unless_gpu_decodes(hardware)
    monkeypatch.setattr(triton_decode, "hardware_fp8", lambda device: hardware)
    ran = f16_products_ran(monkeypatch)
    run_and_compare(seqlens, s_q, h_q, causal, is_fp8=True, sink=False,
                    config=f16_config(len(seqlens), s_q * h_q, f16))
    assert ran() == f16


def test_triton_fp8_default_takes_f16_products_up_to_16_rows(monkeypatch):
    """The op's own choice (no config given): f16 products at 16 rows, bf16 products at 64."""
    ran = f16_products_ran(monkeypatch)
    run_and_compare([77, 300], 1, 16, causal=False, is_fp8=True, sink=False)
    assert ran()
    ran = f16_products_ran(monkeypatch)
    run_and_compare([77, 300], 1, 64, causal=False, is_fp8=True, sink=False)
    assert not ran()


@pytest.mark.parametrize("schedule", ["uniform", "balanced"])
@pytest.mark.parametrize("hardware", [FP8_HARDWARE, FP8_INTEGER])
@pytest.mark.parametrize("f16", [True, False])
@pytest.mark.parametrize("loading", ["prefetch", "reload"])
def test_triton_fp8_latent_loading_matches_reference(monkeypatch, schedule, hardware, f16, loading):
    """`prefetch` (the default for an FP8 cache up to 16 rows before stop 51): each tile's latent bytes loaded during
    the previous tile's products; `reload`: P V's latent tiles loaded again, by loads of their own. Lengths ending
    mid-tile (a partial tile: 100 and 230 with 32-token tiles), an empty one and a single token, causal s_q 2;
    uniform: several splits per sequence; balanced: parts that span sequences. The prefetch's first tile comes before
    the loop, the next tile's past the end are masked; the reload's tiles are masked as the logits' are."""
    skip_unless_gpu_decodes(hardware)
    monkeypatch.setattr(triton_decode, "hardware_fp8", lambda device: hardware)
    kernel = "_dense_decode_split_kernel" if schedule == "uniform" else "_dense_decode_balanced_kernel"
    recording = RecordingKernel(getattr(triton_decode, kernel))
    monkeypatch.setattr(triton_decode, kernel, recording)
    seqlens = [0, 1, 100, 230]
    config = dataclasses.replace(f16_config(len(seqlens), 32, f16), prefetch=loading == "prefetch",
                                 reload=loading == "reload", schedule=schedule,
                                 programs_per_sm=4 if schedule == "uniform" else 1)
    run_and_compare(seqlens, 2, 16, causal=True, is_fp8=True, sink=False, config=config)
    assert recording.options
    assert all((options["PREFETCH"], options["RELOAD"]) == (loading == "prefetch", loading == "reload")
               for options in recording.options)


def test_triton_fp8_prefetch_16_token_tiles_with_a_register_cap(monkeypatch):
    """The tune's candidate for three programs per SM: 16-token tiles, the prefetch, f16 products, `maxnreg` 168,
    passed to the launch as given. Lengths ending mid-tile and a single token, causal s_q 2, several splits."""
    recording = RecordingKernel(triton_decode._dense_decode_split_kernel)
    monkeypatch.setattr(triton_decode, "_dense_decode_split_kernel", recording)
    seqlens = [1, 45, 230]
    config = dataclasses.replace(f16_config(len(seqlens), 32), block_n=16, prefetch=True, maxnreg=168,
                                 programs_per_sm=3)
    run_and_compare(seqlens, 2, 16, causal=True, is_fp8=True, sink=False, config=config)
    assert recording.options
    assert all(options["maxnreg"] == 168 and options["BLOCK_N"] == 16 and options["PREFETCH"]
               for options in recording.options)


@pytest.mark.parametrize("half", [True, False])
@pytest.mark.parametrize("is_fp8", [False, True])
def test_triton_split_partials_hold_outputs_past_f16(monkeypatch, half, is_fp8):
    """Split partials in f16 rows times a power of two each (decode.Partials; the threshold lowered to 2 splits) or
    float32 (the threshold past every split count here). Sequences whose latents are scaled by 2**40, 1 and 2**-40
    (outputs past f16's 65504 and below its 2**-24; FP8: 2**-12), rows 2**-2 .. 2**2 apart within each block, their
    queries scaled inversely (the logits unchanged), split 2 to 6 ways: each output row within the BF16 band of its
    own norm, and the split runs agree with the unsplit one."""
    generator = torch.Generator(DEVICE).manual_seed(11 + is_fp8)
    seqlens, s_q, h_q = [300, 1, 200], 2, 16
    q, cache, block_table, cache_seqlens = make_inputs(seqlens, s_q, h_q, False, generator)
    # (an FP8 cache's smallest scale is 2**-13, SPEC.md §3: its small sequence goes down to 2**-12 only)
    sequence_factor = torch.tensor([2.0 ** 40, 1.0, 2.0 ** (-12 if is_fp8 else -40)], device=DEVICE)
    block_factor = torch.ones(cache.shape[0], device=DEVICE)
    for b, factor in enumerate(sequence_factor):
        block_factor[block_table[b, :triton_decode.triton.cdiv(seqlens[b], PAGE_BLOCK_SIZE)].long()] = factor
    row_factor = 2.0 ** torch.randint(-2, 3, cache.shape[:2], generator=generator, device=DEVICE)
    latent = cache.float()
    latent[..., :KV_LORA_RANK] *= (block_factor[:, None] * row_factor)[..., None, None]
    cache = latent.bfloat16()
    q = q.float()
    q[..., :KV_LORA_RANK] /= sequence_factor[:, None, None, None]  # the logits stay those of unscaled inputs
    q = q.bfloat16()
    if is_fp8:
        cache = reference.quantize_kv_fp8(cache)
    args = (q, cache, block_table, cache_seqlens, KV_LORA_RANK, D_QK ** -0.5, True, is_fp8, None)
    want_out, want_lse = reference.dense_decode(*args)
    unsplit = dataclasses.replace(triton_decode.default_config(len(seqlens), s_q * h_q, torch.device(DEVICE)),
                                  programs_per_sm=0.01)
    base_out, base_lse = triton_decode.dense_decode(*args, config=unsplit)
    monkeypatch.setattr(triton_decode, "HALF_PARTIALS_FROM_SPLITS", 2 if half else 1 << 20)
    recording = RecordingKernel(triton_decode._dense_decode_split_kernel)
    monkeypatch.setattr(triton_decode, "_dense_decode_split_kernel", recording)
    seen = torch.isfinite(want_lse).transpose(1, 2)  # (batch, s_q, h_q): the rows that see a token
    for programs_per_sm in (2, 4, 10):  # 2, 5 and 6 splits over the interpreter's 4 stand-in SMs; 6 on a GPU
        config = dataclasses.replace(unsplit, programs_per_sm=programs_per_sm)
        out, lse = triton_decode.dense_decode(*args, config=config)
        assert recording.options[-1]["HALF_PARTIALS"] == half and recording.options[-1]["SPLIT"]
        assert_decode_close(out, lse, want_out, want_lse)
        assert_rows_close(out[seen], base_out[seen])
        assert torch.equal(out[~seen], base_out[~seen])  # zeros
        torch.testing.assert_close(lse, base_lse, rtol=1e-5, atol=1e-5)


def test_triton_f16_partials_take_each_rows_scaling_from_all_four_tiles(monkeypatch):
    """f16 split partials of a cache whose last 128-column latent tile is 2**4 times the other three (queries
    divided back: the logits unchanged): a row's power of two comes from its largest value over all four accumulator
    tiles (one from the first three puts the last past f16's 65504: inf)."""
    generator = torch.Generator(DEVICE).manual_seed(29)
    seqlens, s_q, h_q = [300, 200], 1, 16
    q, cache, block_table, cache_seqlens = make_inputs(seqlens, s_q, h_q, False, generator)
    tile_factor = torch.ones(D_QK, device=DEVICE)
    tile_factor[KV_LORA_RANK - 128:KV_LORA_RANK] = 16.0
    cache, q = (cache.float() * tile_factor).bfloat16(), (q.float() / tile_factor).bfloat16()
    monkeypatch.setattr(triton_decode, "HALF_PARTIALS_FROM_SPLITS", 2)
    recording = RecordingKernel(triton_decode._dense_decode_split_kernel)
    monkeypatch.setattr(triton_decode, "_dense_decode_split_kernel", recording)
    config = dataclasses.replace(triton_decode.default_config(len(seqlens), s_q * h_q, torch.device(DEVICE)),
                                 programs_per_sm=2)
    args = (q, cache, block_table, cache_seqlens, KV_LORA_RANK, D_QK ** -0.5, False, False, None)
    out, lse = triton_decode.dense_decode(*args, config=config)
    assert recording.options[-1]["HALF_PARTIALS"] and not recording.options[-1]["WHOLE"]
    assert_decode_close(out, lse, *reference.dense_decode(*args))


@pytest.mark.parametrize("q_exponent", [-60, -30, 20])
def test_triton_fp8_f16_products_hold_ranges_past_f16(monkeypatch, q_exponent):
    """f16 holds 2**-24 .. 65504, bf16 all of float32's exponents. Queries of magnitude 2**q_exponent (2**-60 and
    2**-30 underflow in f16, 2**20 overflows), rows 2**-2 .. 2**2 apart, against a cache whose tokens are scaled by
    2**-10 .. 2**30 within each block: tile scales up to 2**23, so P times the scale alone would pass 65504. The
    softmax scale brings the largest tokens' logits to O(1), so the output and the LSE stay well conditioned."""
    generator = torch.Generator(DEVICE).manual_seed(100 + q_exponent)
    seqlens, s_q, h_q = [300, 70], 2, 16
    q, cache, block_table, cache_seqlens = make_inputs(seqlens, s_q, h_q, False, generator)
    token_factor = 2.0 ** torch.randint(-10, 31, cache.shape[:2], generator=generator, device=DEVICE)
    cache = reference.quantize_kv_fp8((cache.float() * token_factor[..., None, None]).bfloat16())
    row_factor = 2.0 ** torch.randint(-2, 3, q.shape[:3], generator=generator, device=DEVICE)
    q = (q.float() * row_factor[..., None] * 2.0 ** q_exponent).bfloat16()
    scale = D_QK ** -0.5 * 2.0 ** -(q_exponent + 30)
    ran = f16_products_ran(monkeypatch)
    out, lse = triton_decode.dense_decode(q, cache, block_table, cache_seqlens, KV_LORA_RANK, scale, True, True, None,
                                          f16_config(len(seqlens), s_q * h_q))
    want_out, want_lse = reference.dense_decode(q, cache, block_table, cache_seqlens, KV_LORA_RANK, scale, True,
                                                True, None)
    assert_decode_close(out, lse, want_out, want_lse)
    assert ran()


@pytest.mark.parametrize("top", [100, 114, 127])
@pytest.mark.parametrize("hardware", [FP8_HARDWARE, FP8_TO_F16, FP8_INTEGER])
def test_triton_fp8_f16_products_hold_tile_scales_to_the_top_of_float32(monkeypatch, top, hardware):
    """Tokens of latent values near 2**top (tile scales near 2**(top - 8)), one a page, among tokens of 2**-10 ..
    2**(top - 20); at 127 the largest are near 2**124 but one value is 3.1e38 (bf16's largest is 3.39e38: a tile
    scale of 2**120). Queries of 2**-(top - 2): logits of O(1), with each e4m3 decoding. With q's rows scaled into
    f16's range a tile's product times its scale passed float32's range from tile scales of 2**105 on, before q's
    inverse brought it back (NaN at 114 and 127 before stop 46); with the integer decoding's 2**8 in the scales, at
    2**120."""
    skip_unless_gpu_decodes(hardware)
    monkeypatch.setattr(triton_decode, "hardware_fp8", lambda device: hardware)
    generator = torch.Generator(DEVICE).manual_seed(top)
    seqlens, s_q, h_q = [300, 70], 2, 16
    q, cache, block_table, cache_seqlens = make_inputs(seqlens, s_q, h_q, False, generator)
    token_factor = 2.0 ** torch.randint(-10, top - 19, cache.shape[:2], generator=generator, device=DEVICE)
    token_factor[:, 5] = 2.0 ** (min(top, 124) - 3)  # one token a page near the top (few: the sums stay finite)
    cache = cache.float() * token_factor[..., None, None]
    if top == 127:
        cache[block_table[1, 0], 5, 0, 7] = 3.1e38
    cache = reference.quantize_kv_fp8(cache.bfloat16())
    q = (q.float() * 2.0 ** -(top - 2)).bfloat16()
    scale = D_QK ** -0.5 / 16
    ran = f16_products_ran(monkeypatch)
    out, lse = triton_decode.dense_decode(q, cache, block_table, cache_seqlens, KV_LORA_RANK, scale, True, True, None,
                                          f16_config(len(seqlens), s_q * h_q))
    want_out, want_lse = reference.dense_decode(q, cache, block_table, cache_seqlens, KV_LORA_RANK, scale, True, True,
                                                None)
    assert want_out.isfinite().all() and want_lse.isfinite().all()
    assert_decode_close(out, lse, want_out, want_lse)
    assert ran()


def far_smaller_weights(monkeypatch, delta, hardware, length=3 * PAGE_BLOCK_SIZE):
    """The f16-products kernel over a first page of zero latent whose RoPE logits lie `delta` nats above the other
    pages' (so their weights are e**-delta): the rows' output is carried by those weights alone. Returns the kernel's
    out and lse, the reference's, and whether the f16 products ran."""
    skip_unless_gpu_decodes(hardware)
    monkeypatch.setattr(triton_decode, "hardware_fp8", lambda device: hardware)
    generator = torch.Generator(DEVICE).manual_seed(int(delta))
    kv = torch.randn(3, PAGE_BLOCK_SIZE, 1, D_QK, generator=generator, device=DEVICE)
    kv[0, :, :, :KV_LORA_RANK] = 0
    kv[:, :, :, KV_LORA_RANK:] = 0
    kv[0, :, :, KV_LORA_RANK] = delta
    cache = reference.quantize_kv_fp8(kv.bfloat16())
    block_table = torch.tensor([[0, 1, 2]], dtype=torch.int32, device=DEVICE)
    cache_seqlens = torch.tensor([length], dtype=torch.int32, device=DEVICE)
    q = torch.zeros(1, 1, 16, D_QK, device=DEVICE)
    q[..., KV_LORA_RANK] = 1.0
    q = q.bfloat16()
    config = dataclasses.replace(f16_config(1, 16), programs_per_sm=0.01)  # one split: the pages in one program
    ran = f16_products_ran(monkeypatch)
    got = triton_decode.dense_decode(q, cache, block_table, cache_seqlens, KV_LORA_RANK, 1.0, False, True, None,
                                     config)
    want = reference.dense_decode(q, cache, block_table, cache_seqlens, KV_LORA_RANK, 1.0, False, True, None)
    return got, want, ran()


@pytest.mark.parametrize("delta", [58.0, 64.0])
@pytest.mark.parametrize("hardware", [FP8_HARDWARE, FP8_INTEGER])
def test_triton_fp8_f16_products_keep_rows_carried_by_far_smaller_weights(monkeypatch, delta, hardware):
    """Weights of e**-delta, ~1e-25 .. 1e-28: rows whose largest p * scale in a block was below 1e-30 * 2**14 were
    flushed to zero (all of them at 64; at 58 with the integer decoding, once its 2**8 left the scales); now only
    below float32's smallest normal."""
    (out, lse), (want_out, want_lse), ran = far_smaller_weights(monkeypatch, delta, hardware)
    assert want_out.abs().max() > 0
    assert_decode_close(out, lse, want_out, want_lse)
    assert ran


@pytest.mark.parametrize("delta", [80.0, 88.0])
@pytest.mark.parametrize("hardware", [FP8_HARDWARE, FP8_INTEGER])
def test_triton_fp8_f16_products_flush_weights_below_float32_normals(monkeypatch, delta, hardware):
    """Weights of e**-80 and e**-88: a block's largest p * scale over 2**14 is below float32's smallest normal, so
    the block's rows flush to zero (outputs ~1e-35 and ~1e-39 in the reference), never inf or NaN: 1 / top of a
    subnormal top is inf, and the masked tokens' p of 0 times it NaN (the length ends mid-page)."""
    (out, lse), (want_out, want_lse), ran = far_smaller_weights(monkeypatch, delta, hardware, 3 * PAGE_BLOCK_SIZE - 5)
    assert out.isfinite().all() and torch.allclose(lse, want_lse, atol=1e-3, rtol=0)
    assert 0 < want_out.abs().max() < 1e-30 and (out.float() - want_out.float()).abs().max() < 1e-30
    assert ran


@pytest.mark.parametrize("f16", [True, False])
def test_triton_fp8_keeps_small_weights_next_to_huge_scales(monkeypatch, f16):
    """decode_inputs.huge_and_small_scale_inputs: rows carried by tokens 2**37 below the block's largest scale.
    Normalised by the block's largest scale, their f16 weights would keep one or two bits (20-30% error per row); by
    each row's largest weight they stay normal. The bf16 products hold it too."""
    q, cache, block_table, cache_seqlens, scale = huge_and_small_scale_inputs(torch.Generator(DEVICE).manual_seed(7))
    ran = f16_products_ran(monkeypatch)
    out, lse = triton_decode.dense_decode(q, cache, block_table, cache_seqlens, KV_LORA_RANK, scale, False, True,
                                          None, f16_config(q.shape[0], q.shape[1] * q.shape[2], f16))
    want_out, want_lse = reference.dense_decode(q, cache, block_table, cache_seqlens, KV_LORA_RANK, scale, False,
                                                True, None)
    assert_decode_close(out, lse, want_out, want_lse)
    assert ran() == f16
