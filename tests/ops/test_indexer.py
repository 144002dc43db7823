"""The DSA lightning indexer ops (indexer_logits, indexer_logits_paged, indexer_topk) against naive oracles."""
import math

import pytest
import torch

import mla_oracle as oracle
from flashmla_ops import indexer
from flashmla_ops.indexer import indexer_logits_path

ops = torch.ops.flashmla
FP8 = torch.float8_e4m3fn


def fp8_with_scales(x: torch.Tensor):
    """x float `(..., d)` -> (float8_e4m3fn values, float32 per-row power-of-two scales, exact float64 value)."""
    scale = oracle.pow2_scale(x.double().abs().amax(-1))
    codes = oracle.e4m3_encode(x.double() / scale[..., None])
    return codes.view(FP8), scale.float(), oracle.e4m3_decode(codes) * scale[..., None]


def assert_logits_close(logits, ref):
    logits = logits.detach().cpu().double()
    assert logits.shape == ref.shape
    assert torch.equal(torch.isneginf(logits), torch.isneginf(ref)), "-inf exactly outside each query's visible keys"
    assert torch.equal(torch.isnan(logits), torch.isnan(ref)), "NaN exactly where the oracle has it"
    finite = torch.isfinite(ref)
    assert torch.isfinite(logits[finite]).all()
    if finite.any():
        magnitude = ref[finite].abs().max() + 1
        assert (logits[finite] - ref[finite]).abs().max() < 1e-5 * magnitude


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("s_q,s_kv,h_i,d_i", [(7, 50, 4, 32), (1, 1, 1, 16), (20, 130, 64, 128)])
def test_indexer_logits(device, fp8, s_q, s_kv, h_i, d_i):
    q, k = torch.randn(s_q, h_i, d_i) * 2, torch.randn(s_kv, d_i)
    weights = torch.randn(s_q, h_i)
    # Ragged per-query ranges, including empty ones and the full range.
    k_start = torch.randint(0, s_kv + 1, (s_q,), dtype=torch.int32)
    k_end = (k_start + torch.randint(0, s_kv + 1, (s_q,), dtype=torch.int32)).clamp(max=s_kv).int()
    k_start[0], k_end[0] = 0, s_kv
    if s_q > 1:
        k_end[1] = k_start[1]
    if fp8:
        q_arg, q_scale, q_exact = fp8_with_scales(q)
        k_arg, k_scale, k_exact = fp8_with_scales(k)
    else:
        q_arg, k_arg = q.bfloat16(), k.bfloat16()
        q_scale = k_scale = None
        q_exact, k_exact = q_arg.double(), k_arg.double()
    to = (lambda t: None if t is None else t.to(device))
    logits = ops.indexer_logits(to(q_arg), to(k_arg), to(weights), to(k_start), to(k_end), to(q_scale), to(k_scale))
    assert logits.dtype == torch.float32
    want = oracle.indexer_logits(q_exact, k_exact, weights, k_start, k_end)
    if indexer_logits_path(to(q_arg), to(k_arg)) == "cuda":  # e4m3 wgmmas on Hopper (the op's docstring)
        absolute = oracle.indexer_logits(q_exact.abs(), k_exact.abs(), weights.abs(), k_start, k_end)
        oracle.assert_within_absolute_band(logits, want, absolute, oracle.E4M3_MMA_BAND)
    else:
        assert_logits_close(logits, want)


def test_indexer_logits_varlen_causal(device):
    """The packed-prefill use: query t of a sequence starting at row s sees [s, t + 1)."""
    seq_lens, h_i, d_i = [5, 64, 3], 8, 64
    starts = torch.cat([torch.full((n,), sum(seq_lens[:j]), dtype=torch.int32) for j, n in enumerate(seq_lens)])
    k_end = torch.arange(1, sum(seq_lens) + 1, dtype=torch.int32)
    q, k, weights = oracle.bf16(len(k_end), h_i, d_i), oracle.bf16(len(k_end), d_i), torch.rand(len(k_end), h_i)
    logits = ops.indexer_logits(q.to(device), k.to(device), weights.to(device), starts.to(device), k_end.to(device),
                                None, None)
    assert_logits_close(logits, oracle.indexer_logits(q.double(), k.double(), weights, starts, k_end))


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("lengths,s_q,h_i,d_i", [([70, 1, 128, 5], 1, 4, 32), ([3, 130], 3, 64, 128), ([1], 2, 1, 16)])
def test_indexer_logits_paged(device, fp8, lengths, s_q, h_i, d_i):
    """Causal s_q > 1: query i of sequence b sees logical tokens [0, L - s_q + i]; -inf beyond, per logical token."""
    num_blocks = sum(-(-n // 64) for n in lengths) + 2
    keys = oracle.bf16(num_blocks, 64, d_i)
    if fp8:
        index_cache = oracle.quantize_index(keys)
        flat_keys = oracle.dequantize_index(index_cache).reshape(-1, d_i)
    else:
        index_cache, flat_keys = keys, keys.double().reshape(-1, d_i)
    block_table = oracle.block_table_for(lengths, num_blocks, max_blocks_per_seq=4)
    cache_seqlens = torch.tensor(lengths, dtype=torch.int32)
    q = torch.randn(len(lengths), s_q, h_i, d_i)
    weights = torch.randn(len(lengths), s_q, h_i)
    if fp8:
        q_arg, q_scale, q_exact = fp8_with_scales(q)
    else:
        q_arg, q_scale = q.bfloat16(), None
        q_exact = q_arg.double()
    logits = ops.indexer_logits_paged(q_arg.to(device), index_cache.to(device), weights.to(device),
                                      block_table.to(device), cache_seqlens.to(device),
                                      None if q_scale is None else q_scale.to(device))
    assert logits.shape == (len(lengths), s_q, 4 * 64)
    assert_logits_close(logits, oracle.indexer_logits_paged(q_exact, flat_keys, weights, block_table, cache_seqlens))


@pytest.mark.parametrize("fp8", [False, True])
def test_indexer_logits_keep_nan(device, fp8):
    """relu(NaN) is NaN (torch.relu, the oracle's): a NaN in a query head's row, in a key or (FP8) in a scale makes the
    logits it reaches NaN, and only those, in prefill and in a paged cache; on the CPU the references, on a GPU the
    kernels (which took relu(NaN) as 0). The FP8 NaNs are scales and a prefill key's e4m3 code (decoded by torch on
    every path; the Triton kernels' integer decode before sm_89 reads an in-kernel NaN code as 480)."""
    s_q, s_kv, h_i, d_i = 9, 70, 8, 128
    q, k, weights = torch.randn(s_q, h_i, d_i), torch.randn(s_kv, d_i), torch.randn(s_q, h_i)
    k_start = torch.randint(0, s_kv // 2, (s_q,), dtype=torch.int32)
    k_end = torch.randint(s_kv // 2, s_kv + 1, (s_q,), dtype=torch.int32)
    k_start[0], k_end[0], k_end[1] = 0, s_kv, k_start[1]  # a full range and an empty one
    if fp8:
        q_arg, q_scale, _ = fp8_with_scales(q)
        k_arg, k_scale, _ = fp8_with_scales(k)
        q_scale[2, 1], k_scale[50] = math.nan, math.nan
        k_arg.view(torch.uint8)[40, 5] = 0xFF
        q_exact = oracle.e4m3_decode(q_arg) * q_scale.double()[..., None]
        k_exact = oracle.e4m3_decode(k_arg) * k_scale.double()[:, None]
    else:
        q_arg, k_arg, q_scale, k_scale = q.bfloat16(), k.bfloat16(), None, None
        q_arg[2, 1, 7], k_arg[40, 5] = math.nan, math.nan
        q_exact, k_exact = q_arg.double(), k_arg.double()
    to = (lambda t: None if t is None else t.to(device))
    logits = ops.indexer_logits(to(q_arg), to(k_arg), to(weights), to(k_start), to(k_end), to(q_scale), to(k_scale))
    want = oracle.indexer_logits(q_exact, k_exact, weights, k_start, k_end)
    assert want.isnan().any() and want.isfinite().any()
    if indexer_logits_path(to(q_arg), to(k_arg)) == "cuda":
        absolute = oracle.indexer_logits(q_exact.abs(), k_exact.abs(), weights.abs(), k_start, k_end)
        oracle.assert_within_absolute_band(logits, want, absolute, oracle.E4M3_MMA_BAND)
    else:
        assert_logits_close(logits, want)

    lengths, s_q = [70, 3], 2
    keys = oracle.bf16(4, 64, d_i)
    block_table = oracle.block_table_for(lengths, 4, max_blocks_per_seq=2)
    first, second = int(block_table[0, 0]), int(block_table[0, 1])  # sequence 0's tokens 0-63, 64-69
    if fp8:
        index_cache = oracle.quantize_index(keys)
        index_cache[first, 30, -4:].view(torch.float32).fill_(math.nan)
        flat_keys = oracle.dequantize_index(index_cache).reshape(-1, d_i)
    else:
        keys[second, 2, 9] = math.nan
        index_cache, flat_keys = keys, keys.double().reshape(-1, d_i)
    q = torch.randn(len(lengths), s_q, h_i, d_i)
    weights = torch.randn(len(lengths), s_q, h_i)
    if fp8:
        q_arg, q_scale, _ = fp8_with_scales(q)
        q_scale[1, 0, 3] = math.nan  # sequence 1's first query: tokens 0 and 1
        q_exact = oracle.e4m3_decode(q_arg) * q_scale.double()[..., None]
    else:
        q_arg, q_scale = q.bfloat16(), None
        q_arg[1, 0, 3, 4] = math.nan
        q_exact = q_arg.double()
    cache_seqlens = torch.tensor(lengths, dtype=torch.int32)
    logits = ops.indexer_logits_paged(to(q_arg), to(index_cache), to(weights), to(block_table), to(cache_seqlens),
                                      to(q_scale))
    want = oracle.indexer_logits_paged(q_exact, flat_keys, weights, block_table, cache_seqlens)
    assert want.isnan().any() and want.isfinite().any()
    assert_logits_close(logits, want)


@pytest.mark.parametrize("fp8", [False, True])
def test_indexer_logits_paged_reference_in_query_tiles(monkeypatch, fp8):
    """The reference scores a prompt continued through the decode path (hundreds of queries a sequence) a few queries
    at a time, within ELEMENTS_PER_CHUNK floats: here 2 queries of 64 heads x 256 positions a tile, s_q 5 (tiles of
    2, 2, 1), each query's causal range its own."""
    from flashmla_ops import indexer

    monkeypatch.setattr(indexer, "ELEMENTS_PER_CHUNK", 2 * 64 * 4 * 64)
    lengths, s_q, h_i, d_i = [130, 7], 5, 64, 32
    num_blocks = sum(-(-n // 64) for n in lengths) + 2
    keys = oracle.bf16(num_blocks, 64, d_i)
    index_cache = oracle.quantize_index(keys) if fp8 else keys
    flat_keys = (oracle.dequantize_index(index_cache) if fp8 else keys.double()).reshape(-1, d_i)
    block_table = oracle.block_table_for(lengths, num_blocks, max_blocks_per_seq=4)
    cache_seqlens = torch.tensor(lengths, dtype=torch.int32)
    q = torch.randn(len(lengths), s_q, h_i, d_i).bfloat16()
    weights = torch.randn(len(lengths), s_q, h_i)
    logits = indexer.indexer_logits_paged_reference(q, index_cache, weights, block_table, cache_seqlens)
    assert_logits_close(logits, oracle.indexer_logits_paged(q.double(), flat_keys, weights, block_table,
                                                            cache_seqlens))


def test_indexer_logits_negative_and_zero_scales(device):
    """FP8 scales of either sign and zeros: q . k is q_scale * k_scale * (q_fp8 . k_fp8) inside the relu (relu(s x) is
    not s relu(x) for s < 0), against the oracle on the signed exact values, in prefill and in a paged cache."""
    s_q, s_kv, h_i, d_i = 9, 70, 8, 32
    q_arg, q_scale, q_exact = fp8_with_scales(torch.randn(s_q, h_i, d_i))
    k_arg, k_scale, k_exact = fp8_with_scales(torch.randn(s_kv, d_i))
    q_sign, k_sign = torch.arange(s_q * h_i).view(s_q, h_i) % 3 - 1.0, torch.arange(s_kv) % 3 - 1.0  # -1, 0, 1
    weights = torch.randn(s_q, h_i)
    k_start = torch.randint(0, s_kv // 2, (s_q,), dtype=torch.int32)
    k_end = torch.randint(s_kv // 2, s_kv + 1, (s_q,), dtype=torch.int32)
    logits = ops.indexer_logits(q_arg.to(device), k_arg.to(device), weights.to(device), k_start.to(device),
                                k_end.to(device), (q_scale * q_sign).to(device), (k_scale * k_sign).to(device))
    assert_logits_close(logits, oracle.indexer_logits(q_exact * q_sign[..., None], k_exact * k_sign[:, None], weights,
                                                      k_start, k_end))

    lengths, s_q = [70, 5], 2
    index_cache = oracle.quantize_index(oracle.bf16(3, 64, d_i))
    scales = index_cache[..., -4:].view(torch.float32)
    scales.mul_(torch.arange(3 * 64).view(3, 64, 1) % 3 - 1.0)  # the cache rows' own scales, in place
    flat_keys = oracle.dequantize_index(index_cache).reshape(-1, d_i)
    block_table = oracle.block_table_for(lengths, 3)
    cache_seqlens = torch.tensor(lengths, dtype=torch.int32)
    q_arg, q_scale, q_exact = fp8_with_scales(torch.randn(2, s_q, h_i, d_i))
    q_sign = torch.arange(2 * s_q * h_i).view(2, s_q, h_i) % 3 - 1.0
    weights = torch.randn(2, s_q, h_i)
    logits = ops.indexer_logits_paged(q_arg.to(device), index_cache.to(device), weights.to(device),
                                      block_table.to(device), cache_seqlens.to(device), (q_scale * q_sign).to(device))
    assert_logits_close(logits, oracle.indexer_logits_paged(q_exact * q_sign[..., None], flat_keys, weights,
                                                            block_table, cache_seqlens))


def test_indexer_logits_paged_empty_sequence(device):
    """A sequence of length 0 in a decode batch (padding) sees nothing: an all -inf row, not an error."""
    lengths = [0, 70]
    index_cache = oracle.bf16(3, 64, 32)
    block_table = oracle.block_table_for(lengths, 3)
    q, weights = oracle.bf16(2, 1, 4, 32), torch.randn(2, 1, 4)
    logits = ops.indexer_logits_paged(q.to(device), index_cache.to(device), weights.to(device), block_table.to(device),
                                      torch.tensor(lengths, dtype=torch.int32, device=device), None)
    ref = oracle.indexer_logits_paged(q.double(), index_cache.double().reshape(-1, 32), weights, block_table,
                                      torch.tensor(lengths))
    assert_logits_close(logits, ref)


@pytest.mark.parametrize("fp8", [False, True])
def test_indexer_logits_paged_cache_without_blocks(device, fp8):
    """A cache of no blocks (nothing written yet) and every length 0: all -inf, not an error."""
    index_cache = torch.zeros(0, 64, 36, dtype=torch.uint8) if fp8 else oracle.bf16(0, 64, 32)
    q, weights = oracle.bf16(2, 1, 4, 32), torch.randn(2, 1, 4)
    block_table = torch.full((2, 2), -1, dtype=torch.int32)
    logits = ops.indexer_logits_paged(q.to(device), index_cache.to(device), weights.to(device), block_table.to(device),
                                      torch.zeros(2, dtype=torch.int32, device=device), None)
    assert logits.shape == (2, 1, 128) and bool((logits == float("-inf")).all())


def assert_topk_selection(selected, logits, topk, key_of=None):
    """selected `(..., topk)` int32: its finite logits are, as a multiset, the `topk` largest finite logits of the row;
    -1 fills exactly the places beyond the number of finite logits; no key twice. `key_of(row, index)` maps a
    returned index to the logical key (for block-table translation)."""
    assert selected.dtype == torch.int32 and selected.shape == (*logits.shape[:-1], topk)
    rows = math.prod(logits.shape[:-1])
    selected, logits = selected.cpu().reshape(rows, topk), logits.cpu().double().reshape(rows, logits.shape[-1])
    for row, (picked, values) in enumerate(zip(selected.tolist(), logits)):
        finite = sorted((float(v) for v in values if math.isfinite(v)), reverse=True)
        want = finite[:topk]
        chosen = [p for p in picked if p != -1]
        assert picked.count(-1) == topk - len(want), f"row {row}: {picked}"
        keys = [key_of(row, p) if key_of else p for p in chosen]
        assert all(0 <= key < logits.shape[-1] for key in keys), f"row {row}: {keys}"
        assert len(set(keys)) == len(keys), f"row {row}: a key selected twice"
        assert sorted((float(values[key]) for key in keys), reverse=True) == want, f"row {row}"


@pytest.mark.parametrize("shape,topk,ties", [((5, 300), 37, False), ((2, 3, 70), 100, False), ((4, 64), 64, True),
                                             ((130,), 1, False), ((3, 0), 4, False)])
def test_indexer_topk(device, shape, topk, ties):
    logits = torch.randint(-3, 3, shape).float() if ties else torch.randn(shape)
    logits[torch.rand(shape) < 0.3] = -math.inf
    if len(shape) > 1 and shape[-1]:
        logits[0] = -math.inf  # a row that sees nothing
        logits[-1, :topk // 2] = -math.inf
    selected = ops.indexer_topk(logits.to(device), topk, None)
    assert_topk_selection(selected, logits, topk)


@pytest.mark.parametrize("num_keys,topk", [(4 * 64, 50), (150, 130), (3 * 64 + 1, 200)])
def test_indexer_topk_block_table(device, num_keys, topk):
    """With block_table the indices are flat cache slots block_table[b, t // 64] * 64 + t % 64."""
    batch, s_q, max_blocks = 3, 2, 4
    logits = torch.randn(batch, s_q, num_keys)
    lengths = [num_keys, 65, 0]
    for b, length in enumerate(lengths):
        logits[b, :, length:] = -math.inf
    logits[1, 1, 40:] = -math.inf
    block_table = oracle.block_table_for([max_blocks * 64] * batch, 20, max_blocks_per_seq=max_blocks, garbage=False)
    selected = ops.indexer_topk(logits.to(device), topk, block_table.to(device))
    slot_to_token = [{int(block_table[b, j]) * 64 + r: j * 64 + r for j in range(max_blocks) for r in range(64)}
                     for b in range(batch)]
    assert_topk_selection(selected, logits, topk, key_of=lambda row, slot: slot_to_token[row // s_q].get(slot, -1))


def test_indexer_pipeline_feeds_sparse_prefill(device):
    """indexer_logits -> indexer_topk -> sparse_prefill: the selected rows are the top-scoring visible keys."""
    s, h_i, d_i, topk = 40, 4, 32, 16
    q, k, weights = oracle.bf16(s, h_i, d_i), oracle.bf16(s, d_i), torch.rand(s, h_i)
    k_start, k_end = torch.zeros(s, dtype=torch.int32), torch.arange(1, s + 1, dtype=torch.int32)
    logits = ops.indexer_logits(q.to(device), k.to(device), weights.to(device), k_start.to(device), k_end.to(device),
                                None, None)
    selected = ops.indexer_topk(logits, topk, None)
    assert_topk_selection(selected, logits, topk)
    assert ((selected.cpu() < k_end[:, None]) | (selected.cpu() == -1)).all(), "causal: no future key selected"
    assert (selected.cpu()[:topk - 1] == -1).any() and not (selected.cpu()[topk:] == -1).any()


class RecordingExtension:
    """Stands in for the CUDA extension: records what the ops hand the indexer kernels, returns -inf logits."""

    def __init__(self):
        self.calls = {}

    def indexer_logits(self, *args):
        self.calls["indexer_logits"] = args
        return torch.full((args[0].shape[0], args[1].shape[0]), -math.inf)

    def indexer_logits_paged(self, q, cache, weights, block_table, seqlens):
        self.calls["indexer_logits_paged"] = (q, cache, weights, block_table, seqlens)
        return torch.full((q.shape[0], q.shape[1], block_table.shape[1] * 64), -math.inf)


def offset_view(x: torch.Tensor) -> torch.Tensor:
    """x's values in a view that starts one element into a fresh buffer (contiguous, not 16-byte aligned)."""
    buffer = torch.empty(x.numel() + 1, dtype=x.dtype)
    view = buffer[1:].view(x.shape)
    view.copy_(x)
    assert view.is_contiguous() and view.data_ptr() % 16 != 0
    return view


def test_cuda_indexer_paths_hand_the_kernels_dense_aligned_inputs(monkeypatch):
    """What the ops pass the CUDA kernels, recorded on the CPU: q and keys contiguous and 16-byte aligned even from a
    misaligned q or a transposed k (a TMA base and the kernels' 16-byte copies need both), a negative key scale's sign in
    the key's e4m3 bits with |scale| beside it; paged e4m3 q widened to bf16 with its scale's sign, |q_scale| in the
    weights."""
    from flashmla_ops import _ext, indexer

    recording = RecordingExtension()
    monkeypatch.setattr(_ext, "paths", lambda op, device: ("cuda",))
    monkeypatch.setattr(_ext, "extension", lambda: recording)
    s_q, s_kv, h_i = 5, 40, 64
    q, q_scale, _ = fp8_with_scales(torch.randn(s_q, h_i, 128))
    k, k_scale, _ = fp8_with_scales(torch.randn(s_kv, 128))
    k_scale[::3] *= -1
    k_t = k.view(torch.uint8).t().contiguous().t().view(FP8)  # the same values, transposed storage
    assert not k_t.is_contiguous()
    ranges = torch.zeros(s_q, dtype=torch.int32), torch.full((s_q,), s_kv, dtype=torch.int32)
    q_view = offset_view(q.view(torch.uint8)).view(FP8)
    assert indexer.indexer_logits_path(q_view, k_t) == "cuda"
    ops.indexer_logits(q_view, k_t, torch.randn(s_q, h_i), *ranges, q_scale, k_scale)
    got_q, got_k, _, _, _, got_q_scale, got_k_scale = recording.calls["indexer_logits"]
    for x in (got_q, got_k):
        assert x.is_contiguous() and x.data_ptr() % 16 == 0
    assert torch.equal(got_q.view(torch.uint8), q.view(torch.uint8)) and torch.equal(got_q_scale, q_scale)
    flipped = torch.where((k_scale < 0)[:, None], k.view(torch.uint8) ^ 0x80, k.view(torch.uint8))
    assert torch.equal(got_k.view(torch.uint8), flipped) and torch.equal(got_k_scale, k_scale.abs())

    batch, s_q, blocks = 2, 2, 3
    cache = oracle.quantize_index(torch.randn(batch * blocks, 64, 128))
    block_table = torch.arange(batch * blocks, dtype=torch.int32).view(batch, blocks)
    seqlens = torch.tensor([100, 190], dtype=torch.int32)
    weights = torch.randn(batch, s_q, h_i)
    q_bf16 = offset_view(torch.randn(batch, s_q, h_i, 128).bfloat16())
    assert indexer.indexer_logits_paged_path(q_bf16, cache) == "cuda"
    ops.indexer_logits_paged(q_bf16, cache, weights, block_table, seqlens, None)
    got_q, got_cache, got_weights = recording.calls["indexer_logits_paged"][:3]
    assert got_q.is_contiguous() and got_q.data_ptr() % 16 == 0 and torch.equal(got_q, q_bf16)
    assert got_cache.dtype == torch.uint8 and torch.equal(got_weights, weights)
    q8, q8_scale, _ = fp8_with_scales(torch.randn(batch, s_q, h_i, 128))
    q8_scale[..., ::2] *= -1
    ops.indexer_logits_paged(q8, cache, weights, block_table, seqlens, q8_scale)
    got_q, _, got_weights = recording.calls["indexer_logits_paged"][:3]
    signs = torch.where(q8_scale < 0, -1.0, 1.0)[..., None]
    assert got_q.dtype == torch.bfloat16 and torch.equal(got_q.float(), q8.float() * signs)
    assert torch.equal(got_weights, weights * q8_scale.abs())


def test_paged_logits_leave_the_cuda_kernel_for_a_table_of_2_31_tokens(monkeypatch):
    """csrc/indexer_logits_paged.cu numbers logical positions in int32 and raises for a table of 2**31 tokens or more:
    such a table goes to the next path instead (the op's check of the table's capacity at its entry)."""
    from flashmla_ops import _ext, indexer

    monkeypatch.setattr(_ext, "paths", lambda op, device: ("cuda", "reference"))
    q = torch.zeros(1, 1, 64, 128, dtype=torch.bfloat16)
    cache = oracle.quantize_index(torch.randn(1, 64, 128))
    fits = torch.zeros(1, 1, dtype=torch.int32).expand(1, 2 ** 31 // 64 - 1)
    too_wide = torch.zeros(1, 1, dtype=torch.int32).expand(1, 2 ** 31 // 64)
    assert indexer.indexer_logits_paged_path(q, cache) == "cuda"
    assert indexer.indexer_logits_paged_path(q, cache, fits) == "cuda"
    assert indexer.indexer_logits_paged_path(q, cache, too_wide) == "reference"


def test_topk_ranks_logits_in_the_kernels_total_order():
    """Logits rank as csrc/indexer_topk.cu's codes rank them (IEEE 754's total order), not by float comparisons,
    under which a NaN threshold selected nothing and -0 tied +0: -0 below +0, a NaN above +inf, a NaN with its sign
    bit set below -inf (never selected, as -inf is not)."""
    nan = float("nan")
    negative_nan = torch.tensor([nan]).view(torch.int32).bitwise_or(-2 ** 31).view(torch.float32).item()
    inf = float("inf")
    logits = torch.tensor([[nan, 1.0, 2.0, -inf, inf, -0.0, 0.0, negative_nan, -0.0, 0.0]])
    want = {1: [0], 2: [0, 4], 3: [0, 2, 4], 5: [0, 1, 2, 4, 6], 6: [0, 1, 2, 4, 6, 9],
            7: [0, 1, 2, 4, 5, 6, 9], 8: [0, 1, 2, 4, 5, 6, 8, 9], 9: [0, 1, 2, 4, 5, 6, 8, 9, -1]}
    for topk, keys in want.items():
        assert ops.indexer_topk(logits, topk, None).tolist() == [keys], topk
    assert indexer.ordered_codes(logits)[0, 7] < indexer.ORDERED_NEGATIVE_INFINITY  # the negative NaN's code
    table = torch.tensor([[3]], dtype=torch.int32)
    assert ops.indexer_topk(logits[None], 2, table).tolist() == [[[3 * 64 + 0, 3 * 64 + 4]]]


def test_topk_breaks_ties_by_the_lowest_positions_in_any_row_width():
    """The k-th largest logit tied (V3.2's relu'd scores are often exactly 0): the tied keys are taken from the lowest
    positions, all keys in ascending order, -1 after them, as csrc/indexer_topk.cu does; so the same keys in a wider
    row (a prompt's prefill row against its decode row of the cache's capacity) select the same."""
    logits = torch.tensor([[0.0, 3.0, 0.0, 0.0, float("-inf"), 0.0, 2.0]])
    assert ops.indexer_topk(logits, 4, None).tolist() == [[0, 1, 2, 6]]
    assert ops.indexer_topk(logits, 9, None).tolist() == [[0, 1, 2, 3, 5, 6, -1, -1, -1]]
    generator = torch.Generator().manual_seed(4)
    scores = torch.relu(torch.randn(3, 5, 90, generator=generator)).round(decimals=1)  # many ties
    for width in (90, 128, 300):
        wide = torch.full((3, 5, width), float("-inf"))
        wide[..., :90] = scores
        selected = ops.indexer_topk(wide, 16, None)
        if width == 90:
            first = selected
        assert torch.equal(selected, first)
    assert (first[..., 1:] > first[..., :-1]).all()
