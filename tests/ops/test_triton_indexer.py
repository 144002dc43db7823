"""The Triton indexer kernels against the references: on the CPU under Triton's interpreter, and on a GPU; and the ops
dispatching to them.

Logits: bf16 and FP8 q/k (per-token / per-head scales), odd lengths and head counts, empty and full key ranges (-inf
exactly where the reference has it); paged: bf16 and FP8 index caches, causal s_q > 1, lengths 0 and non-multiples of
the page. The decode chain, paged logits then top-k through the ops, replays in a CUDA graph (the top-k kernel's own
tests are test_cuda_indexer_topk.py's).
"""
import pytest
import torch

import mla_oracle as oracle
from flashmla_ops import indexer
from flashmla_ops.indexer import indexer_logits_paged_reference, indexer_logits_reference, indexer_topk_reference
from flashmla_ops.kv_cache import PAGE_BLOCK_SIZE, quantize_fp8_rows, quantize_index_fp8_reference
from triton_recording import RecordingKernel

triton_indexer = pytest.importorskip("flashmla_ops.triton.indexer", exc_type=ImportError)
from flashmla_ops.triton import common as triton_common  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = torch.float8_e4m3fn
RELATIVE = 2e-5  # float32 accumulation order (the bf16 / e4m3 products themselves are exact)
# The opt-in e4m3 MMAs (LogitsConfig.fp8_mma) on a GPU: Hopper keeps about 14 bits inside an e4m3 MMA. The H100 showed
# errors of 2 to 4e-5 of the largest logit with all 128 of d_i summed inside the MMA (2026-11); with the partial sums
# added into float32 every 32, the H200 showed 5.1 and 5.2e-5 on the bench's paged and prefill rows (stop 21,
# docs/bench/stop21_call1.log). The interpreter computes these exactly and keeps RELATIVE.
FP8_MMA_RELATIVE = 1e-4


def band(config, fp8):
    """The relative error allowed for `config` on FP8 q and keys (both), on this test's device."""
    return FP8_MMA_RELATIVE if config is not None and config.fp8_mma and fp8 and DEVICE == "cuda" else RELATIVE


def assert_logits_close(got, want, relative=RELATIVE):
    assert got.dtype == torch.float32
    finite = oracle.finite_logits(got, want)
    scale = want[finite].abs().max().clamp_min(1e-6) if finite.any() else 1.0
    assert ((got[finite] - want[finite]).abs() <= relative * scale + 1e-6).all()


def prefill_inputs(s_q, s_kv, h_i, d_i, q_fp8, k_fp8, generator):
    q = torch.randn(s_q, h_i, d_i, generator=generator).to(DEVICE)
    k = torch.randn(s_kv, d_i, generator=generator).to(DEVICE)
    weights = torch.randn(s_q, h_i, generator=generator).to(DEVICE)
    q_scale = k_scale = None
    if q_fp8:
        q, q_scale = quantize_fp8_rows(q)
    else:
        q = q.to(torch.bfloat16)
    if k_fp8:
        k, k_scale = quantize_fp8_rows(k)
    else:
        k = k.to(torch.bfloat16)
    # a packed causal batch of two sequences, plus an empty range and a full one
    split = s_kv // 3
    positions = torch.arange(s_q)
    k_start = torch.where(positions < s_q // 2, 0, split)
    k_end = torch.where(positions < s_q // 2, (positions + 1).clamp_max(split), (split + positions + 1).clamp_max(s_kv))
    k_start[1], k_end[1] = 4, 4
    k_start[-1], k_end[-1] = 0, s_kv
    return q, k, weights, k_start.int().to(DEVICE), k_end.int().to(DEVICE), q_scale, k_scale


# The default tiles, one query by 128 keys with 2 stages, 4 queries by 128 keys with 8 warps (several queries per
# program: a padded last one), and the opt-in e4m3 MMAs (FP8 q and keys, d_i % 32 == 0)
CONFIGS = [None, triton_indexer.LogitsConfig(block_q=1, block_n=128, num_stages=2),
           triton_indexer.LogitsConfig(block_q=4, block_n=128, num_warps=8),
           triton_indexer.LogitsConfig(fp8_mma=True)]
CONFIG_IDS = ["default", "1x128", "4x128-8-warps", "fp8-mma"]


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("s_q,s_kv,h_i,d_i", [(7, 150, 3, 32), (19, 67, 8, 16), (5, 200, 64, 32)])
@pytest.mark.parametrize("q_fp8,k_fp8", [(False, False), (True, True), (True, False), (False, True)])
def test_triton_indexer_logits_matches_reference(s_q, s_kv, h_i, d_i, q_fp8, k_fp8, config):
    generator = torch.Generator().manual_seed(s_q * 100 + h_i + 2 * q_fp8 + k_fp8)
    inputs = prefill_inputs(s_q, s_kv, h_i, d_i, q_fp8, k_fp8, generator)
    assert_logits_close(triton_indexer.indexer_logits(*inputs, config=config), indexer_logits_reference(*inputs),
                        band(config, q_fp8 and k_fp8))


@pytest.mark.parametrize("fp8", [False, True])
def test_triton_indexer_tiles_before_between_and_after_the_seen_keys(fp8):
    """Key ranges in the middle of 1000 keys, cut into splits of four 32-key tiles (on the CPU, 8 splits): splits that
    no query sees, and splits with tiles no query sees before and after the tiles some query sees (the kernel stores
    those -inf in loops of their own, without loads); an empty range and a one-key range among them. The output
    starts as NaN, so every logit must be written."""
    generator = torch.Generator().manual_seed(34)
    s_q, s_kv, h_i, d_i = 5, 1000, 8, 32
    q, k, weights, _, _, q_scale, k_scale = prefill_inputs(s_q, s_kv, h_i, d_i, fp8, fp8, generator)
    k_start = torch.tensor([300, 310, 305, 330, 301], dtype=torch.int32, device=DEVICE)
    k_end = torch.tensor([420, 400, 305, 331, 419], dtype=torch.int32, device=DEVICE)
    out = torch.full((1, s_q, s_kv), float("nan"), device=DEVICE)
    config = triton_indexer.LogitsConfig(block_q=8, block_n=32)
    triton_indexer._launch_logits(q[None], k[None], weights[None], None if q_scale is None else q_scale[None],
                                  k_scale, k_start, k_end, None, None, out, paged=False, config=config)
    want = indexer_logits_reference(q, k, weights, k_start, k_end, q_scale, k_scale)
    assert not out.isnan().any()
    assert_logits_close(out[0], want)


def test_triton_indexer_leaves_queries_without_heads_to_the_reference():
    """h_i 0 (the ops' checks let it through; the reference gives logits 0 in range): the kernel's launch divided by
    its padded head count, 0 (ZeroDivisionError)."""
    q = torch.zeros(3, 0, 16, dtype=torch.bfloat16, device=DEVICE)
    assert not triton_indexer.supports(q, torch.zeros(5, 16, dtype=torch.bfloat16, device=DEVICE))
    assert not triton_indexer.supports(q[None], torch.zeros(2, 64, 16, dtype=torch.bfloat16, device=DEVICE))


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_triton_indexer_logits_negative_and_zero_scales(config):
    """relu(s x) is computed as |s| relu(sign(s) x) (the signs to q and the prefill keys, the magnitudes to the
    weights and after the sum over heads): FP8 scales of either sign, and zeros, in prefill and in a paged cache."""
    generator = torch.Generator().manual_seed(31)
    q, k, weights, k_start, k_end, q_scale, k_scale = prefill_inputs(9, 140, 8, 32, True, True, generator)
    flip = lambda scale: scale * torch.randint(-1, 2, scale.shape, generator=generator).to(DEVICE)  # noqa: E731
    q_scale, k_scale = flip(q_scale), flip(k_scale)
    assert (q_scale < 0).any() and (q_scale == 0).any() and (k_scale < 0).any() and (k_scale == 0).any()
    inputs = (q, k, weights, k_start, k_end, q_scale, k_scale)
    assert_logits_close(triton_indexer.indexer_logits(*inputs, config=config), indexer_logits_reference(*inputs),
                        band(config, True))
    q, cache, weights, block_table, seqlens, q_scale = paged_inputs([70, 130, 5], 2, 8, 32, True, True, generator)
    scales = cache[..., -4:].view(torch.float32)
    scales.copy_(flip(scales))  # the cache rows' own scales, in place
    q_scale = flip(q_scale)
    paged = (q, cache, weights, block_table, seqlens, q_scale)
    assert_logits_close(triton_indexer.indexer_logits_paged(*paged, config=config),
                        indexer_logits_paged_reference(*paged), band(config, True))


def with_nans(fp8, nan_codes, generator, h_i=8, d_i=32):
    """Prefill and paged inputs with NaNs that torch.relu keeps (the references' logits they reach are NaN): bf16 q/k
    and cache get a NaN value in a query head's row and in a key; FP8 ones a NaN query head's scale and key scale (a
    paged cache row's scale multiplies its scores inside the relu), and with `nan_codes` e4m3 NaN codes too (0x7f,
    0xff) in q and the keys (a GPU's conversions: the interpreter's e4m3 -> f16 / bf16 reads 0x7f as 480)."""
    # query 2 sees keys [0, 3), query 4 keys [46, 51); key 50 queries 4 to 8, key 60 the last query
    q, k, weights, k_start, k_end, q_scale, k_scale = prefill_inputs(9, 140, h_i, d_i, fp8, fp8, generator)
    if fp8:
        q_scale[2, 3], k_scale[50] = float("nan"), float("nan")
        if nan_codes:
            q.view(torch.uint8)[4, 1, 9], k.view(torch.uint8)[60, 3] = 0x7F, 0xFF
    else:
        q[2, 3, 5], k[50, 7] = float("nan"), float("nan")
    prefill = (q, k, weights, k_start, k_end, q_scale, k_scale)
    q, cache, weights, block_table, seqlens, q_scale = paged_inputs([70, 130, 5], 2, h_i, d_i, fp8, fp8, generator)
    seen, other = int(block_table[1, 1]), int(block_table[0, 0])  # tokens 64 to 127 of sequence 1, 0 to 63 of 0
    if fp8:
        cache[seen, 10, -4:].view(torch.float32).fill_(float("nan"))
        q_scale[2, 1, 4] = float("nan")
        if nan_codes:
            cache[other, 3, 7], q.view(torch.uint8)[0, 0, 2, 3] = 0x7F, 0x7F
    else:
        cache[seen, 10, 5], q[2, 1, 4, 6] = float("nan"), float("nan")
    return prefill, (q, cache, weights, block_table, seqlens, q_scale)


def assert_nans_kept(prefill, paged, config=None, fp8=False):
    """The kernels' logits NaN exactly where the references' are (oracle.finite_logits), the others close."""
    want = indexer_logits_reference(*prefill), indexer_logits_paged_reference(*paged)
    assert all(x.isnan().any() and not x.isnan().all() for x in want)
    assert_logits_close(triton_indexer.indexer_logits(*prefill, config=config), want[0], band(config, fp8))
    assert_logits_close(triton_indexer.indexer_logits_paged(*paged, config=config), want[1], band(config, fp8))


@pytest.mark.parametrize("fp8", [False, True])
def test_triton_indexer_logits_keep_nan(fp8):
    """relu(NaN) is NaN, as torch.relu (the references) has it: tl.maximum's default gives the other operand (max.f32
    on a GPU, np.fmax in the interpreter), so the kernel took relu(NaN) as 0. Here NaNs in bf16 values and in FP8
    scales (a paged cache row's: inside the relu)."""
    prefill, paged = with_nans(fp8, False, torch.Generator().manual_seed(53 + fp8))
    assert_nans_kept(prefill, paged, fp8=fp8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("fp8", [False, True])
def test_triton_indexer_gpu_logits_keep_nan(fp8, config):
    """test_triton_indexer_logits_keep_nan's inputs at V3.2's h_i 64 and d_i 128, and e4m3 NaN codes, in each config
    (the e4m3 MMAs too), compiled: relu is max.NaN.f32."""
    if fp8 and not triton_indexer.hardware_fp8(torch.device(DEVICE)):
        pytest.skip("e4m3 NaN codes: the integer decode (before sm_89) reads them as 480")
    prefill, paged = with_nans(fp8, True, torch.Generator().manual_seed(59 + fp8), h_i=64, d_i=128)
    assert_nans_kept(prefill, paged, config, fp8)


@pytest.mark.parametrize("q_fp8,k_fp8,d_i,hardware,takes", [(True, True, 32, True, True), (True, True, 16, True, False),
                                                            (True, False, 32, True, False),
                                                            (True, True, 32, False, False)])
def test_triton_indexer_fp8_mma_taken_only_where_it_applies(monkeypatch, q_fp8, k_fp8, d_i, hardware, takes):
    """The opt-in e4m3 MMAs run for FP8 q and keys with d_i a multiple of 32 on GPUs that convert e4m3, else the
    default's exact MMAs; both match the reference (exactly so in the interpreter)."""
    if hardware and DEVICE == "cuda" and not triton_indexer.hardware_fp8(torch.device(DEVICE)):
        pytest.skip("the kernels do not convert e4m3 on this GPU (before sm_89, AMD GPUs)")
    monkeypatch.setattr(triton_indexer, "hardware_fp8", lambda device: hardware)
    recording = RecordingKernel(triton_indexer._indexer_logits_kernel)
    monkeypatch.setattr(triton_indexer, "_indexer_logits_kernel", recording)
    generator = torch.Generator().manual_seed(37)
    inputs = prefill_inputs(6, 90, 4, d_i, q_fp8, k_fp8, generator)
    config = triton_indexer.LogitsConfig(fp8_mma=True)
    assert_logits_close(triton_indexer.indexer_logits(*inputs, config=config), indexer_logits_reference(*inputs),
                        band(config, takes))
    assert [options["FP8_MMA"] for options in recording.options] == [takes]


def paged_inputs(seqlens, s_q, h_i, d_i, q_fp8, fp8_cache, generator):
    batch = len(seqlens)
    blocks_per_seq = max(1, -(-max(seqlens) // PAGE_BLOCK_SIZE)) + 1
    num_blocks = batch * blocks_per_seq + 2
    keys = torch.randn(num_blocks, PAGE_BLOCK_SIZE, d_i, generator=generator)
    cache = quantize_index_fp8_reference(keys) if fp8_cache else keys.to(torch.bfloat16)
    block_table = torch.randperm(num_blocks, generator=generator)[:batch * blocks_per_seq].view(batch, -1).int()
    q = torch.randn(batch, s_q, h_i, d_i, generator=generator)
    q, q_scale = quantize_fp8_rows(q) if q_fp8 else (q.to(torch.bfloat16), None)
    weights = torch.randn(batch, s_q, h_i, generator=generator)
    seqlens = torch.tensor(seqlens, dtype=torch.int32)
    return [x.to(DEVICE) if x is not None else None for x in (q, cache, weights, block_table, seqlens, q_scale)]


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("seqlens,s_q,h_i", [([0, 1, 70, 130], 1, 4), ([64, 5, 129], 3, 7)])
@pytest.mark.parametrize("q_fp8,fp8_cache", [(False, False), (True, True), (False, True)])
def test_triton_indexer_logits_paged_matches_reference(seqlens, s_q, h_i, q_fp8, fp8_cache, config):
    generator = torch.Generator().manual_seed(len(seqlens) + s_q + 2 * q_fp8 + fp8_cache)
    inputs = paged_inputs(seqlens, s_q, h_i, 32, q_fp8, fp8_cache, generator)
    assert_logits_close(triton_indexer.indexer_logits_paged(*inputs, config=config),
                        indexer_logits_paged_reference(*inputs), band(config, q_fp8 and fp8_cache))


def test_triton_indexer_wide_batches_take_the_batch_in_the_grids_first_dimension(monkeypatch):
    """As the dense decode's: more sequences than a grid's second dimension holds (MAX_GRID_Y, 65535 on CUDA; 2 here)
    launch (query tiles x sequences, splits) (WIDE_BATCH), each sequence's logits in place; at most MAX_GRID_Y keep
    (query tiles, sequences, splits)."""
    monkeypatch.setattr(triton_common, "MAX_GRID_Y", 2)
    recording = RecordingKernel(triton_indexer._indexer_logits_kernel)
    monkeypatch.setattr(triton_indexer, "_indexer_logits_kernel", recording)
    generator = torch.Generator().manual_seed(43)
    config = triton_indexer.LogitsConfig(block_q=2, block_n=64)  # three tiles of 2 queries a sequence
    for seqlens in ([70, 130], [70, 1, 0, 130, 64]):
        inputs = paged_inputs(seqlens, 5, 16, 32, False, True, generator)
        assert_logits_close(triton_indexer.indexer_logits_paged(*inputs, config=config),
                            indexer_logits_paged_reference(*inputs))
    (*narrow, _), (*wide, _) = recording.grids
    assert narrow == [3, 2] and wide == [3 * 5], recording.grids
    assert [options["WIDE_BATCH"] for options in recording.options] == [False, True]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_indexer_wide_batch_matches_its_halves():
    """MAX_GRID_Y + 2 sequences in one launch (WIDE_BATCH) give, bit for bit, what the two halves give each in a
    launch of its own, and match the reference on a sample of the sequences."""
    generator = torch.Generator("cuda").manual_seed(65537)
    batch, blocks = triton_common.MAX_GRID_Y + 2, 64
    cache = torch.randn(blocks, PAGE_BLOCK_SIZE, 128, generator=generator, device="cuda").to(torch.bfloat16)
    block_table = torch.randint(0, blocks, (batch, 1), generator=generator, device="cuda", dtype=torch.int32)
    seqlens = torch.randint(1, PAGE_BLOCK_SIZE + 1, (batch,), generator=generator, device="cuda", dtype=torch.int32)
    q = torch.randn(batch, 1, 64, 128, generator=generator, device="cuda").to(torch.bfloat16)
    weights = torch.randn(batch, 1, 64, generator=generator, device="cuda")

    def logits(part):
        return triton_indexer.indexer_logits_paged(q[part], cache, weights[part], block_table[part], seqlens[part])
    everything, half = logits(slice(None)), batch // 2
    for part in (slice(0, half), slice(half, None)):
        assert torch.equal(everything[part], logits(part))
    sample = torch.randperm(batch, generator=generator, device="cuda")[:64]
    assert_logits_close(everything[sample], indexer_logits_paged_reference(q[sample], cache, weights[sample],
                                                                          block_table[sample], seqlens[sample]))


@pytest.mark.parametrize("fp8_cache", [False, True])
def test_triton_indexer_logits_paged_never_reads_past_the_cache(fp8_cache):
    """Table entries outside the cache (unchecked on a GPU without FLASHMLA_CHECK): the kernel reads page 0 for them,
    not the pool's next block or the memory before the cache."""
    generator = torch.Generator().manual_seed(41 + fp8_cache)
    q, pool, weights, _, _, q_scale = paged_inputs([200], 1, 4, 32, False, fp8_cache, generator)
    if not fp8_cache:
        pool[-1] *= 100
    cache = pool[:-1]
    block_table = torch.tensor([[2, cache.shape[0], -1, 1]], dtype=torch.int32, device=DEVICE)
    valid_table = torch.tensor([[2, 0, 0, 1]], dtype=torch.int32, device=DEVICE)
    seqlens = torch.tensor([200], dtype=torch.int32, device=DEVICE)
    got = triton_indexer.indexer_logits_paged(q, cache, weights, block_table, seqlens, q_scale)
    assert_logits_close(got, indexer_logits_paged_reference(q, cache, weights, valid_table, seqlens, q_scale),
                        band(None, False))


@pytest.mark.parametrize("fp8", [False, True])
def test_triton_indexer_strided_q_and_padded_index_cache(fp8):
    """q every other head of a wider tensor (prefill and paged), and the index cache a slice of a padded buffer
    (block stride past 64 rows): the kernel follows the strides (it read q's heads and the cache's blocks as packed)."""
    generator = torch.Generator().manual_seed(47 + fp8)
    q, k, weights, k_start, k_end, q_scale, k_scale = prefill_inputs(6, 90, 8, 32, fp8, fp8, generator)
    wide = torch.zeros(6, 16, 32, dtype=q.dtype, device=DEVICE)
    wide.view(torch.uint8)[:, ::2] = q.view(torch.uint8)
    inputs = (wide[:, ::2], k, weights, k_start, k_end, q_scale, k_scale)
    assert not inputs[0].is_contiguous()
    assert_logits_close(triton_indexer.indexer_logits(*inputs), indexer_logits_reference(q, *inputs[1:]))
    q, cache, weights, block_table, seqlens, q_scale = paged_inputs([70, 130], 2, 8, 32, fp8, fp8, generator)
    padded = torch.zeros(cache.shape[0], cache[0].numel() + 64, dtype=cache.dtype, device=DEVICE)
    padded[:, :cache[0].numel()] = cache.flatten(1)
    padded_cache = padded[:, :cache[0].numel()].view(cache.shape)
    wide = torch.zeros(*q.shape[:2], 16, 32, dtype=q.dtype, device=DEVICE)
    wide.view(torch.uint8)[:, :, ::2] = q.view(torch.uint8)
    paged = (wide[:, :, ::2], padded_cache, weights, block_table, seqlens, q_scale)
    assert_logits_close(triton_indexer.indexer_logits_paged(*paged),
                        indexer_logits_paged_reference(q, cache, weights, block_table, seqlens, q_scale))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("fp8", [False, True])
def test_triton_indexer_gpu_large_poisoned_and_bit_identical(fp8, config):
    generator = torch.Generator().manual_seed(21)
    inputs = prefill_inputs(1000, 4099, 64, 128, fp8, fp8, generator)
    torch.full((8 << 20,), float("nan"), device=DEVICE)  # poison the allocator's next blocks
    logits = triton_indexer.indexer_logits(*inputs, config=config)
    assert_logits_close(logits, indexer_logits_reference(*inputs), band(config, fp8))
    assert torch.equal(logits, triton_indexer.indexer_logits(*inputs, config=config))
    paged = paged_inputs([1, 8191, 64, 3000], 2, 64, 128, fp8, fp8, generator)
    torch.full((8 << 20,), float("nan"), device=DEVICE)
    paged_logits = triton_indexer.indexer_logits_paged(*paged, config=config)
    assert_logits_close(paged_logits, indexer_logits_paged_reference(*paged), band(config, fp8))
    assert torch.equal(paged_logits, triton_indexer.indexer_logits_paged(*paged, config=config))


def test_triton_indexer_fp8_integer_decode_path(monkeypatch):
    """GPUs without FP8 conversion instructions (before sm_89) widen e4m3 with integer ops to bf16 MMAs."""
    monkeypatch.setattr(triton_indexer, "hardware_fp8", lambda device: False)
    generator = torch.Generator().manual_seed(13)
    inputs = prefill_inputs(7, 150, 3, 32, True, True, generator)
    assert_logits_close(triton_indexer.indexer_logits(*inputs), indexer_logits_reference(*inputs))
    paged = paged_inputs([64, 5, 129], 3, 7, 32, True, True, generator)
    assert_logits_close(triton_indexer.indexer_logits_paged(*paged), indexer_logits_paged_reference(*paged))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fp8", [False, True])
def test_indexer_ops_use_triton_and_capture_in_cuda_graph(fp8, monkeypatch):
    """The decode chain paged logits -> top-k through the ops (the logits on the Triton kernel) replays in a CUDA graph
    with new sequence lengths; the prefill logits op runs its Triton kernel too (forced: on Hopper FP8 prefill logits
    take the CUDA kernel, tests/ops/test_cuda_indexer_logits.py)."""
    import flashmla_ops

    monkeypatch.setenv("FLASHMLA_BACKEND", "triton")
    for op in ("indexer_logits", "indexer_logits_paged"):
        assert flashmla_ops.backend(op, DEVICE) == "triton"
    generator = torch.Generator().manual_seed(17 + fp8)
    q, cache, weights, block_table, seqlens, q_scale = paged_inputs([300, 1, 2000, 64], 2, 64, 128, fp8, fp8,
                                                                    generator)
    assert indexer.indexer_logits_paged_path(q, cache, block_table) == "triton"  # not the reference (it replays too)

    def call():
        logits = torch.ops.flashmla.indexer_logits_paged(q, cache, weights, block_table, seqlens, q_scale)
        return logits, torch.ops.flashmla.indexer_topk(logits, 256, block_table)

    call()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits, selected = call()
    seqlens.copy_(torch.tensor([1000, 70, 2, 2001], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    want = indexer_logits_paged_reference(q, cache, weights, block_table, seqlens, q_scale)
    assert_logits_close(logits, want)
    want, table, selected = want.cpu(), block_table.cpu().long(), selected.cpu()
    reference = indexer_topk_reference(want, 256, table)
    assert torch.equal((selected == -1).sum(-1), (reference == -1).sum(-1))
    positions = torch.arange(want.shape[-1])
    slots = table[:, positions // PAGE_BLOCK_SIZE] * PAGE_BLOCK_SIZE + positions % PAGE_BLOCK_SIZE
    for b, t in ((b, t) for b in range(want.shape[0]) for t in range(want.shape[1])):
        logit_of_slot = dict(zip(slots[b].tolist(), want[b, t].tolist()))  # the same multiset as the reference's
        assert (sorted(logit_of_slot[x] for x in selected[b, t].tolist() if x >= 0)
                == sorted(logit_of_slot[x] for x in reference[b, t].tolist() if x >= 0))
    prefill = prefill_inputs(300, 700, 64, 128, fp8, fp8, generator)
    assert_logits_close(torch.ops.flashmla.indexer_logits(*prefill), indexer_logits_reference(*prefill))
