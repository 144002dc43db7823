"""Triton kernels past int32 offsets: rows whose index times their stride passes 2**31 elements (a long prompt
continued through the decode path: s_q * h_q * 576 >= 2**31 from 29k tokens at h_q 128), against the reference.

On any device (the CPU under Triton's interpreter too) q is a view whose query stride S < 2**31 puts query 2 at
2 S = 2**31 + 128 elements, over a buffer that holds q from element 2**31 on: the address such an offset wraps to in
int32 (element 128) lies inside the buffer, which holds poison there, so a kernel that wraps reads it instead of
failing on an unmapped page. The buffer is 8 GiB of address space (4 GiB of bytes for e4m3 q), of which only q's rows
and the poison are touched. The outputs the kernels allocate themselves (out, partials, the experts' hidden rows) need
that many real rows: those tests are marked gpu, sized at the smallest such shape, and compare the rows past the
boundary (and the first) with the reference, every output poisoned first.
"""
import pytest
import torch

triton_decode = pytest.importorskip("flashmla_ops.triton.decode", exc_type=ImportError)
from decode_inputs import (DEVICE, assert_decode_close, make_inputs, paged_cache, poison_next_blocks,  # noqa: E402
                           poisoned, random_indices)
from test_triton_indexer import assert_logits_close, prefill_inputs  # noqa: E402

from flashmla_ops import reference  # noqa: E402
from flashmla_ops.kv_cache import D_QK, KV_LORA_RANK, PAGE_BLOCK_SIZE  # noqa: E402
from flashmla_ops.triton import indexer as triton_indexer  # noqa: E402
from flashmla_ops.triton import moe as triton_moe  # noqa: E402
from flashmla_ops.triton import sparse as triton_sparse  # noqa: E402

NEEDS_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
QUERY_STRIDE = 2 ** 30 + 64  # elements between queries: a multiple of 8 (16-byte rows), below 2**31
BASE = 2 ** 31  # q's first element in the buffer: 2 QUERY_STRIDE wrapped to int32 lands on element 128
POISON = 4096  # elements at the buffer's start filled with poison


def far_apart_rows(rows: torch.Tensor, poison) -> torch.Tensor:
    """`rows` (n, ...) with n <= 3, as a view whose rows lie QUERY_STRIDE elements apart from element BASE of a buffer
    whose first POISON elements hold `poison`: row 2 starts 2**31 + 128 elements in. Skips where the buffer's address
    space is refused."""
    n, inner = rows.shape[0], rows[0].numel()
    try:
        buffer = torch.empty(BASE + (n - 1) * QUERY_STRIDE + inner, dtype=rows.dtype, device=rows.device)
    except (RuntimeError, MemoryError) as error:  # a host or GPU without 8 GiB of address space to give
        pytest.skip(f"cannot allocate the sparse buffer: {error}")
    buffer[:POISON].view(torch.uint8).fill_(poison)
    view = buffer.as_strided(rows.shape, (QUERY_STRIDE, *rows[0].stride()), BASE)
    view.copy_(rows)
    return view


def test_wide_rows_from_int32_offsets():
    """The dense decode takes int64 rows where a row offset can pass int32: q's 576-wide rows from 3,728,271 rows a
    sequence (29128 queries at h_q 128), or a view's rows QUERY_STRIDE apart."""
    assert not triton_decode.wide_rows(3728270, D_QK, KV_LORA_RANK)
    assert triton_decode.wide_rows(3728271, D_QK, KV_LORA_RANK)
    assert not triton_decode.wide_rows(128 * 29127, D_QK) and triton_decode.wide_rows(128 * 29128, D_QK)
    assert triton_decode.wide_rows(3, QUERY_STRIDE, KV_LORA_RANK)


@pytest.mark.parametrize("is_fp8,whole", [(False, False), (False, True), (True, False)])
def test_triton_dense_decode_queries_past_int32_offsets(is_fp8, whole):
    """Dense decode (causal, s_q 3, h_q 1) over q whose third query starts 2**31 + 128 elements in: its rows read at
    int32 offsets wrapped to the poison (NaN). The four-tile loop and the whole-latent one (LaunchConfig.whole)."""
    generator = torch.Generator(DEVICE).manual_seed(31 + is_fp8 + 2 * whole)
    q, cache, block_table, cache_seqlens = make_inputs([70, 130], 3, 1, is_fp8, generator)
    q = far_apart_rows(q[1], 255)[None]  # (1, 3, 1, 576), its queries QUERY_STRIDE apart
    block_table, cache_seqlens = block_table[1:], cache_seqlens[1:]
    config = (triton_decode.LaunchConfig(block_h=16, block_n=32, num_warps=4, num_stages=2, programs_per_sm=1,
                                         whole=True) if whole else None)
    args = (q, cache, block_table, cache_seqlens, KV_LORA_RANK, D_QK ** -0.5, True, is_fp8)
    out, lse = poisoned(triton_decode.dense_decode, *args, config=config)
    assert_decode_close(out, lse, *reference.dense_decode(q.contiguous(), *args[1:]))


@pytest.mark.parametrize("is_fp8", [False, True])
def test_triton_sparse_decode_queries_past_int32_offsets(is_fp8):
    """Sparse decode (s_q 3, h_q 2) over q whose third query starts 2**31 + 128 elements in (poison: NaN)."""
    generator = torch.Generator(DEVICE).manual_seed(41 + is_fp8)
    cache = paged_cache(3, is_fp8, generator, pad=32)
    queries = torch.randn(3, 2, D_QK, generator=generator, device=DEVICE).to(torch.bfloat16)
    q = far_apart_rows(queries, 255)[None]  # (1, 3, 2, 576)
    indices = random_indices((1, 3, 70), 3 * PAGE_BLOCK_SIZE, generator, invalid_fraction=0.1)
    indices[0, 0] = torch.arange(70, device=DEVICE)  # random_indices empties the first query: give it keys
    args = (q, cache, indices, None, None, None, None, KV_LORA_RANK, D_QK ** -0.5, is_fp8)
    out, lse = poisoned(triton_sparse.sparse_decode, *args)
    assert_decode_close(out, lse, *reference.sparse_decode(q.contiguous(), *args[1:]))


def test_triton_indexer_logits_queries_past_int32_offsets():
    """Indexer logits of e4m3 q (s_q 3, h_i 2, d_i 16) whose third query starts 2**31 + 128 bytes in (poison: 448,
    e4m3's largest, which relu keeps where a NaN would read as 0)."""
    generator = torch.Generator().manual_seed(51)
    q, k, weights, k_start, k_end, q_scale, k_scale = prefill_inputs(3, 40, 2, 16, True, True, generator)
    q = far_apart_rows(q, 0x7E)
    args = (q, k, weights, k_start, k_end, q_scale, k_scale)
    assert_logits_close(poisoned(lambda *a: (triton_indexer.indexer_logits(*a),), *args)[0],
                        reference.indexer_logits(q.contiguous(), *args[1:]))


# ---------------------------------------------------------------- outputs past int32 (GPU: gigabytes of rows)
# The outputs go over NaN bytes by decode_inputs.poison_next_blocks of their sizes alone: `poisoned` would also take
# four blocks of each size and one of sixteen times their sum, too much at these sizes.

# s_q * h_q = 4,194,432 rows of one sequence: q's row offsets (576 apart) pass int32 from row 3,728,271, out's and the
# partials' (512 apart) from row 4,194,305
WIDE_S_Q, WIDE_H_Q = 2 ** 15 + 1, 128
CHECKED_QUERIES = [0, 29128, WIDE_S_Q - 1]


@pytest.mark.parametrize("is_fp8,schedule", [(False, "uniform"), (True, "uniform"), (False, "balanced")])
@pytest.mark.gpu
@NEEDS_GPU
def test_triton_dense_decode_gpu_rows_past_int32_offsets(is_fp8, schedule):
    """Dense decode of one sequence of 32769 queries x 128 heads (not causal, 64 tokens: the reference's work is the
    checked queries'), outputs and the balanced schedule's partials over NaN bytes: every row written and finite,
    the first, the first past q's int32 offsets and the last against the reference."""
    generator = torch.Generator(DEVICE).manual_seed(61 + is_fp8)
    _, cache, block_table, cache_seqlens = make_inputs([64], 1, 1, is_fp8, generator)
    q = torch.randn(1, WIDE_S_Q, WIDE_H_Q, D_QK, generator=generator, device=DEVICE, dtype=torch.bfloat16)
    rows = WIDE_S_Q * WIDE_H_Q
    assert triton_decode.wide_rows(rows, D_QK, KV_LORA_RANK)
    config = (triton_decode.LaunchConfig(block_h=64, block_n=64, num_warps=8, num_stages=2, programs_per_sm=1,
                                         schedule="balanced") if schedule == "balanced" else None)
    # out, then the balanced schedule's partials (two slots: one sequence, one part) and their LSEs
    poison_next_blocks(rows * KV_LORA_RANK * 2, *([2 * rows * KV_LORA_RANK * 4] if config else []))
    args = (q, cache, block_table, cache_seqlens, KV_LORA_RANK, D_QK ** -0.5, False, is_fp8)
    out, lse = triton_decode.dense_decode(*args, config=config)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    want_out, want_lse = reference.dense_decode(q[:, CHECKED_QUERIES], *args[1:])
    assert_decode_close(out[:, CHECKED_QUERIES], lse[:, :, CHECKED_QUERIES], want_out, want_lse)


@pytest.mark.parametrize("half", [False, True])
@pytest.mark.gpu
@NEEDS_GPU
def test_triton_combine_gpu_rows_past_int32_offsets(half):
    """The combine of a uniform split in two (_combine_few_kernel; _combine_kernel's rows are the balanced dense
    decode test's) over 4,194,432 rows of one sequence, float32 and f16 partials: out and lse NaN before, every row
    written, the rows around 2**22 and the last the partials' LSE-weighted sum."""
    num_splits, rows = 2, WIDE_S_Q * WIDE_H_Q
    out = torch.full((1, WIDE_S_Q, WIDE_H_Q, KV_LORA_RANK), float("nan"), dtype=torch.bfloat16, device="cuda")
    lse = torch.full((1, WIDE_H_Q, WIDE_S_Q), float("nan"), dtype=torch.float32, device="cuda")
    partials = triton_decode.Partials.empty(out, 1, num_splits, half=half)
    # split s's row r: (r % 251 + s) / 256 in every column, LSE s / 4 (base 2), scale 1 (f16 partials' own)
    if half:
        partials.scale.fill_(1.0)
    row_values = (torch.arange(rows, device="cuda") % 251).float()
    for split in range(num_splits):
        partials.out[0, split] = ((row_values + split) / 256)[:, None].to(partials.out.dtype)
        partials.lse[0, split] = split / 4
    triton_decode.combine(partials, None, out, lse)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    weights = 2.0 ** (torch.arange(num_splits, device="cuda") / 4)
    checked = torch.tensor([0, 2 ** 22 - 1, 2 ** 22, 2 ** 22 + 1, rows - 1], device="cuda")
    want = ((row_values[checked, None] + torch.arange(num_splits, device="cuda")) / 256 * weights).sum(1)
    want = want / weights.sum()
    got = out.view(rows, KV_LORA_RANK)[checked].float()
    assert torch.allclose(got, want[:, None].expand_as(got), rtol=1e-2, atol=1e-3)


@pytest.mark.gpu
@NEEDS_GPU
def test_triton_sparse_decode_gpu_rows_past_int32_offsets():
    """Sparse decode of one sequence of 32769 queries x 128 heads (64 indices each), out over NaN bytes: every row
    written, the first, the first past q's int32 offsets and the last query against the reference."""
    generator = torch.Generator(DEVICE).manual_seed(71)
    cache = paged_cache(3, False, generator, pad=32)
    q = torch.randn(1, WIDE_S_Q, WIDE_H_Q, D_QK, generator=generator, device=DEVICE, dtype=torch.bfloat16)
    indices = torch.randint(0, 3 * PAGE_BLOCK_SIZE, (1, WIDE_S_Q, 64), generator=generator, device=DEVICE,
                            dtype=torch.int32)
    poison_next_blocks(WIDE_S_Q * WIDE_H_Q * KV_LORA_RANK * 2)
    args = (cache, indices, None, None, None, None, KV_LORA_RANK, D_QK ** -0.5, False)
    out, lse = triton_sparse.sparse_decode(q, *args)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    want_out, want_lse = reference.sparse_decode(q[:, CHECKED_QUERIES], cache, indices[:, CHECKED_QUERIES], *args[2:])
    assert_decode_close(out[:, CHECKED_QUERIES], lse[:, :, CHECKED_QUERIES], want_out, want_lse)


@pytest.mark.gpu
@NEEDS_GPU
def test_triton_routed_experts_gpu_hidden_rows_past_int32_offsets():
    """The routed experts over 16385 tokens x 8 choices x inter 16384: the hidden rows (float32, over NaN bytes) of
    the choices from 131072 on start past 2**31 elements; the last tokens' outputs against the reference."""
    tokens, top_k, inter, hidden, num_experts = 16385, 8, 16384, 16, 2
    generator = torch.Generator("cuda").manual_seed(81)
    x = torch.randn(tokens, hidden, generator=generator, device="cuda").bfloat16()
    gate_up = (torch.randn(num_experts, 2 * inter, hidden, generator=generator, device="cuda") / 4).bfloat16()
    down = (torch.randn(num_experts, hidden, inter, generator=generator, device="cuda") / 64).bfloat16()
    weights = torch.rand(tokens, top_k, generator=generator, device="cuda")
    experts = torch.randint(0, num_experts, (tokens, top_k), generator=generator, device="cuda")
    assert tokens * top_k * inter > 2 ** 31
    poison_next_blocks(tokens * top_k * inter * 4)
    out = triton_moe.routed_experts(x, gate_up, down, weights, experts)
    assert torch.isfinite(out).all()
    last = slice(tokens - 2, tokens)
    want = reference.routed_experts(x[last], gate_up, down, weights[last], experts[last])
    assert torch.allclose(out[last].float(), want.float(), rtol=2e-2, atol=1e-3)
