"""The sm_90a sparse prefill (csrc/dense_decode.cu's gathering mode over a flat kv) against the reference, on Hopper:
varlen-packed batches of 1..3 sequences, h_q 16 / 64 / 128 / 5 / 96 / 256, topk not a multiple of 64, -1 indices,
indices >= s_kv, duplicates, an all -1 query, topk_length (0 included); out, max_logits and lse compared; outputs
poisoned; repeated runs identical; the op dispatches here, chunks more than CUDA_MAX_TOKENS queries, and replays in a
CUDA graph."""
import pytest
import torch
from decode_inputs import HOPPER, LSE_TOLERANCE, SCALE, assert_close, packed_prefill_inputs, poisoned

import flashmla_ops
from flashmla_ops import _ext, reference, sparse_prefill
from flashmla_ops.kv_cache import D_QK, KV_LORA_RANK

DEVICE = "cuda"
pytestmark = [
    pytest.mark.gpu,
    HOPPER,
]

# (seq_lens, h_q, topk, with_topk_length)
CASES = [
    ([700, 300, 24], 16, 2048, False),
    ([500, 77], 64, 1000, True),
    ([256, 256], 128, 2048, False),
    ([129, 60], 128, 64, True),
    ([1000], 64, 2000, True),
    ([1], 128, 64, False),
    ([3, 9], 5, 130, True),
    ([100, 31], 256, 200, True),  # four 64-head row blocks of one query
    ([77, 5], 96, 130, True),  # two 64-head row blocks of one query, the second partly past h_q
]


def assert_stats_close(name, value, want):
    assert value.shape == want.shape and value.dtype == torch.float32, name
    assert torch.equal(torch.isinf(value), torch.isinf(want)) and not torch.isnan(value).any(), name
    assert torch.equal(value > 0, want > 0), name  # the signs of the infinities
    finite = torch.isfinite(want)
    assert torch.allclose(value[finite], want[finite], atol=LSE_TOLERANCE, rtol=0), \
        (name, (value - want)[finite].abs().max())


def inputs(seq_lens, h_q, topk, with_topk_length):
    generator = torch.Generator(DEVICE).manual_seed(sum(seq_lens) * 31 + h_q * 7 + topk)
    q, kv, indices, topk_length = packed_prefill_inputs(seq_lens, h_q, topk, with_topk_length, generator)
    if topk_length is not None:
        topk_length[0] = 0
    return q, kv, indices, topk_length


def check(got, q, kv, indices, topk_length):
    want = reference.sparse_prefill(q, kv, indices, SCALE, KV_LORA_RANK, None, topk_length, 0)
    assert_close(got[0], got[2], want[0], want[2])
    assert_stats_close("max_logits", got[1], want[1])
    empty = min(1, q.shape[0] - 1)  # packed_prefill_inputs gives this query no valid index
    assert torch.all(got[0][empty] == 0) and torch.all(torch.isposinf(got[2][empty]))


@pytest.mark.parametrize("seq_lens,h_q,topk,with_topk_length", CASES)
def test_cuda_sparse_prefill_matches_reference(seq_lens, h_q, topk, with_topk_length):
    q, kv, indices, topk_length = inputs(seq_lens, h_q, topk, with_topk_length)
    extension = _ext.kernels("sparse_prefill", DEVICE)
    assert extension is not None
    got = poisoned(extension.sparse_prefill, q, kv, indices, topk_length, SCALE)
    check(got, q, kv, indices, topk_length)
    again = extension.sparse_prefill(q, kv, indices, topk_length, SCALE)
    assert all(torch.equal(a, b) for a, b in zip(got, again))


def test_cuda_sparse_prefill_strided_inputs_and_empty_kv():
    q, kv, indices, topk_length = inputs([200, 50], 64, 256, True)
    wide_q = torch.zeros(q.shape[0], 80, D_QK + 64, dtype=q.dtype, device=DEVICE)
    wide_q[:, :64, :D_QK] = q
    wide_kv = torch.zeros(kv.shape[0], 1, D_QK + 128, dtype=kv.dtype, device=DEVICE)
    wide_kv[..., :D_QK] = kv
    q, kv = wide_q[:, :64, :D_QK], wide_kv[..., :D_QK]
    got = torch.ops.flashmla.sparse_prefill(q, kv, indices, SCALE, KV_LORA_RANK, None, topk_length, 0)
    check(got, q, kv, indices, topk_length)
    # Index rows with a non-unit stride and a strided topk_length: the op hands the kernel contiguous copies.
    strided_indices = indices.transpose(0, 2).contiguous().transpose(0, 2)
    strided_length = torch.stack([topk_length, topk_length], 1)[:, 0]
    assert strided_indices.stride(-1) != 1 and not strided_length.is_contiguous()
    got = torch.ops.flashmla.sparse_prefill(q, kv, strided_indices, SCALE, KV_LORA_RANK, None, strided_length, 0)
    check(got, q, kv, indices, topk_length)
    empty_kv = kv[:0]  # s_kv = 0: every index is invalid
    out, max_logits, lse, _ = torch.ops.flashmla.sparse_prefill(q, empty_kv, indices, SCALE, KV_LORA_RANK, None,
                                                                  None, 0)
    assert torch.all(out == 0) and torch.all(torch.isposinf(lse)) and torch.all(torch.isneginf(max_logits))
    none = torch.ops.flashmla.sparse_prefill(q[:0], kv, indices[:0], SCALE, KV_LORA_RANK, None, None, 0)
    assert [tuple(t.shape) for t in none[:3]] == [(0, 64, KV_LORA_RANK), (0, 64), (0, 64)]


def test_sparse_prefill_op_uses_cuda_and_chunks_long_batches(monkeypatch, cuda_calls):
    assert flashmla_ops.backend("sparse_prefill", DEVICE) == "cuda"
    q, kv, indices, topk_length = inputs([300, 130], 128, 512, True)
    monkeypatch.setattr(sparse_prefill, "CUDA_MAX_TOKENS", 100)  # five launches, each into the whole outputs
    got = torch.ops.flashmla.sparse_prefill(q, kv, indices, SCALE, KV_LORA_RANK, None, topk_length, 0)
    assert cuda_calls.count("sparse_prefill") == 5
    assert got[3].numel() == 0
    check(got, q, kv, indices, topk_length)


def test_cuda_sparse_prefill_op_replays_in_cuda_graph(cuda_calls):
    q, kv, indices, topk_length = inputs([400, 100], 64, 1024, True)
    call = lambda: torch.ops.flashmla.sparse_prefill(q, kv, indices, SCALE, KV_LORA_RANK, None,  # noqa: E731
                                                     topk_length, 0)
    call()
    cuda_calls.clear()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = call()
    assert "sparse_prefill" in cuda_calls  # the CUDA kernel was captured (the reference would replay too)
    generator = torch.Generator(DEVICE).manual_seed(3)
    indices.copy_(indices[torch.randperm(indices.shape[0], generator=generator, device=DEVICE)])  # new index values
    indices[1] = -1  # keep query 1 without a valid index
    topk_length.fill_(700)
    graph.replay()
    torch.cuda.synchronize()
    check(got, q, kv, indices, topk_length)
