"""Sparse MLA prefill (DeepSeek Sparse Attention): every query attends to its own `topk` rows of `kv`.

Batches are packed along `s_q` and `s_kv` (varlen): indices of one sequence's queries point at that sequence's
rows of the packed `kv`, so one call serves the whole batch.
"""
import torch

from . import _ext
from ._attention import apply_attn_sink, attend
from ._checks import (FLOAT_DTYPES, check, check_contiguous_last_dim, check_finite_scale, check_same_device,
                      check_tensor, contiguous_or_none, last_dim_contiguous, value_checks_apply)
from .decode import INDEX_DTYPES, TOKENS_PER_CHUNK, _within_length, canonical_order, key_widths, masked_keys
from .kv_cache import D_QK, KV_LORA_RANK


def _check_sparse_prefill(op, q, kv, indices, d_v, attn_sink, topk_length, indexer_topk):
    dims = {}
    check_tensor(op, "q", q, FLOAT_DTYPES, ("s_q", "h_q", "d_qk"), dims)
    if isinstance(kv, torch.Tensor) and kv.dim() == 3 and kv.shape[1] != 1:
        raise ValueError(f"{op}: kv must have h_kv = 1 (MQA over the latent), got {kv.shape[1]} in shape "
                         f"{tuple(kv.shape)}")
    check_tensor(op, "kv", kv, (q.dtype,), ("s_kv", 1, "d_qk"), dims, dtype_from="q")
    check_tensor(op, "indices", indices, INDEX_DTYPES, ("s_q", 1, "topk"), dims)
    check_contiguous_last_dim(op, "q", q)
    check_contiguous_last_dim(op, "kv", kv)
    if not 0 < d_v <= dims["d_qk"]:
        raise ValueError(f"{op}: d_v must be in [1, d_qk={dims['d_qk']}], got {d_v}")
    if attn_sink is not None:
        check_tensor(op, "attn_sink", attn_sink, (torch.float32,), ("h_q",), dims)
    if topk_length is not None:
        check_tensor(op, "topk_length", topk_length, INDEX_DTYPES, ("s_q",), dims)
    if indexer_topk < 0:
        raise ValueError(f"{op}: indexer_topk must be >= 0, got {indexer_topk}")
    check_same_device(op, q=q, kv=kv, indices=indices, attn_sink=attn_sink, topk_length=topk_length)
    if value_checks_apply(indices):
        # entries past a query's topk_length do not count (no kernel reads them) and may hold anything
        bad = (indices < -1) & _within_length(indices, topk_length)
        check(op, ~bad, f"indices must be >= -1 (-1 or >= s_kv mean 'no token'), got {indices[bad][:8].tolist()}")


def sparse_prefill_reference(q, kv, indices, sm_scale, d_v=512, attn_sink=None, topk_length=None, indexer_topk=0):
    s_q, h_q, d_qk = q.shape
    s_kv, topk = kv.shape[0], indices.shape[-1]
    out = q.new_empty(s_q, h_q, d_v, dtype=q.dtype)
    max_logits = q.new_empty(s_q, h_q, dtype=torch.float32)
    lse = q.new_empty(s_q, h_q, dtype=torch.float32)
    lse_indexer = q.new_empty(s_q, h_q, dtype=torch.float32) if indexer_topk else q.new_empty(0, dtype=torch.float32)
    position = torch.arange(topk, device=q.device)
    kv_rows = kv[:, 0] if s_kv else kv.new_zeros(1, d_qk)  # with s_kv == 0 every index is invalid (masked)
    all_valid = (indices[:, 0] >= 0) & (indices[:, 0] < s_kv)
    if topk_length is not None:
        all_valid &= position < topk_length[:, None]
    # keys in canonical_order: the numbers do not depend on topk's padding or order
    width = key_widths(all_valid[None])[0][0]
    chunk = max(1, TOKENS_PER_CHUNK // max(1, width * d_qk))
    for start in range(0, s_q, chunk):
        rows = slice(start, start + chunk)
        idx, valid = indices[rows, 0], all_valid[rows]
        order = canonical_order(idx, valid, width)
        in_indexer = (valid & (position < indexer_topk)).gather(-1, order)
        idx, valid = idx.gather(-1, order), valid.gather(-1, order)
        keys = masked_keys(kv_rows[torch.where(valid, idx, 0).long()], valid)
        out_c, lse_c, max_c = attend(q[rows], keys, valid, sm_scale, d_v)
        out[rows] = apply_attn_sink(out_c, lse_c, attn_sink).to(q.dtype)
        lse[rows], max_logits[rows] = lse_c, max_c
        if indexer_topk:
            lse_indexer[rows] = attend(q[rows], keys, in_indexer, sm_scale, d_v)[1]
    return out, max_logits, lse, lse_indexer


def sparse_prefill_path(q: torch.Tensor, kv: torch.Tensor, d_v: int, indexer_topk: int = 0) -> str:
    """The path `flashmla::sparse_prefill` takes for this q and kv: 'cuda' (csrc/dense_decode.cu's sparse prefill;
    not with indexer_topk), 'triton' or 'reference'."""
    for path in _ext.paths("sparse_prefill", q.device):
        if path == "cuda" and indexer_topk == 0 and _cuda_supports(q, kv, d_v):
            return "cuda"
        if path == "triton":
            from .triton import sparse as triton_sparse

            if triton_sparse.supports_prefill(q, kv, d_v):
                return "triton"
    return "reference"


@torch.library.custom_op("flashmla::sparse_prefill", mutates_args=())
def sparse_prefill(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float, d_v: int,
                   attn_sink: torch.Tensor | None, topk_length: torch.Tensor | None,
                   indexer_topk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q `(s_q, h_q, d_qk)`, kv `(s_kv, 1, d_qk)` bfloat16 (or both float32: the reference, float32 out);
    indices `(s_q, 1, topk)` int32 rows of kv (-1 or >= s_kv: no token); only the first `topk_length[t]` count
    (past topk: all; <= 0: none).

    Returns out `(s_q, h_q, d_v)` bfloat16; max_logits and lse `(s_q, h_q)` float32 (scaled logits, natural log;
    -inf / +inf and out = 0 for a query with no valid index); lse_indexer `(s_q, h_q)`, the LSE over the first
    `indexer_topk` indices, or an empty tensor when `indexer_topk == 0`.
    """
    _check_sparse_prefill("sparse_prefill", q, kv, indices, d_v, attn_sink, topk_length, indexer_topk)
    check_finite_scale("sparse_prefill", "sm_scale", sm_scale)
    path = sparse_prefill_path(q, kv, d_v, indexer_topk)
    if path == "cuda":
        return _cuda_sparse_prefill(q, kv, indices, sm_scale, topk_length, attn_sink)
    if path == "triton":
        from .triton import sparse as triton_sparse

        return triton_sparse.sparse_prefill(q, kv, indices, sm_scale, d_v, attn_sink, topk_length, indexer_topk)
    _ext.reference_fallback("sparse_prefill", q.device)
    return sparse_prefill_reference(q, kv, indices, sm_scale, d_v, attn_sink, topk_length, indexer_topk)


CUDA_MAX_TOKENS = 65535  # query tokens per launch of csrc/dense_decode.cu's sparse prefill (grid z)


def _cuda_supports(q, kv, d_v) -> bool:
    """The shapes csrc/dense_decode.cu's sparse prefill is written for: bf16, d_qk 576 / d_v 512, 16-byte aligned
    rows; indexer_topk goes to the next path (an attention sink too: the kernel scales each row before its store)."""
    return (q.dtype == torch.bfloat16 and q.shape[-1] == D_QK and d_v == KV_LORA_RANK
            and all(stride % 8 == 0 for stride in q.stride()[:2]) and kv.stride(0) % 8 == 0
            and q.data_ptr() % 16 == 0 and kv.data_ptr() % 16 == 0)


def _cuda_sparse_prefill(q, kv, indices, sm_scale, topk_length, attn_sink):
    ext, s_q = _ext.extension(), q.shape[0]
    # the kernel reads unit-stride index rows, a contiguous topk_length and sinks
    indices = last_dim_contiguous(indices)
    topk_length, attn_sink = contiguous_or_none(topk_length), contiguous_or_none(attn_sink)

    def part(start):
        stop = start + CUDA_MAX_TOKENS
        return ext.sparse_prefill(q[start:stop], kv, indices[start:stop],
                                  None if topk_length is None else topk_length[start:stop], sm_scale, attn_sink)

    if s_q <= CUDA_MAX_TOKENS:
        out, max_logits, lse = part(0)
    else:  # each launch's outputs into the whole ones as it ends: at most one part's outputs besides them
        h_q = q.shape[1]
        out = q.new_empty(s_q, h_q, KV_LORA_RANK)
        max_logits, lse = (q.new_empty(s_q, h_q, dtype=torch.float32) for _ in range(2))
        for start in range(0, s_q, CUDA_MAX_TOKENS):
            for whole, piece in zip((out, max_logits, lse), part(start)):
                whole[start:start + piece.shape[0]] = piece
    return out, max_logits, lse, q.new_empty(0, dtype=torch.float32)


@sparse_prefill.register_fake
def _(q, kv, indices, sm_scale, d_v, attn_sink, topk_length, indexer_topk):
    _check_sparse_prefill("sparse_prefill", q, kv, indices, d_v, attn_sink, topk_length, indexer_topk)
    s_q, h_q, _ = q.shape
    lse_indexer = q.new_empty(s_q, h_q, dtype=torch.float32) if indexer_topk else q.new_empty(0, dtype=torch.float32)
    return (q.new_empty(s_q, h_q, d_v, dtype=q.dtype), q.new_empty(s_q, h_q, dtype=torch.float32),
            q.new_empty(s_q, h_q, dtype=torch.float32), lse_indexer)
