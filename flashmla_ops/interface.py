"""FlashMLA's Python API (same names, argument order, defaults and return values) over the `flashmla` ops."""
from dataclasses import dataclass, field

import torch

from . import decode, sparse_prefill  # noqa: F401  (registers the ops)
from .decode import num_sm_parts


@dataclass
class FlashMLASchedMeta:
    """Scheduling state from `get_mla_metadata`: empty until the first `flash_mla_with_kvcache` call fills it
    (on the device, no host sync); later calls with the same shapes and the same `cache_seqlens` tensor, unmodified,
    reuse it (e.g. every layer of one decode step)."""
    tile_scheduler_metadata: torch.Tensor | None = None
    num_splits: torch.Tensor | None = None
    key: tuple = field(default=(), repr=False)
    source: torch.Tensor | None = field(default=None, repr=False)

    def fill(self, lengths, source: torch.Tensor | None, key: tuple) -> None:
        """Compute the split for `lengths()` unless it was computed for this very `source` tensor (held, so that its
        id cannot be reused by another tensor), unmodified since (`_version`), with the same `key` (shapes); with
        `source` None the lengths follow from `key` alone."""
        s_q, h_q = key[1], key[2]
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        # Recompute (cheap device work, no sync) under torch.compile (no guards on tensor versions) and inside a CUDA
        # graph capture (the graph must record the computation: replays follow lengths changed in place).
        if torch.compiler.is_compiling() or capturing:
            lengths = lengths()
            self.tile_scheduler_metadata, self.num_splits = torch.ops.flashmla.get_mla_metadata(
                lengths, num_sm_parts(lengths.device, s_q, h_q))
            return
        key = (*key, source._version if source is not None else 0)
        if self.source is not source or self.key != key or self.tile_scheduler_metadata is None:
            lengths = lengths()
            self.tile_scheduler_metadata, self.num_splits = torch.ops.flashmla.get_mla_metadata(
                lengths, num_sm_parts(lengths.device, s_q, h_q))
            self.source, self.key = source, key


def get_mla_metadata(*args, **kwargs) -> tuple[FlashMLASchedMeta, None]:
    """Returns `(sched_meta, None)`. The arguments of older FlashMLA versions (cache_seqlens,
    num_q_tokens_per_head_k, num_heads_k, ...) are accepted and ignored: the metadata depends on the call it serves."""
    return FlashMLASchedMeta(), None


def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                           num_splits=None, softmax_scale=None, causal=False, is_fp8_kvcache=False, indices=None,
                           attn_sink=None, extra_k_cache=None, extra_indices_in_kvcache=None, topk_length=None,
                           extra_topk_length=None):
    """Paged MLA decode.

    Args:
        q: `(batch, s_q, h_q, d_qk)` bfloat16 (d_qk 576 in DeepSeek: 512 latent + 64 RoPE).
        k_cache: `(num_blocks, 64, 1, d_qk)` bfloat16, or `(num_blocks, 64, 1, 656)` uint8 with `is_fp8_kvcache`.
        block_table: `(batch, max_blocks_per_seq)` int32 (dense; may be None when sparse).
        cache_seqlens: `(batch,)` int32, each sequence's length including the new tokens (dense; None when sparse).
        head_dim_v: 512 (the latent width; the value is the first head_dim_v dims of the key).
        tile_scheduler_metadata: the object `get_mla_metadata` returned (or None).
        num_splits: must be None (kept for FlashMLA's signature).
        softmax_scale: default `d_qk ** -0.5`.
        causal: query `i` of `s_q` sees `[0, L - s_q + i]` (dense only).
        indices: `(batch, s_q, topk)` int32 flat cache slots (`block * 64 + row`, -1 = none): sparse attention.
        attn_sink: `(h_q,)` float32, out scaled by `exp(lse) / (exp(lse) + exp(attn_sink))`.
        extra_k_cache, extra_indices_in_kvcache, extra_topk_length: a second cache attended in the same softmax.
        topk_length: `(batch,)` int32, only the first `topk_length[b]` indices count.
    Returns:
        out `(batch, s_q, h_q, head_dim_v)` bfloat16, softmax_lse `(batch, h_q, s_q)` float32 (natural log;
        +inf and out = 0 for a query that sees no token).
    """
    op = "flash_mla_with_kvcache"
    if num_splits is not None:
        raise ValueError(f"{op}: num_splits must be None (the scheduling lives in tile_scheduler_metadata), got a "
                         f"{type(num_splits).__name__}")
    if tile_scheduler_metadata is not None and not isinstance(tile_scheduler_metadata, FlashMLASchedMeta):
        raise TypeError(f"{op}: tile_scheduler_metadata must be the object get_mla_metadata() returned or None, "
                        f"got {type(tile_scheduler_metadata).__name__}")
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"{op}: q must be a tensor of shape (batch, s_q, h_q, d_qk), got "
                         f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
    batch, s_q, h_q, d_qk = q.shape
    if softmax_scale is None:
        softmax_scale = d_qk ** -0.5
    meta = tile_scheduler_metadata if tile_scheduler_metadata is not None else FlashMLASchedMeta()
    if indices is None:
        for name, value in (("extra_k_cache", extra_k_cache), ("extra_indices_in_kvcache", extra_indices_in_kvcache),
                            ("topk_length", topk_length), ("extra_topk_length", extra_topk_length)):
            if value is not None:
                raise ValueError(f"{op}: {name} needs sparse attention (indices), got indices=None")
        if block_table is None or cache_seqlens is None:
            raise ValueError(f"{op}: dense decode needs block_table and cache_seqlens, got "
                             f"block_table={'a tensor' if block_table is not None else None}, "
                             f"cache_seqlens={'a tensor' if cache_seqlens is not None else None}")
        if isinstance(cache_seqlens, torch.Tensor) and cache_seqlens.dtype == torch.int32:
            meta.fill(lambda: cache_seqlens, cache_seqlens, ("dense", s_q, h_q, batch))
        return torch.ops.flashmla.dense_decode(q, k_cache, block_table, cache_seqlens, meta.tile_scheduler_metadata,
                                               meta.num_splits, head_dim_v, softmax_scale, causal, is_fp8_kvcache,
                                               attn_sink)
    if causal:
        raise ValueError(f"{op}: causal must be False with indices (the indices say what each query sees), got True")
    if isinstance(indices, torch.Tensor) and indices.dim() == 3:
        # Without topk_length every sequence has topk keys: the split depends on the shapes alone.
        if isinstance(topk_length, torch.Tensor) and topk_length.dtype == torch.int32:
            lengths, source = (lambda: topk_length), topk_length
        else:
            lengths, source = (lambda: torch.full((batch,), indices.shape[-1], dtype=torch.int32,
                                                  device=q.device)), None
        meta.fill(lengths, source, ("sparse", s_q, h_q, batch, indices.shape[-1], q.device))
    return torch.ops.flashmla.sparse_decode(q, k_cache, indices, topk_length, extra_k_cache, extra_indices_in_kvcache,
                                            extra_topk_length, meta.tile_scheduler_metadata, meta.num_splits,
                                            head_dim_v, softmax_scale, is_fp8_kvcache, attn_sink)


def flash_mla_sparse_fwd(q, kv, indices, sm_scale, d_v=512, attn_sink=None, topk_length=None, indexer_topk=0):
    """Sparse prefill (DeepSeek Sparse Attention), batches packed along s_q / s_kv.

    Args:
        q: `(s_q, h_q, d_qk)` bfloat16; kv: `(s_kv, 1, d_qk)` bfloat16.
        indices: `(s_q, 1, topk)` int32 rows of kv; -1 or any value >= s_kv means "no token".
        sm_scale: softmax scale. d_v: value width (first d_v dims of kv). attn_sink: `(h_q,)` float32.
        topk_length: `(s_q,)` int32, only the first `topk_length[t]` indices count.
        indexer_topk: when > 0, also return the LSE over the first `indexer_topk` indices.
    Returns:
        (out `(s_q, h_q, d_v)` bfloat16, max_logits `(s_q, h_q)` float32, lse `(s_q, h_q)` float32
        [, lse_indexer `(s_q, h_q)` float32 when indexer_topk > 0]).
    """
    out, max_logits, lse, lse_indexer = torch.ops.flashmla.sparse_prefill(q, kv, indices, sm_scale, d_v, attn_sink,
                                                                          topk_length, indexer_topk)
    if indexer_topk > 0:
        return out, max_logits, lse, lse_indexer
    return out, max_logits, lse
