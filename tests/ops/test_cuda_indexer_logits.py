"""The CUDA indexer logits against the references, on Hopper: packed prefill (csrc/indexer_logits.cu, e4m3 wgmmas) and
decode over the paged FP8 index cache (csrc/indexer_logits_paged.cu, bf16 wgmmas).

Prefill: varlen causal batches, empty and full key ranges and ragged ones in any order (-inf exactly where the
reference has it); h_i 1 to 64 (padded to 64 heads), s_q and s_kv not multiples of the kernel's 8 queries and 64 keys,
one key and one query, more key tiles than the pipeline's stages, several key splits; negative and zero scales on q and
keys; query rows whose scales differ by 2^40. Its band: mla_oracle.E4M3_MMA_BAND of the absolute sum
sum_h |w| sum_d |q_d k_d|, element by element (Hopper's e4m3 MMA sums its products with about 14 bits kept).

Paged: lengths 0, 1, 63, 64, 65 and past 4k and 32k, twice as many sequences as SMs, s_q 1 and 2, h_i 1 to 64, bf16
and e4m3 q (negative scales), keys with negative and zero scales, block-table entries past each sequence holding
garbage; the exact band (bf16 products, float32 sums) of the largest logit, and element by element of each logit's
absolute sum.

Both: outputs poisoned, repeated runs identical, the op dispatching here and replaying in a CUDA graph.
"""
import pytest
import torch
from decode_inputs import HOPPER

import flashmla_ops
import mla_oracle as oracle
from flashmla_ops import _ext
from flashmla_ops.indexer import (indexer_logits_paged_path, indexer_logits_paged_reference, indexer_logits_path,
                                  indexer_logits_reference)
from flashmla_ops.kv_cache import quantize_fp8_rows, quantize_index_fp8_reference

DEVICE = "cuda"
FP8 = torch.float8_e4m3fn
pytestmark = [
    pytest.mark.gpu,
    HOPPER,
]


def inputs(s_q, s_kv, h_i, k_start, k_end, seed, weights_positive=False):
    generator = torch.Generator().manual_seed(seed)
    q, q_scale = quantize_fp8_rows(torch.randn(s_q, h_i, 128, generator=generator))
    k, k_scale = quantize_fp8_rows(torch.randn(s_kv, 128, generator=generator))
    weights = torch.randn(s_q, h_i, generator=generator)
    if weights_positive:
        weights = weights.abs() + 0.1
    bounds = (torch.as_tensor(k_start).int(), torch.as_tensor(k_end).int())
    return [x.to(DEVICE) for x in (q, k, weights, *bounds, q_scale, k_scale)]


def causal_ranges(s_q, s_kv):
    """Two packed causal sequences, plus an empty range (query 1) and a full one (the last query)."""
    split = s_kv // 3
    positions = torch.arange(s_q)
    k_start = torch.where(positions < s_q // 2, 0, split)
    k_end = torch.where(positions < s_q // 2, (positions + 1).clamp_max(split), (split + positions + 1).clamp_max(s_kv))
    if s_q > 2:
        k_start[1], k_end[1] = 4 % (s_kv + 1), 4 % (s_kv + 1)
    k_start[-1], k_end[-1] = 0, s_kv
    return k_start, k_end


def poison_allocator(output_bytes):
    """NaN in free blocks of the output's size (the caching allocator hands an exact fit back first; several, in case
    the op's own temporaries take some) and in a large one: an output element the kernel does not write fails."""
    blocks = [torch.full((max(1, output_bytes // 4),), float("nan"), device=DEVICE) for _ in range(4)]
    blocks.append(torch.full((64 << 20,), float("nan"), device=DEVICE))
    del blocks


def cuda_logits(args):
    assert indexer_logits_path(args[0], args[1]) == "cuda"
    poison_allocator(args[0].shape[0] * args[1].shape[0] * 4)
    return torch.ops.flashmla.indexer_logits(*args)


def assert_close(got, args):
    """Within the e4m3 MMA band of the absolute sum (mla_oracle.E4M3_MMA_BAND), element by element."""
    q, k, weights, k_start, k_end, q_scale, k_scale = args
    absolute = indexer_logits_reference((q.float() * q_scale[..., None]).abs(), (k.float() * k_scale[:, None]).abs(),
                                        weights.abs(), k_start, k_end)
    assert got.dtype == torch.float32
    oracle.assert_within_absolute_band(got, indexer_logits_reference(*args), absolute, oracle.E4M3_MMA_BAND)


def test_the_op_takes_the_cuda_kernel_for_e4m3():
    args = inputs(5, 70, 64, *causal_ranges(5, 70), seed=0)
    assert flashmla_ops.backend("indexer_logits", DEVICE) == "cuda"
    assert indexer_logits_path(args[0], args[1]) == "cuda"
    bf16 = args[0].float().bfloat16()
    assert indexer_logits_path(bf16, args[1].float().bfloat16()) != "cuda"
    assert indexer_logits_path(args[0][:, :0], args[1]) != "cuda"


@pytest.mark.parametrize("s_q,s_kv,h_i", [(1, 1, 64), (7, 150, 3), (19, 67, 8), (5, 200, 64), (300, 700, 64),
                                          (1000, 4099, 64), (13, 8191, 33), (3000, 2000, 64)])
def test_cuda_indexer_logits_matches_reference(s_q, s_kv, h_i):
    args = inputs(s_q, s_kv, h_i, *causal_ranges(s_q, s_kv), seed=s_q + s_kv)
    got = cuda_logits(args)
    assert_close(got, args)
    assert torch.equal(got, cuda_logits(args))


def test_cuda_indexer_logits_ragged_ranges_in_any_order():
    """Each query's range drawn at random (some empty, some a single key), so that the 8 queries of a CTA and the 4 of
    a warpgroup see different tiles, and tiles inside a CTA's union that a warpgroup's queries do not see."""
    s_q, s_kv = 203, 3001
    generator = torch.Generator().manual_seed(3)
    a = torch.randint(0, s_kv + 1, (s_q,), generator=generator)
    b = torch.randint(0, s_kv + 1, (s_q,), generator=generator)
    k_start, k_end = torch.minimum(a, b), torch.maximum(a, b)
    k_end[::7] = k_start[::7]  # empty
    k_end[3::11] = (k_start[3::11] + 1).clamp_max(s_kv)  # one key
    args = inputs(s_q, s_kv, 64, k_start, k_end, seed=4)
    assert_close(cuda_logits(args), args)


def test_cuda_indexer_logits_negative_and_zero_scales():
    s_q, s_kv = 37, 500
    args = inputs(s_q, s_kv, 64, *causal_ranges(s_q, s_kv), seed=5)
    q_scale, k_scale = args[5], args[6]
    q_scale[::3] *= -1
    q_scale[5, :7] = 0
    q_scale[::5, ::2] *= -1
    k_scale[::4] *= -1
    k_scale[7::9] = 0
    k_scale[8] = -0.0
    assert_close(cuda_logits(args), args)


def test_cuda_indexer_logits_keep_nan():
    """relu(NaN) is NaN, as torch.relu (the reference) has it: fmaxf(x, 0.f) took it as 0. e4m3 NaN codes in q and in
    keys, also in a query row and a key that the kernel and the op sign-flip (0x7f <-> 0xff), a NaN query head's scale
    and a NaN key scale: the logits NaN exactly where the reference's are."""
    s_q, s_kv = 37, 500
    args = inputs(s_q, s_kv, 64, *causal_ranges(s_q, s_kv), seed=14)
    q, k, q_scale, k_scale = args[0].view(torch.uint8), args[1].view(torch.uint8), args[5], args[6]
    q[5, 3, 17], q[36, 9, 0] = 0x7F, 0xFF  # query 5 sees keys [0, 6), the last query every key
    q_scale[36, 9] *= -1
    k[123, 40], k[200, 0], k[201, 127] = 0x7F, 0xFF, 0x7F  # key 123: the last query; 200: 34 on; 201: 35 on
    k_scale[200] *= -1
    q_scale[20, 7], k_scale[300] = float("nan"), float("nan")
    want = indexer_logits_reference(*args)
    assert want.isnan().any() and want.isfinite().any()
    assert_close(cuda_logits(args), args)  # mla_oracle.finite_logits: NaN exactly where want has it


def test_cuda_indexer_logits_rows_of_very_different_scales():
    """Query rows scaled by 2^0 .. 2^-40, positive weights (no cancellation): each element is held to its own absolute
    sum, so a wrong weight, head or query in a small row shows as in a large one."""
    s_q, s_kv = 64, 1000
    args = inputs(s_q, s_kv, 64, torch.zeros(s_q), torch.full((s_q,), s_kv), seed=6, weights_positive=True)
    args[5] *= torch.pow(2.0, -torch.arange(s_q, device=DEVICE) % 41)[:, None]
    assert_close(cuda_logits(args), args)


def test_cuda_indexer_logits_long_keys_and_cuda_graph():
    """32k keys for 16 queries (a split of the keys per CTA, 512 tiles through 8 stages), replayed in a CUDA graph with
    new ranges."""
    s_q, s_kv = 16, 32768
    k_start, k_end = torch.zeros(s_q), torch.full((s_q,), s_kv)
    args = inputs(s_q, s_kv, 64, k_start, k_end, seed=7)
    assert indexer_logits_path(args[0], args[1]) == "cuda"  # not the reference (it captures and replays too)
    torch.ops.flashmla.indexer_logits(*args)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = torch.ops.flashmla.indexer_logits(*args)
    args[3].copy_(torch.arange(s_q, device=DEVICE) * 1000)
    args[4].copy_(torch.arange(s_q, device=DEVICE) * 2000 + 5)
    graph.replay()
    torch.cuda.synchronize()
    assert_close(got, args)


def test_cuda_indexer_logits_rejects_what_it_does_not_cover():
    args = inputs(4, 64, 64, torch.zeros(4), torch.full((4,), 64), seed=8)
    ext = _ext.extension()
    with pytest.raises(RuntimeError, match="q must be"):
        ext.indexer_logits(args[0][:, :, :64].contiguous(), *args[1:])
    with pytest.raises(RuntimeError, match="k_start and k_end"):
        ext.indexer_logits(args[0], args[1], args[2], args[3].long(), *args[4:])


# ---------------------------------------------------------------- paged (decode) form: csrc/indexer_logits_paged.cu

RELATIVE_EXACT = 2e-5  # bf16 products (e4m3 keys and q widened exactly), float32 sums: test_triton_indexer's band


def paged_inputs(seqlens, s_q, h_i, q_fp8, seed, spare_blocks=1):
    """An FP8 index cache with keys in shuffled blocks, some scales negative or zero; the block table's entries past
    each sequence's blocks hold -1 and huge values (never read)."""
    generator = torch.Generator().manual_seed(seed)
    batch = len(seqlens)
    blocks_per_seq = max(1, -(-max(seqlens) // 64)) + spare_blocks
    num_blocks = batch * blocks_per_seq + 3
    cache = quantize_index_fp8_reference(torch.randn(num_blocks, 64, 128, generator=generator))
    scales = cache[..., 128:].view(torch.float32)  # (num_blocks, 64, 1)
    scales[:, ::5] *= -1
    scales[:, 3::17] = 0
    block_table = torch.randperm(num_blocks, generator=generator)[:batch * blocks_per_seq].view(batch, -1).int()
    for b, length in enumerate(seqlens):
        used = -(-length // 64)
        garbage = torch.tensor([-1, 1 << 30], dtype=torch.int32).repeat(blocks_per_seq)
        block_table[b, used:] = garbage[:blocks_per_seq - used]
    q = torch.randn(batch, s_q, h_i, 128, generator=generator)
    q_scale = None
    if q_fp8:
        q, q_scale = quantize_fp8_rows(q)
        q_scale[:, :, ::3] *= -1
    else:
        q = q.bfloat16()
    weights = torch.randn(batch, s_q, h_i, generator=generator)
    seqlens = torch.tensor(seqlens, dtype=torch.int32)
    return [x.to(DEVICE) if x is not None else None for x in (q, cache, weights, block_table, seqlens, q_scale)]


# Element by element too: a float32 sum of 64 x 128 exact products in another order is off by ~5e-6 of its absolute
# sum on random inputs (at worst n eps, 5e-4); a wrong key, head, weight or scale shows as 1e-2 of it or more.
RELATIVE_EXACT_OF_ABSOLUTE = 1e-4


def absolute_paged(args):
    """The logits of |q|, |keys| (e4m3 sign bits cleared, |scale|) and |weights|: each logit's absolute sum."""
    q, cache, weights, block_table, seqlens, q_scale = args
    if q_scale is None:
        q_abs, q_scale_abs = q.abs(), None
    else:
        q_abs, q_scale_abs = (q.view(torch.uint8) & 0x7F).view(FP8), q_scale.abs()
    cache_abs = cache.clone()
    cache_abs[..., :128] &= 0x7F
    cache_abs[..., 128:].view(torch.float32).abs_()
    return indexer_logits_paged_reference(q_abs, cache_abs, weights.abs(), block_table, seqlens, q_scale_abs)


def assert_close_exact(got, want, absolute=None):
    assert got.dtype == torch.float32
    finite = oracle.finite_logits(got, want)
    scale = want[finite].abs().max().clamp_min(1e-6) if finite.any() else 1.0
    error = ((got[finite] - want[finite]).abs() / scale).max() if finite.any() else 0.0
    assert error <= RELATIVE_EXACT, f"largest error {float(error):.3g} of the largest logit"
    if absolute is not None:
        oracle.assert_within_absolute_band(got, want, absolute, RELATIVE_EXACT_OF_ABSOLUTE)


def paged_logits(args):
    q, block_table = args[0], args[3]
    assert indexer_logits_paged_path(q, args[1], block_table) == "cuda"
    poison_allocator(q.shape[0] * q.shape[1] * block_table.shape[1] * 64 * 4)
    return torch.ops.flashmla.indexer_logits_paged(*args)


def test_the_paged_op_takes_the_cuda_kernel_where_it_applies():
    args = paged_inputs([70, 3], 2, 64, True, seed=10)
    assert flashmla_ops.backend("indexer_logits_paged", DEVICE) == "cuda"
    assert indexer_logits_paged_path(args[0], args[1]) == "cuda"
    assert indexer_logits_paged_path(args[0].float().bfloat16(), args[1]) == "cuda"
    three = paged_inputs([70, 3], 3, 64, True, seed=10)
    assert indexer_logits_paged_path(three[0], three[1]) != "cuda"  # s_q 3: Triton
    bf16_cache = args[1][..., :128].contiguous().view(FP8).float().bfloat16()
    assert indexer_logits_paged_path(args[0].float().bfloat16(), bf16_cache) != "cuda"


@pytest.mark.parametrize("q_fp8", [False, True], ids=["bf16-q", "e4m3-q"])
@pytest.mark.parametrize("seqlens,s_q,h_i", [([0, 1, 63, 64, 65, 130], 1, 64), ([5, 200, 1], 2, 7),
                                            ([1000, 64, 2], 2, 64), ([4097], 1, 1), ([129, 3000], 2, 33)])
def test_cuda_indexer_logits_paged_matches_reference(seqlens, s_q, h_i, q_fp8):
    args = paged_inputs(seqlens, s_q, h_i, q_fp8, seed=sum(seqlens) + s_q + h_i)
    got = paged_logits(args)
    assert_close_exact(got, indexer_logits_paged_reference(*args), absolute_paged(args))
    assert torch.equal(got, paged_logits(args))


@pytest.mark.parametrize("s_q", [1, 2])
def test_cuda_indexer_logits_paged_more_sequences_than_sms(s_q):
    """Twice as many sequences as SMs, so few key splits per sequence and several waves of CTAs: the split rule's other
    end from the single long sequences."""
    sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count
    seqlens = torch.randint(0, 700, (2 * sms + 5,), generator=torch.Generator().manual_seed(13)).tolist()
    args = paged_inputs(seqlens, s_q, 64, s_q == 2, seed=13 + s_q)
    got = paged_logits(args)
    assert_close_exact(got, indexer_logits_paged_reference(*args), absolute_paged(args))


@pytest.mark.parametrize("q_fp8", [False, True], ids=["bf16-q", "e4m3-q"])
def test_cuda_indexer_logits_paged_keep_nan(q_fp8):
    """relu(NaN) is NaN, as torch.relu (the reference) has it: fmaxf(x, 0.f) took it as 0. e4m3 NaN codes in cache rows
    (one of them with a negative scale, whose sign the kernel flips into the values), a NaN cache row scale, and a NaN
    in q (a bf16 value, or an e4m3 code and a NaN query head's scale): NaN exactly where the reference has it."""
    args = paged_inputs([70, 130, 5], 2, 64, q_fp8, seed=15)
    q, cache, block_table, q_scale = args[0], args[1], args[3], args[5]
    seen = int(block_table[1, 1])  # sequence 1's tokens 64 to 127
    cache[seen, 10, 7], cache[seen, 11, 100] = 0x7F, 0xFF  # row 10's scale is negative (paged_inputs: rows ::5)
    cache[seen, 40, 128:].view(torch.float32).fill_(float("nan"))
    if q_fp8:
        q.view(torch.uint8)[2, 1, 4, 6] = 0x7F  # sequence 2's last query sees its 5 tokens
        q_scale[0, 0, 9] = float("nan")
    else:
        q[2, 1, 4, 6] = float("nan")
    want = indexer_logits_paged_reference(*args)
    assert want.isnan().any() and want.isfinite().any()
    assert_close_exact(paged_logits(args), want, absolute_paged(args))  # finite_logits: NaN exactly where want has it


def test_cuda_indexer_logits_paged_long_sequences_and_cuda_graph():
    """32k-token sequences (512 blocks through 8 stages, several key splits per sequence), replayed in a CUDA graph
    with new lengths."""
    args = paged_inputs([32768, 20000, 7], 1, 64, False, seed=11, spare_blocks=0)
    assert indexer_logits_paged_path(args[0], args[1], args[3]) == "cuda"
    torch.ops.flashmla.indexer_logits_paged(*args)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = torch.ops.flashmla.indexer_logits_paged(*args)
    args[4].copy_(torch.tensor([100, 32768, 0], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    assert_close_exact(got, indexer_logits_paged_reference(*args))


def test_cuda_indexer_logits_paged_rejects_what_it_does_not_cover():
    args = paged_inputs([70], 1, 64, False, seed=12)
    ext = _ext.extension()
    with pytest.raises(RuntimeError, match="q must be"):
        ext.indexer_logits_paged(args[0].float(), *args[1:5])
    with pytest.raises(RuntimeError, match="index_cache must be"):
        ext.indexer_logits_paged(args[0], args[1][:, :, :128], *args[2:5])
