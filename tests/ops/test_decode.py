"""Dense and sparse paged decode (torch.ops.flashmla.dense_decode / sparse_decode) against the float64 oracle."""
import pytest
import torch

import mla_oracle as oracle

ops = torch.ops.flashmla
SCALE = oracle.D_QK ** -0.5


def dense(q, cache, block_table, cache_seqlens, causal=False, fp8=False, attn_sink=None, d_v=oracle.D_V, scale=SCALE):
    device = q.device
    return ops.dense_decode(q, cache, block_table.to(device), cache_seqlens.to(device), None, None, d_v, scale, causal,
                            fp8, None if attn_sink is None else attn_sink.to(device))


@pytest.mark.parametrize("lengths,s_q,h_q,causal", [
    ([0, 1, 63, 64, 65, 130], 1, 16, False),   # empty sequence, single token, around the 64-token block
    ([200], 1, 128, False),
    ([1, 2, 3, 100], 2, 1, True),              # L < s_q: the first queries see nothing
    ([0, 5, 129], 4, 16, True),
    ([77, 3], 3, 16, False),                   # s_q > 1 without causal: every query sees [0, L)
    ([], 1, 16, False),                        # batch 0
])
def test_dense_decode_bf16(device, lengths, s_q, h_q, causal):
    cache_seqlens = torch.tensor(lengths, dtype=torch.int32)
    num_blocks = sum(-(-n // 64) for n in lengths) + 3
    cache, flat_keys = oracle.paged_cache(num_blocks, fp8=False, pad=40, device=device)
    block_table = oracle.block_table_for(lengths, num_blocks, max_blocks_per_seq=4)
    q = oracle.bf16(len(lengths), s_q, h_q, oracle.D_QK, device=device)
    out, lse = dense(q, cache, block_table, cache_seqlens, causal)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    ref_out, ref_lse = oracle.dense_decode(q.cpu(), flat_keys, block_table, cache_seqlens, SCALE, oracle.D_V, causal)
    oracle.assert_attention_close(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("lengths,s_q,h_q,causal,pad,fp8_view", [
    ([70, 1, 0], 2, 16, True, 656 * 3, False),
    ([129, 64], 1, 128, False, 0, True),
    ([33], 4, 1, True, 5008, False),  # a 16-byte multiple: the GPU kernels take it
    ([33], 4, 1, True, 5000, False),  # not one: the op runs its reference on a GPU too
])
def test_dense_decode_fp8(device, reference_runs, lengths, s_q, h_q, causal, pad, fp8_view):
    """FP8 cache, a slice of a padded buffer: against the oracle on the exactly dequantized cache, and within FP8
    error of the same data in a BF16 cache."""
    cache_seqlens = torch.tensor(lengths, dtype=torch.int32)
    num_blocks = sum(-(-n // 64) for n in lengths) + 2
    cache, flat_keys = oracle.paged_cache(num_blocks, fp8=True, pad=pad, device=device)
    assert cache.stride(0) > 64 * 656 or pad == 0
    block_table = oracle.block_table_for(lengths, num_blocks)
    q = oracle.bf16(len(lengths), s_q, h_q, oracle.D_QK, device=device)
    fp8_cache = cache.view(torch.float8_e4m3fn) if fp8_view else cache
    out, lse = dense(q, fp8_cache, block_table, cache_seqlens, causal, fp8=True)
    if device.type == "cuda":  # the kernels take block strides of 16-byte multiples
        assert ("dense_decode" in reference_runs) == (pad % 16 != 0)
    ref_out, ref_lse = oracle.dense_decode(q.cpu(), flat_keys, block_table, cache_seqlens, SCALE, oracle.D_V, causal)
    oracle.assert_attention_close(out, lse, ref_out, ref_lse)

    # The dequantized values are exact in BF16: a BF16 cache holding them gives the same attention.
    out_bf16, lse_bf16 = dense(q, ops.dequantize_kv_fp8(cache.contiguous()), block_table, cache_seqlens, causal)
    oracle.assert_attention_close(out_bf16, lse_bf16, out.double().cpu(), lse.double().cpu())


def test_dense_decode_fp8_vs_bf16_cache(device):
    lengths = [150, 64, 9]
    cache_seqlens = torch.tensor(lengths, dtype=torch.int32)
    num_blocks = 8
    content = oracle.bf16(num_blocks, 64, 1, oracle.D_QK, device=device)
    block_table = oracle.block_table_for(lengths, num_blocks)
    q = oracle.bf16(3, 1, 16, oracle.D_QK, device=device)
    out_bf16, lse_bf16 = dense(q, content, block_table, cache_seqlens)
    out_fp8, lse_fp8 = dense(q, ops.quantize_kv_fp8(content), block_table, cache_seqlens, fp8=True)
    error = (out_fp8.double() - out_bf16.double()).norm() / out_bf16.double().norm()
    assert error < 5e-2, error
    assert (lse_fp8 - lse_bf16).abs().max() < 5e-2


def test_dense_decode_attn_sink_and_scale(device):
    lengths = [90, 0, 2]
    cache_seqlens = torch.tensor(lengths, dtype=torch.int32)
    cache, flat_keys = oracle.paged_cache(5, fp8=False, device=device)
    block_table = oracle.block_table_for(lengths, 5)
    q = oracle.bf16(3, 2, 16, oracle.D_QK, device=device)
    attn_sink = torch.randn(16) * 2
    out, lse = dense(q, cache, block_table, cache_seqlens, causal=True, attn_sink=attn_sink, scale=0.1)
    ref_out, ref_lse = oracle.dense_decode(q.cpu(), flat_keys, block_table, cache_seqlens, 0.1, oracle.D_V, True,
                                           attn_sink)
    oracle.assert_attention_close(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("fp8", [False, True])
def test_infinite_sinks_and_queries_that_see_nothing(device, fp8):
    """Sinks of -inf (out unchanged), +inf (out 0) and finite ones, on queries that see tokens and on queries that see
    none: out 0 and lse +inf whatever the sink (there sigmoid(lse - sink) is sigmoid(inf - inf), NaN), dense and
    sparse, against the oracle's out / (1 + exp(sink - lse))."""
    lengths, s_q, h_q = [0, 5, 130], 2, 4
    cache_seqlens = torch.tensor(lengths, dtype=torch.int32)
    cache, flat_keys = oracle.paged_cache(5, fp8=fp8, device=device)
    block_table = oracle.block_table_for(lengths, 5)
    q = oracle.bf16(3, s_q, h_q, oracle.D_QK, device=device)
    attn_sink = torch.tensor([float("-inf"), float("inf"), 0.0, 5.0])
    out, lse = dense(q, cache, block_table, cache_seqlens, causal=True, fp8=fp8, attn_sink=attn_sink)
    oracle.assert_attention_close(out, lse, *oracle.dense_decode(q.cpu(), flat_keys, block_table, cache_seqlens, SCALE,
                                                                 oracle.D_V, True, attn_sink))
    assert (out[0] == 0).all() and (out[:, :, 1] == 0).all() and torch.isposinf(lse[0]).all()

    indices = sparse_indices(3, s_q, 20, 5 * 64)  # query (0, 0) lists no token
    out, lse = ops.sparse_decode(q, cache, indices.to(device), None, None, None, None, None, None, oracle.D_V, SCALE,
                                 fp8, attn_sink.to(device))
    oracle.assert_attention_close(out, lse, *oracle.sparse_decode(q.cpu(), flat_keys, indices, None, SCALE, oracle.D_V,
                                                                  attn_sink=attn_sink))
    assert (out[0, 0] == 0).all() and torch.isposinf(lse[0, :, 0]).all()


def test_float32_inputs_give_float32_outputs():
    """float32 q and cache run the reference in float32 (decode.py's docstring): float32 out, within float32 (not
    bfloat16) rounding of the oracle, dense and sparse."""
    lengths = [70, 0, 5]
    cache_seqlens = torch.tensor(lengths, dtype=torch.int32)
    cache = torch.randn(4, 64, 1, oracle.D_QK)
    flat_keys = cache.reshape(-1, oracle.D_QK).double()
    block_table = oracle.block_table_for(lengths, 4)
    q = torch.randn(3, 2, 4, oracle.D_QK)
    out, lse = dense(q, cache, block_table, cache_seqlens, causal=True)
    assert out.dtype == torch.float32
    oracle.assert_attention_close(out, lse, *oracle.dense_decode(q, flat_keys, block_table, cache_seqlens, SCALE,
                                                                 oracle.D_V, True), out_rtol=1e-5)
    indices = sparse_indices(3, 2, 30, 4 * 64)
    out, lse = ops.sparse_decode(q, cache, indices, None, None, None, None, None, None, oracle.D_V, SCALE, False, None)
    assert out.dtype == torch.float32
    oracle.assert_attention_close(out, lse, *oracle.sparse_decode(q, flat_keys, indices, None, SCALE, oracle.D_V),
                                  out_rtol=1e-5)


def test_dense_decode_small_head_dims(device):
    """A BF16 cache does not require DeepSeek's 576/512 (the ops take d_qk from q)."""
    lengths = [70, 20]
    cache_seqlens = torch.tensor(lengths, dtype=torch.int32)
    cache, flat_keys = oracle.paged_cache(4, fp8=False, d_qk=96, device=device)
    block_table = oracle.block_table_for(lengths, 4)
    q = oracle.bf16(2, 1, 4, 96, device=device)
    out, lse = dense(q, cache, block_table, cache_seqlens, d_v=64, scale=96 ** -0.5)
    ref_out, ref_lse = oracle.dense_decode(q.cpu(), flat_keys, block_table, cache_seqlens, 96 ** -0.5, 64, False)
    oracle.assert_attention_close(out, lse, ref_out, ref_lse)


def sparse_indices(batch, s_q, topk, num_slots, invalid_fraction=0.2):
    """Random flat slots with -1s and duplicates; row (0, 0) is all -1."""
    indices = torch.randint(0, num_slots, (batch, s_q, topk), dtype=torch.int32)
    indices[torch.rand(batch, s_q, topk) < invalid_fraction] = -1
    if topk > 3:
        indices[..., 1] = indices[..., 3]  # duplicates count twice
    if batch:
        indices[0, 0] = -1
    return indices


@pytest.mark.parametrize("batch,s_q,h_q,topk,fp8,with_topk_length", [
    (3, 1, 16, 37, False, False),
    (2, 2, 128, 100, True, True),
    (2, 4, 1, 64, False, True),
    (1, 3, 16, 1, True, False),
    (0, 1, 16, 10, False, False),
])
def test_sparse_decode(device, batch, s_q, h_q, topk, fp8, with_topk_length):
    num_blocks = 4
    cache, flat_keys = oracle.paged_cache(num_blocks, fp8=fp8, pad=656 if fp8 else 0, device=device)
    indices = sparse_indices(batch, s_q, topk, num_blocks * 64)
    topk_length = torch.randint(0, topk + 1, (batch,), dtype=torch.int32) if with_topk_length else None
    q = oracle.bf16(batch, s_q, h_q, oracle.D_QK, device=device)
    out, lse = ops.sparse_decode(q, cache, indices.to(device), None if topk_length is None else topk_length.to(device),
                                 None, None, None, None, None, oracle.D_V, SCALE, fp8, None)
    ref_out, ref_lse = oracle.sparse_decode(q.cpu(), flat_keys, indices, topk_length, SCALE, oracle.D_V)
    oracle.assert_attention_close(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("fp8", [False, True])
def test_sparse_decode_extra_cache_and_sink(device, fp8):
    """extra_k_cache + extra_indices_in_kvcache + extra_topk_length share the softmax with the main cache."""
    batch, s_q, h_q, topk, extra_topk = 3, 2, 16, 50, 20
    cache, flat_keys = oracle.paged_cache(3, fp8=fp8, device=device)
    extra_cache, extra_flat_keys = oracle.paged_cache(2, fp8=fp8, pad=656 if fp8 else 576, device=device)
    indices = sparse_indices(batch, s_q, topk, 3 * 64)
    extra_indices = sparse_indices(batch, s_q, extra_topk, 2 * 64, invalid_fraction=0.1)
    extra_indices[0, 0, :5] = torch.arange(5)  # query (0, 0) sees only extra tokens
    topk_length = torch.tensor([topk, 7, 0], dtype=torch.int32)
    extra_topk_length = torch.tensor([extra_topk, 0, 13], dtype=torch.int32)
    attn_sink = torch.randn(h_q)
    q = oracle.bf16(batch, s_q, h_q, oracle.D_QK, device=device)
    out, lse = ops.sparse_decode(q, cache, indices.to(device), topk_length.to(device), extra_cache,
                                 extra_indices.to(device), extra_topk_length.to(device), None, None, oracle.D_V,
                                 SCALE, fp8, attn_sink.to(device))
    ref_out, ref_lse = oracle.sparse_decode(q.cpu(), flat_keys, indices, topk_length, SCALE, oracle.D_V,
                                            extra_flat_keys, extra_indices, extra_topk_length, attn_sink)
    oracle.assert_attention_close(out, lse, ref_out, ref_lse)
    assert torch.isfinite(lse[0, :, 0]).all(), "extra tokens alone make a query non-empty"


def sparse_decode_against_oracle(q, main, extra, fp8):
    """sparse_decode over `main` and `extra` (each: the paged cache, its flat keys, CPU indices and lengths; extra's
    lengths may be None) against the float64 oracle; returns the op's out and lse."""
    cache, flat_keys, indices, topk_length = main
    extra_cache, extra_flat_keys, extra_indices, extra_topk_length = extra
    device = q.device
    out, lse = ops.sparse_decode(q, cache, indices.to(device), topk_length.to(device), extra_cache,
                                 extra_indices.to(device), None if extra_topk_length is None else
                                 extra_topk_length.to(device), None, None, oracle.D_V, SCALE, fp8, None)
    oracle.assert_attention_close(out, lse, *oracle.sparse_decode(q.cpu(), flat_keys, indices, topk_length, SCALE,
                                                                  oracle.D_V, extra_flat_keys, extra_indices,
                                                                  extra_topk_length))
    return out, lse


@pytest.mark.parametrize("fp8", [False, True])
def test_sparse_decode_topk_lengths_outside_0_to_topk(device, fp8):
    """A topk_length (or extra_topk_length) past topk counts every index and one of 0 or below none (FlashMLA's mask
    `position >= topk_length`; a negative length is no count from the end), in the main and the extra cache: sequence
    0 sees only extra tokens, 1 every main one, 2 nothing (out 0, lse +inf), 3 both caches cut. Without
    extra_topk_length every extra index counts, whatever topk_length says."""
    batch, s_q, h_q, topk, extra_topk = 4, 2, 16, 30, 12
    cache, flat_keys = oracle.paged_cache(3, fp8=fp8, device=device)
    extra_cache, extra_flat_keys = oracle.paged_cache(2, fp8=fp8, device=device)
    indices = sparse_indices(batch, s_q, topk, 3 * 64)
    extra_indices = sparse_indices(batch, s_q, extra_topk, 2 * 64, invalid_fraction=0)
    extra_indices[0, 0, :5] = torch.arange(5)  # sparse_indices lists no token for query (0, 0)
    topk_length = torch.tensor([-3, topk + 5, -1, 7], dtype=torch.int32)
    extra_topk_length = torch.tensor([extra_topk, -100, -2, extra_topk + 1], dtype=torch.int32)
    q = oracle.bf16(batch, s_q, h_q, oracle.D_QK, device=device)
    out, lse = sparse_decode_against_oracle(q, (cache, flat_keys, indices, topk_length),
                                            (extra_cache, extra_flat_keys, extra_indices, extra_topk_length), fp8)
    assert (out[2] == 0).all() and torch.isposinf(lse[2]).all() and torch.isfinite(lse[[0, 1, 3]]).all()

    sparse_decode_against_oracle(q, (cache, flat_keys, indices, topk_length),
                                 (extra_cache, extra_flat_keys, extra_indices, None), fp8)


@pytest.mark.parametrize("fp8", [False, True])
def test_sparse_decode_reads_no_slot_it_does_not_list(device, fp8):
    """Slots no query lists hold NaN (an uninitialised cache: NaN bf16, or 0xff bytes, e4m3 and float32 NaN), block 0
    and so slot 0 among them, in both caches: queries with -1s, entries past topk_length and the extra cache's (a
    missing key's row was gathered from slot 0 and its zero weight times NaN made the reference's output NaN)."""
    batch, s_q, h_q, topk, extra_topk = 2, 2, 16, 40, 12
    cache, flat_keys = oracle.paged_cache(3, fp8=fp8, device=device)
    extra_cache, extra_flat_keys = oracle.paged_cache(2, fp8=fp8, device=device)
    for pool in (cache, extra_cache):
        pool[0] = 255 if fp8 else float("nan")
    indices = 64 + sparse_indices(batch, s_q, topk, 2 * 64)  # blocks 1 and 2 only, -1 -> 63 below
    indices[indices == 63] = -1
    extra_indices = 64 + sparse_indices(batch, s_q, extra_topk, 64)
    extra_indices[extra_indices == 63] = -1
    topk_length = torch.tensor([topk, 9], dtype=torch.int32)
    extra_topk_length = torch.tensor([5, extra_topk], dtype=torch.int32)
    indices[1, :, 9:] = 0  # past topk_length: not read
    q = oracle.bf16(batch, s_q, h_q, oracle.D_QK, device=device)
    sparse_decode_against_oracle(q, (cache, flat_keys, indices, topk_length),
                                 (extra_cache, extra_flat_keys, extra_indices, extra_topk_length), fp8)


def test_sparse_decode_matches_dense_on_the_same_tokens(device):
    """Sparse decode listing every token of a sequence (in shuffled order) equals dense decode over it."""
    lengths = [100, 40]
    cache_seqlens = torch.tensor(lengths, dtype=torch.int32)
    cache, _ = oracle.paged_cache(4, fp8=False, device=device)
    block_table = oracle.block_table_for(lengths, 4)
    q = oracle.bf16(2, 1, 16, oracle.D_QK, device=device)
    indices = torch.full((2, 1, 128), -1, dtype=torch.int32)
    for b, length in enumerate(lengths):
        slots = [int(block_table[b, t // 64]) * 64 + t % 64 for t in range(length)]
        indices[b, 0, :length] = torch.tensor(slots, dtype=torch.int32)[torch.randperm(length)]
    out_sparse, lse_sparse = ops.sparse_decode(q, cache, indices.to(device), None, None, None, None, None, None,
                                               oracle.D_V, SCALE, False, None)
    out_dense, lse_dense = dense(q, cache, block_table, cache_seqlens)
    assert (out_sparse.double() - out_dense.double()).norm() / out_dense.double().norm() < 1e-2
    assert (lse_sparse - lse_dense).abs().max() < 1e-4


def test_sparse_decode_reference_is_exactly_dense_over_every_token():
    """The reference attends over a selection in one canonical order and width: whatever order the indexer ranked the
    tokens in and however many -1s pad it (topk 100 to 192), listing every token of a sequence computes dense decode's
    numbers bit for bit (blocks in position order). A matmul's rounding depends on its shape and MKL's thread split."""
    lengths = [33, 64, 100]
    cache, _ = oracle.paged_cache(6, fp8=False)
    block_table = torch.arange(6, dtype=torch.int32).view(3, 2)
    cache_seqlens = torch.tensor(lengths, dtype=torch.int32)
    q = oracle.bf16(3, 1, 16, oracle.D_QK)
    out_dense, lse_dense = dense(q, cache, block_table, cache_seqlens)
    for topk in (100, 128, 192):
        indices = torch.full((3, 1, topk), -1, dtype=torch.int32)
        for b, length in enumerate(lengths):
            indices[b, 0, torch.randperm(topk)[:length]] = (b * 128 + torch.randperm(length)).int()
        out, lse = ops.sparse_decode(q, cache, indices, None, None, None, None, None, None, oracle.D_V, SCALE, False,
                                     None)
        assert torch.equal(out, out_dense) and torch.equal(lse, lse_dense), topk


def test_cuda_split_policy_fills_the_gpu_from_shapes_alone(monkeypatch):
    """csrc/dense_decode.cu runs one CTA per SM: splits fill a 132-SM GPU when the row tiles alone do not, never
    below 2 blocks per split of the longest sequence the block table holds, and one split once the tiles fill it."""
    from types import SimpleNamespace

    from flashmla_ops.decode import cuda_num_splits

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=132))
    assert cuda_num_splits("cuda", 128, 16, 64) == 1  # b128 h16: 128 CTAs already
    assert cuda_num_splits("cuda", 128, 128, 64) == 1  # two row tiles each: 256 CTAs
    assert cuda_num_splits("cuda", 1, 128, 512) == 66  # b1 h128 32k: 2 row tiles x 66 splits = 132 CTAs
    assert cuda_num_splits("cuda", 8, 16, 512) == 16  # b8 h16 32k: 128 CTAs
    assert cuda_num_splits("cuda", 1, 16, 8) == 4  # short table: at least 2 blocks per split
    assert cuda_num_splits("cuda", 1, 16, 3) == 1
    assert cuda_num_splits("cuda", 0, 16, 64) >= 1  # empty batch: a valid launch shape, nothing runs


def test_cuda_dense_kernel_choice(monkeypatch):
    """Up to 16 query rows (s_q * h_q) run the narrow kernel, more the wide one; FLASHMLA_DECODE_KERNEL=wide keeps
    every shape on the wide kernel, empty is unset and any other value is refused."""
    from flashmla_ops.decode import DECODE_KERNEL_ENV, cuda_dense_kernel

    monkeypatch.delenv(DECODE_KERNEL_ENV, raising=False)
    assert [cuda_dense_kernel(rows) for rows in (1, 16, 17, 32, 128)] == ["narrow"] * 2 + ["wide"] * 3
    monkeypatch.setenv(DECODE_KERNEL_ENV, "")  # empty: unset (an env file's `FLASHMLA_DECODE_KERNEL=` raised)
    assert cuda_dense_kernel(16) == "narrow"
    monkeypatch.setenv(DECODE_KERNEL_ENV, "wide")
    assert cuda_dense_kernel(16) == "wide"
    monkeypatch.setenv(DECODE_KERNEL_ENV, "narrow")
    with pytest.raises(ValueError, match=DECODE_KERNEL_ENV):
        cuda_dense_kernel(16)


def test_key_widths_counts_the_widest_row_of_each_leading_index():
    """The sparse references' key widths: per tensor and leading index, the most valid entries of any row, for
    (n, topk) and (n, s_q, topk) validity masks and empty ones (width topk)."""
    from flashmla_ops.decode import key_widths

    flat = torch.tensor([[True, False, True, False], [False, False, False, False]])
    nested = torch.tensor([[[True, True, False], [True, False, False]], [[False, False, True], [True, True, True]]])
    empty = torch.zeros(0, 2, 5, dtype=torch.bool)
    assert key_widths(flat, nested, empty) == [[2, 0], [2, 3], []]


@pytest.mark.parametrize("fp8", [False, True])
def test_dense_reference_captures_without_a_host_sync(monkeypatch, fp8):
    """While a CUDA graph is captured (pretended: no GPU here) the dense reference, which runs float32 decode (the
    fp32 cache of a compiled float32 model) and shapes the kernels decline on a GPU, must neither sync with the host
    nor size anything by the lengths: it read them with tolist(), which a capture refuses (the compiled step's CUDA
    graph failed), and the graph is replayed for other lengths. It attends over every block of the table, masked on
    the device: FakeTensors (no values to read) trace it, and on real tensors it computes the lengths' numbers, with
    NaN blocks behind the unused table entries (-1, past the cache) and the rows past each length."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

    from flashmla_ops import decode

    cache, _ = oracle.paged_cache(5, fp8=fp8)
    cache[3:] = 255 if fp8 else float("nan")  # e4m3 NaN bytes and NaN scales
    cache_seqlens = torch.tensor([0, 70, 5], dtype=torch.int32)
    block_table = torch.tensor([[3, -1, 99], [0, 1, 3], [2, 4, -1]], dtype=torch.int32)
    q = oracle.bf16(3, 2, 4, oracle.D_QK).float()
    for causal in (False, True):
        args = (q, cache, block_table, cache_seqlens, oracle.D_V, SCALE, causal, fp8, torch.randn(4))
        want_out, want_lse = decode.dense_decode_reference(*args)
        with FakeTensorMode() as mode, pytest.raises(DataDependentOutputException):
            decode.dense_decode_reference(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
        with monkeypatch.context() as patch:
            patch.setattr(decode, "capturing", lambda t: True, raising=False)
            with FakeTensorMode() as mode:
                decode.dense_decode_reference(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                                for a in args))
            out, lse = decode.dense_decode_reference(*args)
        assert torch.equal(torch.isinf(lse), torch.isinf(want_lse)) and not out.isnan().any()
        assert torch.allclose(out, want_out, rtol=1e-5, atol=1e-6)
        assert torch.allclose(lse[torch.isfinite(lse)], want_lse[torch.isfinite(want_lse)], rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_float32_dense_decode_replays_in_cuda_graph(reference_runs):
    """float32 dense decode (the reference: no kernel takes float32) captured in a CUDA graph, then replayed after
    cache_seqlens changed in place, gives the reference's output at the new lengths (it called tolist(): the capture
    raised)."""
    lengths = [300, 70]
    cache, _ = oracle.paged_cache(8, fp8=False, device="cuda")
    cache = cache.float()
    block_table = oracle.block_table_for(lengths, 8, max_blocks_per_seq=6).cuda()
    cache_seqlens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    q = oracle.bf16(2, 1, 16, oracle.D_QK, device="cuda").float()
    args = (q, cache, block_table, cache_seqlens, None, None, oracle.D_V, SCALE, False, False, None)
    ops.dense_decode(*args)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = ops.dense_decode(*args)
    cache_seqlens.copy_(torch.tensor([5, 128], device="cuda"))  # within the blocks each sequence holds
    graph.replay()
    torch.cuda.synchronize()
    want_out, want_lse = dense(q, cache, block_table, cache_seqlens)
    assert reference_runs
    assert torch.allclose(out, want_out, rtol=1e-5, atol=1e-6) and torch.allclose(lse, want_lse, rtol=1e-6, atol=1e-6)
