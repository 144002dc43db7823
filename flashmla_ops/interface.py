"""FlashMLA's Python API (same names, argument order, defaults and return values) over the `flashmla` ops."""
from dataclasses import dataclass, field

import torch

from . import _ext, decode, sparse_prefill  # noqa: F401  (registers the ops)
from ._checks import check_scalar, check_scale, check_tensor, is_flag, is_int, require_tensor, value_checks_apply
from .decode import _check_dense, _check_sparse, num_sm_parts


def _check_tensor_types(op: str, required: dict, optional: dict) -> None:
    """Tensor arguments that are not tensors (a list, a number; None where one is required): the custom ops' schemas
    would reject them with a RuntimeError, or their checks name the op rather than this function. Types only: the
    shapes, dtypes and values are the op's checks (where a reused schedule skips the API's own)."""
    for name, value in required.items():
        require_tensor(op, name, value)
    for name, value in optional.items():
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor or None, got {type(value).__name__}")


@dataclass
class FlashMLASchedMeta:
    """Scheduling state from `get_mla_metadata`: empty until the first `flash_mla_with_kvcache` call fills it
    (on the device, no host sync); later calls with the same shapes and the same `cache_seqlens` tensor, unmodified,
    reuse it (e.g. every layer of one decode step). Only for a kernel that reads it (`dense_kernel_reads_schedule`):
    on a GPU without the CUDA kernel (or with another path forced) the metadata stays None.

    "Unmodified" is the tensor's version counter: in-place ops (`+=`, `copy_`, `fill_`) move it; writes that
    bypass autograd's tracking do not: `t.data.copy_(...)`, through `t.numpy()` or a DLPack view, and on a GPU a
    Triton or CUDA kernel of your own writing the lengths, or a CUDA graph replay of such a write. After one of those
    pass a fresh `get_mla_metadata()` object (FlashMLA's own contract: one per decode step, shared by its layers):
    where values are checked (CPU tensors, or FLASHMLA_CHECK=1 on a GPU) a reuse compares the lengths and recomputes
    when they moved, but on a GPU without the check nothing can tell without a host sync, and the CUDA kernel
    follows the stale schedule: still the right output (each sequence's last piece runs to the sequence's end), but
    split for the old lengths, so a long sequence's new blocks may all fall to one part. Inference tensors (made under
    `torch.inference_mode()`) have no version counter: with one, the split is recomputed on every call (a small device
    computation, no host sync)."""
    tile_scheduler_metadata: torch.Tensor | None = None
    num_splits: torch.Tensor | None = None
    key: tuple = field(default=(), repr=False)
    source: torch.Tensor | None = field(default=None, repr=False)
    lengths: torch.Tensor | None = field(default=None, repr=False)  # the values the split was computed for
    filled: bool = field(default=False, repr=False)

    @property
    def have_initialized(self) -> bool:
        """FlashMLA's name for whether a call has filled the object. Setting it False (what engines do before a CUDA
        graph capture) makes the next call compute the split again; True can only be set where it already is."""
        return self.filled

    @have_initialized.setter
    def have_initialized(self, value: bool) -> None:
        if value and not self.filled:
            raise ValueError("FlashMLASchedMeta.have_initialized: only a flash_mla_with_kvcache call fills the "
                             "schedule; it can be set to False (recompute on the next call), not to True")
        if not value:
            self.filled = False

    def fill(self, lengths, source: torch.Tensor | None, key: tuple, check=None, schedule=True) -> None:
        """Compute the split for `lengths()` unless it was computed for this very `source` tensor (held, so that its
        id cannot be reused by another tensor), unmodified since (`_version`), with the same `key` (shapes); with
        `source` None the lengths follow from `key` alone. `check()` runs first whenever the split is computed (the
        API's argument checks: once per new lengths, not on every layer's call). Without `schedule` (an op whose
        kernels take none: sparse decode; or a `schedule()` that says so, asked after the checks) only the checks
        run, and the metadata stays None."""
        s_q, h_q = key[1], key[2]
        # Recompute (cheap device work, no sync) under torch.compile (no guards on tensor versions), inside a CUDA
        # graph capture (the graph must record the computation: replays follow lengths changed in place) and for an
        # inference tensor (no version counter to tell whether it changed). is_compiling first: dynamo cannot trace
        # the capture query (a torch function returning a bool), so fullgraph compilation failed on CUDA builds.
        if torch.compiler.is_compiling() or _capturing() or (source is not None and source.is_inference()):
            self._compute(lengths, s_q, h_q, check, schedule)
            self.source, self.key = None, ()  # nothing to reuse: the next call with a tracked tensor recomputes
            return
        key = (*key, source._version if source is not None else 0)
        if (self.source is not source or self.key != key or not self.filled
                or (source is not None and value_checks_apply(source) and not torch.equal(source, self.lengths))):
            computed = self._compute(lengths, s_q, h_q, check, schedule)
            # the values it was computed for, to compare where values are checked (a write that did not move the
            # version): a device copy, no sync
            self.source, self.key, self.lengths = source, key, computed.clone() if source is not None else None

    def _compute(self, lengths, s_q: int, h_q: int, check, schedule) -> torch.Tensor:
        if check is not None:
            check()
        lengths = lengths()
        self.tile_scheduler_metadata = self.num_splits = None
        if schedule() if callable(schedule) else schedule:  # not isinstance(schedule, bool): torch 2.4's dynamo
            self.tile_scheduler_metadata, self.num_splits = torch.ops.flashmla.get_mla_metadata(
                lengths, num_sm_parts(lengths.device, s_q, h_q))
        self.filled = True
        return lengths


def _capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (never asked while compiling: see `fill`)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def dense_kernel_reads_schedule(device: torch.device) -> bool:
    """Whether dense decode on `device` can follow get_mla_metadata's schedule. The CUDA kernel does; the Triton
    kernels and the reference on a GPU split by shape alone, so there the split (the reference's ~95 small kernels)
    would be computed for every new lengths for nothing. CPU tensors keep it (the op checks its values there), and so
    does tracing under torch.compile (no dispatch query in the graph). Per call: `dense_call_reads_schedule`."""
    if device.type != "cuda" or torch.compiler.is_compiling():
        return True
    return "cuda" in _ext.paths("dense_decode", device)


def dense_call_reads_schedule(q: torch.Tensor, k_cache: torch.Tensor, head_dim_v: int, is_fp8: bool) -> bool:
    """As `dense_kernel_reads_schedule`, for these arguments (after the op's checks passed): on Hopper a call the CUDA
    kernel declines (float32 q, unaligned rows) goes to a path that splits by shape, and gets no schedule."""
    if q.device.type != "cuda" or torch.compiler.is_compiling():
        return True
    return decode.dense_decode_path(q, k_cache, head_dim_v, is_fp8) == "cuda"


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
        topk_length: `(batch,)` int32, only the first `topk_length[b]` indices count (a length past topk: all of
            them; 0 or less: none).
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
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"{op}: q must be a tensor of shape (batch, s_q, h_q, d_qk), got {type(q).__name__}")
    if q.dim() != 4:
        raise ValueError(f"{op}: q must be a tensor of shape (batch, s_q, h_q, d_qk), got {tuple(q.shape)}")
    batch, s_q, h_q, d_qk = q.shape
    if d_qk < 1:  # before the default scale d_qk ** -0.5
        raise ValueError(f"{op}: q must have d_qk >= 1 (576 in DeepSeek), got shape {tuple(q.shape)}")
    _check_tensor_types(op, dict(k_cache=k_cache),
                        dict(block_table=block_table, cache_seqlens=cache_seqlens, indices=indices, attn_sink=attn_sink,
                             extra_k_cache=extra_k_cache, extra_indices_in_kvcache=extra_indices_in_kvcache,
                             topk_length=topk_length, extra_topk_length=extra_topk_length))
    check_scalar(op, "head_dim_v", head_dim_v, is_int, "an int")
    if softmax_scale is None:
        softmax_scale = d_qk ** -0.5
    softmax_scale = check_scale(op, "softmax_scale", softmax_scale, "a float or None")
    check_scalar(op, "causal", causal, is_flag, "a bool")
    check_scalar(op, "is_fp8_kvcache", is_fp8_kvcache, is_flag, "a bool")
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
        # The op's checks before the metadata is computed from the arguments, naming this function (while
        # torch.compile traces, shapes only: `value_checks_apply`); when the metadata is reused, the op's own.
        def check():
            _check_dense(op, q, k_cache, block_table, cache_seqlens, None, None, head_dim_v, is_fp8_kvcache,
                         attn_sink, "is_fp8_kvcache")

        if not isinstance(cache_seqlens, torch.Tensor):
            check()  # names cache_seqlens (the metadata's source must be a tensor)
        meta.fill(lambda: cache_seqlens, cache_seqlens, ("dense", s_q, h_q, batch), check=check,
                  schedule=lambda: dense_call_reads_schedule(q, k_cache, head_dim_v, is_fp8_kvcache))
        return torch.ops.flashmla.dense_decode(q, k_cache, block_table, cache_seqlens, meta.tile_scheduler_metadata,
                                               meta.num_splits, head_dim_v, softmax_scale, causal, is_fp8_kvcache,
                                               attn_sink)
    if causal:
        raise ValueError(f"{op}: causal must be False with indices (the indices say what each query sees), got True")
    # Sparse attention reads neither (FlashMLA's callers may pass them): when given, they must still be what they say
    dims = dict(batch=batch)
    if block_table is not None:
        check_tensor(op, "block_table", block_table, decode.INDEX_DTYPES, ("batch", "max_blocks_per_seq"), dims)
    if cache_seqlens is not None:
        check_tensor(op, "cache_seqlens", cache_seqlens, decode.INDEX_DTYPES, ("batch",), dims)
    def check():
        _check_sparse(op, q, k_cache, indices, topk_length, extra_k_cache, extra_indices_in_kvcache,
                      extra_topk_length, None, None, head_dim_v, is_fp8_kvcache, attn_sink, "is_fp8_kvcache")

    if (not isinstance(indices, torch.Tensor) or indices.dim() != 3
            or not isinstance(topk_length, (torch.Tensor, type(None)))):
        check()  # names the argument (the metadata's key reads indices' shape, its source is topk_length)
    # Without topk_length every sequence has topk keys: the split depends on the shapes alone.
    if topk_length is not None:
        lengths, source = (lambda: topk_length), topk_length
    else:
        lengths, source = (lambda: torch.full((batch,), indices.shape[-1], dtype=torch.int32, device=q.device)), None
    # The sparse kernels (CUDA, Triton, the reference) take no schedule: the checks only, no split computed (it was
    # 94 small device ops, on every layer's call for inference tensors)
    meta.fill(lengths, source, ("sparse", s_q, h_q, batch, indices.shape[-1], q.device), check=check, schedule=False)
    return torch.ops.flashmla.sparse_decode(q, k_cache, indices, topk_length, extra_k_cache, extra_indices_in_kvcache,
                                            extra_topk_length, meta.tile_scheduler_metadata, meta.num_splits,
                                            head_dim_v, softmax_scale, is_fp8_kvcache, attn_sink)


def flash_mla_sparse_fwd(q, kv, indices, sm_scale, d_v=512, attn_sink=None, topk_length=None, indexer_topk=0):
    """Sparse prefill (DeepSeek Sparse Attention), batches packed along s_q / s_kv.

    Args:
        q: `(s_q, h_q, d_qk)` bfloat16; kv: `(s_kv, 1, d_qk)` bfloat16.
        indices: `(s_q, 1, topk)` int32 rows of kv; -1 or any value >= s_kv means "no token".
        sm_scale: softmax scale. d_v: value width (first d_v dims of kv). attn_sink: `(h_q,)` float32.
        topk_length: `(s_q,)` int32, only the first `topk_length[t]` indices count (past topk: all; <= 0: none).
        indexer_topk: when > 0, also return the LSE over the first `indexer_topk` indices.
    Returns:
        (out `(s_q, h_q, d_v)` bfloat16, max_logits `(s_q, h_q)` float32, lse `(s_q, h_q)` float32
        [, lse_indexer `(s_q, h_q)` float32 when indexer_topk > 0]).
    """
    op = "flash_mla_sparse_fwd"
    _check_tensor_types(op, dict(q=q, kv=kv, indices=indices), dict(attn_sink=attn_sink, topk_length=topk_length))
    sm_scale = check_scale(op, "sm_scale", sm_scale)
    check_scalar(op, "d_v", d_v, is_int, "an int")
    check_scalar(op, "indexer_topk", indexer_topk, is_int, "an int")
    out, max_logits, lse, lse_indexer = torch.ops.flashmla.sparse_prefill(q, kv, indices, sm_scale, d_v, attn_sink,
                                                                          topk_length, indexer_topk)
    if indexer_topk > 0:
        return out, max_logits, lse, lse_indexer
    return out, max_logits, lse
