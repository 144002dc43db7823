"""Paged MLA decode: the scheduling metadata, and dense and sparse attention over the latent cache.

Shapes (SPEC.md §1-2): q `(batch, s_q, h_q, d_qk)` bfloat16; k_cache `(num_blocks, page_block_size, 1, d_qk)`
bfloat16 or `(num_blocks, page_block_size, 1, 656)` uint8 (FP8 layout); out `(batch, s_q, h_q, d_v)` bfloat16;
(float32 q and cache are accepted too and run the reference: out is then float32);
lse `(batch, h_q, s_q)` float32, natural log, `+inf` (and out = 0) for a query that sees no token.
"""
import os

import torch

from . import _ext
from ._attention import apply_attn_sink, attend
from ._checks import (FLOAT_DTYPES, FP8_LAYOUT_DTYPES, below, capturing, check, check_contiguous_last_dim,
                      check_finite_scale, check_fp8_flag, check_paged_table, check_same_device, check_tensor,
                      contiguous_or_none, last_dim_contiguous, value_checks_apply)
from .kv_cache import D_QK, FP8_BYTES, KV_LORA_RANK, PAGE_BLOCK_SIZE, dequantize_kv_fp8_reference

METADATA_FIELDS = 8  # begin_batch, begin_block, end_batch, end_block (exclusive), begin_split, 3 reserved
INDEX_DTYPES = (torch.int32,)
TOKENS_PER_CHUNK = 1 << 23  # bounds gathered sparse KV rows: tokens * topk * d_qk float32 elements


# ---------------------------------------------------------------- scheduling metadata


# A part splits no sequence (whole sequences, ceil(batch / parts) consecutive ones each) when its heaviest part stays
# within ALIGNED_SLACK of the even share: splitting costs partials and the combine (on the H100 the equal-runs
# split was 0-8% slower than whole sequences on uniform batches), so a small imbalance is the cheaper choice.
ALIGNED_SLACK_PERCENT, ALIGNED_SLACK_BLOCKS = 115, 2


def get_mla_metadata_reference(cache_seqlens: torch.Tensor, num_sm_parts: int):
    """Split the batch's 64-token KV blocks into `num_sm_parts` contiguous runs (no host sync): whole sequences,
    `ceil(batch / num_sm_parts)` consecutive ones per part, when the heaviest such part holds at most
    ALIGNED_SLACK_PERCENT % of the even share plus ALIGNED_SLACK_BLOCKS blocks; else equal runs that split sequences
    where they must (one long sequence among short ones).

    Every sequence counts at least one block so that its output is written even when it is empty.
    Equal runs: part `p` covers global blocks `[p * per_part, (p + 1) * per_part)`. `num_splits[b + 1] -
    num_splits[b]` is the number of parts that touch sequence `b` (a cumulative count, `num_splits[0] = 0`).
    """
    meta, num_splits, blocks, per_part = _equal_runs(cache_seqlens, num_sm_parts)
    batch = cache_seqlens.shape[0]
    if batch == 0:
        return meta, num_splits
    group = -(-batch // num_sm_parts)
    padded = torch.zeros(num_sm_parts * group, dtype=blocks.dtype, device=blocks.device)
    padded[:batch] = blocks
    heaviest = padded.view(num_sm_parts, group).sum(1).max()
    aligned = heaviest * 100 <= per_part * ALIGNED_SLACK_PERCENT + ALIGNED_SLACK_BLOCKS * 100
    whole_meta, whole_splits = _whole_sequences(blocks, num_sm_parts, group)
    return torch.where(aligned, whole_meta, meta), torch.where(aligned, whole_splits, num_splits)


def _whole_sequences(blocks: torch.Tensor, num_sm_parts: int, group: int):
    """Part p holds sequences [p * group, (p + 1) * group), each whole; parts past the batch are idle."""
    batch, device = blocks.shape[0], blocks.device
    first = torch.arange(num_sm_parts, device=device) * group
    last = torch.clamp_max(first + group, batch) - 1
    active = first < batch
    meta = torch.zeros(num_sm_parts, METADATA_FIELDS, dtype=torch.int32, device=device)
    meta[:, 0] = torch.where(active, first, batch).int()
    meta[:, 2] = torch.where(active, last, batch).int()
    meta[:, 3] = torch.where(active, blocks[torch.clamp(last, 0, batch - 1)], 0).int()
    return meta, torch.arange(batch + 1, dtype=torch.int32, device=device)


def _equal_runs(cache_seqlens: torch.Tensor, num_sm_parts: int):
    device = cache_seqlens.device
    batch = cache_seqlens.shape[0]
    blocks = torch.clamp_min((cache_seqlens.long() + PAGE_BLOCK_SIZE - 1) // PAGE_BLOCK_SIZE, 1)
    ends = torch.cumsum(blocks, 0)
    starts = ends - blocks
    total = ends[-1:] if batch else torch.zeros(1, dtype=torch.long, device=device)
    per_part = torch.clamp_min((total + num_sm_parts - 1) // num_sm_parts, 1)
    part = torch.arange(num_sm_parts, device=device)
    part_begin = part * per_part
    part_end = torch.minimum(part_begin + per_part, total)
    begin_batch = torch.searchsorted(ends, part_begin, right=True)
    last_batch = torch.searchsorted(ends, torch.clamp_min(part_end - 1, 0), right=True)
    active = part_begin < part_end
    first_part_of = starts // per_part
    meta = torch.zeros(num_sm_parts, METADATA_FIELDS, dtype=torch.int32, device=device)
    safe_begin = torch.clamp_max(begin_batch, max(batch - 1, 0))
    safe_last = torch.clamp_max(last_batch, max(batch - 1, 0))
    if batch:
        meta[:, 0] = torch.where(active, begin_batch, batch).int()
        meta[:, 1] = torch.where(active, part_begin - starts[safe_begin], 0).int()
        meta[:, 2] = torch.where(active, last_batch, batch).int()
        meta[:, 3] = torch.where(active, part_end - starts[safe_last], 0).int()
        meta[:, 4] = torch.where(active, part - first_part_of[safe_begin], 0).int()
    splits_per_seq = (ends - 1) // per_part - first_part_of + 1
    num_splits = torch.zeros(batch + 1, dtype=torch.int32, device=device)
    num_splits[1:] = torch.cumsum(splits_per_seq, 0).int()
    return meta, num_splits, blocks, per_part


CUDA_METADATA_MAX_COUNT = 2**30  # batch + 1 and parts for csrc/mla_metadata.cu (int counters, stepping past them)


def _check_metadata(op, cache_seqlens, num_sm_parts):
    check_tensor(op, "cache_seqlens", cache_seqlens, INDEX_DTYPES, ("batch",), {})
    if num_sm_parts < 1:
        raise ValueError(f"{op}: num_sm_parts must be >= 1, got {num_sm_parts}")
    if value_checks_apply(cache_seqlens) and bool((cache_seqlens < 0).any()):
        raise ValueError(f"{op}: cache_seqlens must be >= 0, got {cache_seqlens[cache_seqlens < 0][:8].tolist()}")


@torch.library.custom_op("flashmla::get_mla_metadata", mutates_args=())
def get_mla_metadata(cache_seqlens: torch.Tensor, num_sm_parts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Work split of a decode batch over `num_sm_parts` SM groups.

    cache_seqlens: `(batch,)` int32 visible tokens per sequence (for sparse decode: topk per sequence).
    Returns tile_scheduler_metadata `(num_sm_parts, 8)` int32 and num_splits `(batch + 1,)` int32. On Hopper one
    launch (csrc/mla_metadata.cu), equal to the reference's ~95 small kernels value for value.
    """
    _check_metadata("get_mla_metadata", cache_seqlens, num_sm_parts)
    if ("cuda" in _ext.paths("get_mla_metadata", cache_seqlens.device)
            and max(num_sm_parts, cache_seqlens.shape[0] + 1) <= CUDA_METADATA_MAX_COUNT):
        meta, num_splits = _ext.extension().get_mla_metadata(cache_seqlens, num_sm_parts)
        return meta, num_splits
    _ext.reference_fallback("get_mla_metadata", cache_seqlens.device)
    return get_mla_metadata_reference(cache_seqlens, num_sm_parts)


@get_mla_metadata.register_fake
def _(cache_seqlens, num_sm_parts):
    _check_metadata("get_mla_metadata", cache_seqlens, num_sm_parts)
    batch = cache_seqlens.shape[0]
    return (cache_seqlens.new_empty(num_sm_parts, METADATA_FIELDS, dtype=torch.int32),
            cache_seqlens.new_empty(batch + 1, dtype=torch.int32))


def num_sm_parts(device: torch.device | str, s_q: int, h_q: int) -> int:
    """How many SM groups a decode launch splits the KV over: one group per 64 query rows (s_q * h_q) per SM."""
    device = torch.device(device)
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, sms // max(1, -(-s_q * h_q // 64)))


# ---------------------------------------------------------------- shared checks


def _check_cache(op, k_cache, is_fp8, dims, dtype, name="k_cache", flag="is_fp8"):
    check_fp8_flag(op, name, k_cache, flag, is_fp8, (dtype,))
    if isinstance(k_cache, torch.Tensor) and k_cache.dim() == 4 and k_cache.shape[2] != 1:
        raise ValueError(f"{op}: {name} must have h_kv = 1 (MLA decode is MQA over the latent), got {k_cache.shape[2]} "
                         f"in shape {tuple(k_cache.shape)}")
    if is_fp8:
        check_tensor(op, name, k_cache, FP8_LAYOUT_DTYPES, (None, PAGE_BLOCK_SIZE, 1, FP8_BYTES), dims)
        if dims.get("d_qk", D_QK) != D_QK:
            raise ValueError(f"{op}: the FP8 cache needs q's last dimension d_qk = {D_QK}, got {dims['d_qk']}")
    else:
        check_tensor(op, name, k_cache, (dtype,), (None, PAGE_BLOCK_SIZE, 1, "d_qk"), dims, dtype_from="q")
    check_contiguous_last_dim(op, name, k_cache)


def _check_head_dim_v(op, head_dim_v, d_qk, is_fp8):
    if is_fp8 and head_dim_v != KV_LORA_RANK:
        raise ValueError(f"{op}: head_dim_v must be {KV_LORA_RANK} with the FP8 cache, got {head_dim_v}")
    if not 0 < head_dim_v <= d_qk:
        raise ValueError(f"{op}: head_dim_v must be in [1, d_qk={d_qk}], got {head_dim_v}")


def _check_sink(op, attn_sink, dims):
    if attn_sink is not None:
        check_tensor(op, "attn_sink", attn_sink, (torch.float32,), ("h_q",), dims)


def _check_metadata_inputs(op, tile_scheduler_metadata, num_splits, dims):
    if (tile_scheduler_metadata is None) != (num_splits is None):
        raise ValueError(f"{op}: tile_scheduler_metadata and num_splits must be given together (get_mla_metadata's "
                         f"pair) or both None, got "
                         f"tile_scheduler_metadata={'a tensor' if tile_scheduler_metadata is not None else None}, "
                         f"num_splits={'a tensor' if num_splits is not None else None}")
    if tile_scheduler_metadata is not None:
        check_tensor(op, "tile_scheduler_metadata", tile_scheduler_metadata, INDEX_DTYPES, (None, METADATA_FIELDS),
                     dims)
        if tile_scheduler_metadata.shape[0] < 1:
            raise ValueError(f"{op}: tile_scheduler_metadata must have a row per SM part, at least one (shape "
                             f"(num_sm_parts, {METADATA_FIELDS}) from get_mla_metadata), got shape "
                             f"{tuple(tile_scheduler_metadata.shape)}")
    if num_splits is not None:
        check_tensor(op, "num_splits", num_splits, INDEX_DTYPES, (dims["batch"] + 1,), dims)


def sequence_slots(block_table_row: torch.Tensor, length: int) -> torch.Tensor:
    """Flat cache slots `(length,)` int64 of a sequence's tokens 0 .. length - 1 through its block_table row."""
    num_blocks = -(-length // PAGE_BLOCK_SIZE)
    rows = torch.arange(PAGE_BLOCK_SIZE, device=block_table_row.device)
    return (block_table_row[:num_blocks, None].long() * PAGE_BLOCK_SIZE + rows).reshape(-1)[:length]


def _gather_rows(k_cache: torch.Tensor, slots: torch.Tensor, is_fp8: bool) -> torch.Tensor:
    """Rows of the paged cache at flat slots (any shape, all valid) as float32 `(*slots.shape, d_qk)`."""
    block_size = k_cache.shape[1]
    cache = k_cache.view(torch.uint8) if is_fp8 else k_cache
    if cache.shape[0] == 0:  # nothing to gather: every slot is masked out by the caller
        cache = cache.new_zeros(1, *cache.shape[1:])
    rows = cache[slots // block_size, slots % block_size, 0]
    return dequantize_kv_fp8_reference(rows).float() if is_fp8 else rows.float()


def _outputs(q, d_v):
    batch, s_q, h_q, _ = q.shape
    return (q.new_empty(batch, s_q, h_q, d_v, dtype=q.dtype),
            q.new_empty(batch, h_q, s_q, dtype=torch.float32))


# ---------------------------------------------------------------- dense decode


def _check_dense(op, q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits, head_dim_v,
                 is_fp8, attn_sink, flag="is_fp8"):
    """`flag`: the FP8 flag's name where the caller takes it (the FlashMLA API's is_fp8_kvcache)."""
    dims = {}
    check_tensor(op, "q", q, FLOAT_DTYPES, ("batch", "s_q", "h_q", "d_qk"), dims)
    check_contiguous_last_dim(op, "q", q)
    _check_cache(op, k_cache, is_fp8, dims, q.dtype, flag=flag)
    check_tensor(op, "block_table", block_table, INDEX_DTYPES, ("batch", "max_blocks_per_seq"), dims)
    check_tensor(op, "cache_seqlens", cache_seqlens, INDEX_DTYPES, ("batch",), dims)
    _check_head_dim_v(op, head_dim_v, dims["d_qk"], is_fp8)
    _check_sink(op, attn_sink, dims)
    _check_metadata_inputs(op, tile_scheduler_metadata, num_splits, dims)
    check_same_device(op, q=q, k_cache=k_cache, block_table=block_table, cache_seqlens=cache_seqlens,
                      attn_sink=attn_sink, tile_scheduler_metadata=tile_scheduler_metadata, num_splits=num_splits)
    check_paged_table(op, block_table, cache_seqlens, k_cache.shape[0], PAGE_BLOCK_SIZE, "k_cache")
    _check_metadata_values(op, tile_scheduler_metadata, num_splits, cache_seqlens)


def _check_metadata_values(op, tile_scheduler_metadata, num_splits, cache_seqlens) -> None:
    """Where values are checked (CPU tensors, FLASHMLA_CHECK=1): the schedule must be get_mla_metadata's for these
    cache_seqlens values. The CUDA kernel follows it as it is: one made for other lengths of the batch still gives the
    right output (each sequence's last piece runs to its end: decode_common.cuh's for_each_piece) but not the balance
    it was made for. Tensors that are not get_mla_metadata's pair for this batch (made by hand, or halves of two
    calls) give a wrong output, with no error, but never an access outside the batch, a sequence's blocks or the
    launch's partial slots (batch + num_sm_parts, from the shapes), nor a loop past them: for_each_piece and the
    combine's combine_slots cut each value to them (the Triton balanced schedule likewise). The wrong values stay in
    this call's out and lse, and may be anything there, NaN included: a row that no piece writes keeps the memory out
    was allocated with, and a combine may merge slots that no piece wrote. Sparse decode takes the pair for FlashMLA's
    calling convention only: its kernels split by shape and read neither."""
    if tile_scheduler_metadata is None or num_splits is None or not value_checks_apply(cache_seqlens):
        return
    want_metadata, want_splits = get_mla_metadata_reference(cache_seqlens, tile_scheduler_metadata.shape[0])
    check(op, torch.equal(tile_scheduler_metadata.long(), want_metadata.long())
          and torch.equal(num_splits.long(), want_splits.long()),
          "tile_scheduler_metadata and num_splits must be get_mla_metadata(cache_seqlens, num_sm_parts)'s for these "
          "cache_seqlens values (metadata made for other lengths is stale: its split does not balance them)")


def dense_key_counts(block_table: torch.Tensor, cache_seqlens: torch.Tensor) -> list[int]:
    """How many positions of each sequence the dense reference gathers: its length (one host sync for all), or while
    a CUDA graph is being captured every position its block_table row holds: a capture cannot sync, and its graph is
    replayed for whatever lengths cache_seqlens holds then (the positions past them are masked on the device)."""
    if capturing(cache_seqlens):
        return [block_table.shape[1] * PAGE_BLOCK_SIZE] * cache_seqlens.shape[0]
    return cache_seqlens.tolist()


def dense_decode_reference(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, is_fp8,
                           attn_sink=None):
    batch, s_q, h_q, _ = q.shape
    out = q.new_empty(batch, s_q, h_q, head_dim_v, dtype=q.dtype)
    lse = q.new_empty(batch, h_q, s_q, dtype=torch.float32)
    query = torch.arange(s_q, device=q.device)
    # Table entries past a sequence's blocks may hold anything: clamped to a real block, their rows masked below
    blocks = block_table.clamp(0, max(k_cache.shape[0] - 1, 0))
    for b, width in enumerate(dense_key_counts(block_table, cache_seqlens)):
        position = torch.arange(width, device=q.device)
        length = cache_seqlens[b].long()
        in_sequence = position < length
        keys = masked_keys(_gather_rows(k_cache, sequence_slots(blocks[b], width), is_fp8)[None], in_sequence[None])
        if causal:
            valid = position[None, :] <= (length - s_q + query)[:, None]
        else:
            valid = in_sequence.expand(s_q, width)
        out_b, lse_b, _ = attend(q[b], keys, valid, softmax_scale, head_dim_v)
        out[b] = apply_attn_sink(out_b, lse_b, attn_sink).to(q.dtype)
        lse[b] = lse_b.T
    return out, lse


CUDA_ROWS_PER_CTA = 64  # query rows (s_q * h_q pairs) per CTA of csrc/dense_decode.cu
# query rows up to which csrc/dense_decode_narrow.cu runs dense decode (one CTA holds them all); kNarrowRows in
# csrc/decode_common.cuh, which the kernel checks
CUDA_NARROW_ROWS = 16
DECODE_KERNEL_ENV = "FLASHMLA_DECODE_KERNEL"
# A split re-reads the query tile (72 KiB at h_q >= 64): at least 2 blocks each. Measured on the H100
# (scripts/tune_cuda_splits.py): b1 h16 1k 16.2 us at 2 against 20.2 at 4 (16.5 at 1), long sequences unchanged.
CUDA_MIN_BLOCKS_PER_SPLIT = 2


def _cuda_dense_supports(q, k_cache, head_dim_v, is_fp8) -> bool:
    """The shapes csrc/dense_decode.cu is written for: bf16 q, a bf16 or FP8 (656-byte) cache, d_qk 576 / d_v 512,
    16-byte aligned rows (an attention sink too: the kernel scales each row before its store)."""
    aligned = (all(stride % 8 == 0 for stride in q.stride()[:3])
               and all(stride * k_cache.element_size() % 16 == 0 for stride in k_cache.stride()[:2]))
    cache_ok = k_cache.shape[-1] == FP8_BYTES if is_fp8 else k_cache.dtype == torch.bfloat16
    return (q.dtype == torch.bfloat16 and cache_ok and q.shape[-1] == D_QK
            and head_dim_v == KV_LORA_RANK and aligned and q.shape[0] <= 65535 and q.data_ptr() % 16 == 0
            and k_cache.data_ptr() % 16 == 0 and k_cache.shape[0] >= 1)  # no blocks: nothing to map, the next path


def cuda_num_splits(device: torch.device, batch: int, rows: int, max_blocks_per_seq: int) -> int:
    """Splits per sequence for csrc/dense_decode.cu: one CTA per SM (its shared memory allows no second) when the
    batch's row tiles alone do not fill the GPU, never under CUDA_MIN_BLOCKS_PER_SPLIT blocks of the longest
    sequence the block table can hold. From shapes alone, so one CUDA graph serves every cache_seqlens."""
    ctas = max(1, batch * -(-rows // CUDA_ROWS_PER_CTA))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if ctas >= sms:
        return 1
    return max(1, min(sms // ctas, max_blocks_per_seq // CUDA_MIN_BLOCKS_PER_SPLIT))


def cuda_dense_kernel(rows: int) -> str:
    """The CUDA dense decode kernel for `rows` query rows (s_q * h_q): 'narrow' (csrc/dense_decode_narrow.cu: the
    cache block is the wgmma M side, so 16 rows are not padded to 64) up to CUDA_NARROW_ROWS, else 'wide'
    (csrc/dense_decode.cu). FLASHMLA_DECODE_KERNEL=wide keeps every shape on the wide kernel (for A/B timing)."""
    choice = os.environ.get(DECODE_KERNEL_ENV) or "auto"  # empty: unset, as FLASHMLA_BACKEND reads it
    if choice not in ("auto", "wide"):
        raise ValueError(f"{DECODE_KERNEL_ENV} must be 'auto' or 'wide', got {choice!r}")
    return "narrow" if choice == "auto" and rows <= CUDA_NARROW_ROWS else "wide"


def dense_decode_path(q: torch.Tensor, k_cache: torch.Tensor, head_dim_v: int, is_fp8: bool) -> str:
    """The path `flashmla::dense_decode` takes for this q and cache: 'cuda' (csrc/dense_decode.cu, or for few query
    rows dense_decode_narrow.cu: `cuda_dense_kernel`), 'triton' or 'reference'."""
    rows = q.shape[1] * q.shape[2]
    for path in _ext.paths("dense_decode", q.device):
        if (path == "cuda" and _cuda_dense_supports(q, k_cache, head_dim_v, is_fp8)
                and -(-rows // CUDA_ROWS_PER_CTA) <= 65535):  # the kernel's row tiles a sequence
            return "cuda"
        if path == "triton":
            from .triton import decode as triton_decode

            if triton_decode.supports(q, k_cache, head_dim_v, is_fp8):
                return "triton"
    return "reference"


@torch.library.custom_op("flashmla::dense_decode", mutates_args=())
def dense_decode(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
                 tile_scheduler_metadata: torch.Tensor | None, num_splits: torch.Tensor | None, head_dim_v: int,
                 softmax_scale: float, causal: bool, is_fp8: bool,
                 attn_sink: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense paged decode: query `i` of sequence `b` sees cache positions `[0, L)`, `L = cache_seqlens[b]`,
    or with `causal` `[0, L - s_q + i]`. With the metadata from `get_mla_metadata` (FlashMLA's calling convention) the
    CUDA kernel balances the blocks of all sequences over its parts; None is fine (an equal split per sequence, by
    shape alone; the Triton kernels and the reference always work so)."""
    _check_dense("dense_decode", q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits,
                 head_dim_v, is_fp8, attn_sink)
    check_finite_scale("dense_decode", "softmax_scale", softmax_scale)
    rows = q.shape[1] * q.shape[2]
    path = dense_decode_path(q, k_cache, head_dim_v, is_fp8)
    if path == "cuda":
        balanced = (tile_scheduler_metadata is not None and num_splits is not None
                    and 1 <= tile_scheduler_metadata.shape[0] < 1024)
        # The kernel reads unit-stride index rows (free when they are: the usual case).
        out, lse = _ext.extension().dense_decode(
            q, k_cache, last_dim_contiguous(block_table), cache_seqlens.contiguous(), softmax_scale, causal, is_fp8,
            cuda_num_splits(q.device, q.shape[0], rows, block_table.shape[1]),
            tile_scheduler_metadata.contiguous() if balanced else None,
            num_splits.contiguous() if balanced else None,
            cuda_dense_kernel(rows) == "narrow", contiguous_or_none(attn_sink))
        return out, lse
    if path == "triton":
        from .triton import decode as triton_decode

        return triton_decode.dense_decode(q.contiguous(), k_cache, block_table, cache_seqlens, head_dim_v,
                                          softmax_scale, causal, is_fp8, attn_sink)
    _ext.reference_fallback("dense_decode", q.device)
    return dense_decode_reference(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, is_fp8,
                                  attn_sink)


@dense_decode.register_fake
def _(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits, head_dim_v, softmax_scale, causal,
      is_fp8, attn_sink):
    _check_dense("dense_decode", q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits,
                 head_dim_v, is_fp8, attn_sink)
    return _outputs(q, head_dim_v)


# ---------------------------------------------------------------- sparse decode


def _check_sparse(op, q, k_cache, indices, topk_length, extra_k_cache, extra_indices_in_kvcache, extra_topk_length,
                  tile_scheduler_metadata, num_splits, head_dim_v, is_fp8, attn_sink, flag="is_fp8"):
    """`flag`: as `_check_dense`'s."""
    dims = {}
    check_tensor(op, "q", q, FLOAT_DTYPES, ("batch", "s_q", "h_q", "d_qk"), dims)
    check_contiguous_last_dim(op, "q", q)
    _check_cache(op, k_cache, is_fp8, dims, q.dtype, flag=flag)
    check_tensor(op, "indices", indices, INDEX_DTYPES, ("batch", "s_q", "topk"), dims)
    if topk_length is not None:
        check_tensor(op, "topk_length", topk_length, INDEX_DTYPES, ("batch",), dims)
    if (extra_k_cache is None) != (extra_indices_in_kvcache is None):
        raise ValueError(f"{op}: extra_k_cache and extra_indices_in_kvcache must be given together, got "
                         f"extra_k_cache={'a tensor' if extra_k_cache is not None else None}, "
                         f"extra_indices_in_kvcache={'a tensor' if extra_indices_in_kvcache is not None else None}")
    if extra_topk_length is not None and extra_indices_in_kvcache is None:
        raise ValueError(f"{op}: extra_topk_length needs extra_k_cache and extra_indices_in_kvcache")
    if extra_k_cache is not None:
        _check_cache(op, extra_k_cache, is_fp8, dims, q.dtype, name="extra_k_cache", flag=flag)
        check_tensor(op, "extra_indices_in_kvcache", extra_indices_in_kvcache, INDEX_DTYPES, ("batch", "s_q", None),
                     dims)
        if extra_topk_length is not None:
            check_tensor(op, "extra_topk_length", extra_topk_length, INDEX_DTYPES, ("batch",), dims)
    _check_head_dim_v(op, head_dim_v, dims["d_qk"], is_fp8)
    _check_sink(op, attn_sink, dims)
    _check_metadata_inputs(op, tile_scheduler_metadata, num_splits, dims)
    check_same_device(op, q=q, k_cache=k_cache, indices=indices, topk_length=topk_length,
                      extra_k_cache=extra_k_cache, extra_indices_in_kvcache=extra_indices_in_kvcache,
                      extra_topk_length=extra_topk_length, attn_sink=attn_sink,
                      tile_scheduler_metadata=tile_scheduler_metadata, num_splits=num_splits)
    for name, cache_name, cache, idx, length in (("indices", "k_cache", k_cache, indices, topk_length),
                                                 ("extra_indices_in_kvcache", "extra_k_cache", extra_k_cache,
                                                  extra_indices_in_kvcache, extra_topk_length)):
        if idx is not None and value_checks_apply(idx):
            # Entries past a sequence's topk_length do not count (no kernel reads them): like unused block_table
            # entries they may hold anything.
            num_slots = cache.shape[0] * cache.shape[1]
            bad = ((idx < -1) | ~below(idx, num_slots)) & _within_length(idx, length)
            check(op, ~bad,
                  f"{name} entries must be -1 or flat cache slots in [0, {num_slots}) ({cache_name}'s num_blocks * "
                  f"page_block_size), got {idx[bad][:8].tolist()}")


def key_widths(*valids: torch.Tensor) -> list[list[int]]:
    """How many keys the sparse references attend over, per tensor of `valids` (each `(n, ..., topk)`) and per leading
    index: the most valid entries in any of its rows. One host sync for all of them (none while a CUDA graph is being
    captured: then every width is `topk`)."""
    if any(capturing(v) for v in valids):
        return [[v.shape[-1]] * v.shape[0] for v in valids]
    counts = torch.cat([v.sum(-1).reshape(v.shape[0], -1).amax(1) if v.numel() else
                        v.new_full((v.shape[0],), v.shape[-1], dtype=torch.long) for v in valids]).tolist()
    widths, start = [], 0
    for v in valids:
        widths.append(counts[start:start + v.shape[0]])
        start += v.shape[0]
    return widths


def canonical_order(indices: torch.Tensor, valid: torch.Tensor, width: int) -> torch.Tensor:
    """Per row of `indices` `(..., topk)`: the positions of its valid entries in ascending index order (duplicates
    kept), then the invalid ones, cut to `width` (from `key_widths`).

    Attention over a set of keys then computes the same float32 numbers whatever order the indexer ranked them in and
    however many -1s pad the list: with every visible token selected, the numbers dense attention computes over them
    (same keys in the same order, same matmul shapes). Sorting fixes the softmax's summation order; the width fixes
    the shapes, which matter because BLAS picks its blocking and thread split from them: with MKL on 2 threads a key's
    logit in a (4 x 576) @ (576 x 64) product rounds differently from the same key's in a (576 x 192) one."""
    key = torch.where(valid, indices.long(), torch.iinfo(torch.int64).max)
    return torch.sort(key, dim=-1, stable=True).indices[..., :width]


def _within_length(indices, topk_length):
    """indices `(batch, s_q, k)` (or sparse prefill's `(s_q, 1, k)`) -> which entries are within their row's
    `topk_length` `(batch,)` (`(s_q,)`); all of them without one."""
    if topk_length is None:
        return torch.ones_like(indices, dtype=torch.bool)
    return torch.arange(indices.shape[-1], device=indices.device) < topk_length[:, None, None]


def _sparse_valid(indices, topk_length):
    """indices `(batch, s_q, k)` -> which entries count: not -1, and within the sequence's `topk_length`."""
    return (indices >= 0) & _within_length(indices, topk_length)


def _sparse_keys(k_cache, indices, valid, width, is_fp8):
    """Rows and validity for one sequence's queries: indices and valid `(T, topk)` -> keys `(T, width, d_qk)` and
    valid `(T, width)`, in `canonical_order` (missing keys' rows 0: `masked_keys`)."""
    order = canonical_order(indices, valid, width)
    indices, valid = indices.gather(-1, order), valid.gather(-1, order)
    return masked_keys(_gather_rows(k_cache, torch.where(valid, indices, 0).long(), is_fp8), valid), valid


def masked_keys(keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Gathered keys `(T, K, d_qk)` (a fresh tensor, zeroed in place) with the rows of missing keys (`valid` `(T, K)`
    false) 0. They were gathered from slot / row 0 in their place, which no query need list (an empty cache's NaN or
    e4m3 NaN bytes): their softmax weight is 0, but 0 * NaN in the output's product is NaN."""
    return keys.masked_fill_(~valid[..., None], 0)


def sparse_decode_reference(q, k_cache, indices, topk_length, extra_k_cache, extra_indices_in_kvcache,
                            extra_topk_length,
                            head_dim_v, softmax_scale, is_fp8, attn_sink=None):
    batch, s_q, h_q, d_qk = q.shape
    out = q.new_empty(batch, s_q, h_q, head_dim_v, dtype=q.dtype)
    lse = q.new_empty(batch, h_q, s_q, dtype=torch.float32)
    all_valid = _sparse_valid(indices, topk_length)
    if extra_indices_in_kvcache is not None:
        extra_all_valid = _sparse_valid(extra_indices_in_kvcache, extra_topk_length)
        widths, extra_widths = key_widths(all_valid, extra_all_valid)
    else:
        (widths,), extra_widths = key_widths(all_valid), [0] * batch
    for b in range(batch):
        chunk = max(1, TOKENS_PER_CHUNK // max(1, (widths[b] + extra_widths[b]) * d_qk))
        for start in range(0, s_q, chunk):
            rows = slice(start, start + chunk)
            keys, valid = _sparse_keys(k_cache, indices[b, rows], all_valid[b, rows], widths[b], is_fp8)
            if extra_indices_in_kvcache is not None:
                extra_keys, extra_valid = _sparse_keys(extra_k_cache, extra_indices_in_kvcache[b, rows],
                                                       extra_all_valid[b, rows], extra_widths[b], is_fp8)
                keys, valid = torch.cat([keys, extra_keys], 1), torch.cat([valid, extra_valid], 1)
            out_b, lse_b, _ = attend(q[b, rows], keys, valid, softmax_scale, head_dim_v)
            out[b, rows] = apply_attn_sink(out_b, lse_b, attn_sink).to(q.dtype)
            lse[b, :, rows] = lse_b.T
    return out, lse


def _cuda_sparse_decode(q, k_cache, indices, topk_length, softmax_scale, is_fp8, attn_sink, extra_k_cache=None,
                        extra_indices=None, extra_topk_length=None):
    """csrc/dense_decode.cu's sparse decode (it reads unit-stride index rows, contiguous lengths and sinks). With an
    extra cache it launches the kernel over each cache, the second's split partials after the first's, and one
    combine merges them with the sink."""
    batch, s_q, h_q, _ = q.shape

    def num_splits(rows_of_indices):
        return cuda_num_splits(q.device, batch * s_q, h_q, -(-rows_of_indices.shape[-1] // PAGE_BLOCK_SIZE))

    extra = {}
    if extra_k_cache is not None:
        extra = dict(extra_kv_cache=extra_k_cache, extra_indices=last_dim_contiguous(extra_indices),
                     extra_topk_length=contiguous_or_none(extra_topk_length),
                     extra_num_splits=num_splits(extra_indices))
    return _ext.extension().sparse_decode(
        q, k_cache, last_dim_contiguous(indices), contiguous_or_none(topk_length), softmax_scale, is_fp8,
        num_splits(indices), contiguous_or_none(attn_sink), **extra)


def sparse_decode_path(q: torch.Tensor, k_cache: torch.Tensor, extra_k_cache: torch.Tensor | None, head_dim_v: int,
                       is_fp8: bool) -> str:
    """The path `flashmla::sparse_decode` takes for this q and these caches: 'cuda' (csrc/dense_decode.cu's sparse
    decode: with an extra cache one extension call, a launch over each cache and one combine), 'triton' or
    'reference', the first that takes them. Stops 49-50 sent an extra cache to Triton first, whose one pass beat two
    CUDA calls merged in PyTorch; the one call takes 290.7 us against Triton's 399.2 (fp8 b128 h128, 2048 + 128
    indices) and 103.1 against 150.9 (b64 h64, 2048 + 512) on the H200 (stop 51, docs/bench/stop51_call1.log)."""
    for path in _ext.paths("sparse_decode", q.device):
        if (path == "cuda" and q.shape[0] * q.shape[1] <= 65535
                and all(_cuda_dense_supports(q, cache, head_dim_v, is_fp8)
                        for cache in (k_cache, extra_k_cache) if cache is not None)):
            return "cuda"
        if path == "triton":
            from .triton import sparse as triton_sparse  # only where the Triton path exists (Triton installed)

            if triton_sparse.supports_decode(q, k_cache, extra_k_cache, head_dim_v, is_fp8):
                return "triton"
    return "reference"


@torch.library.custom_op("flashmla::sparse_decode", mutates_args=())
def sparse_decode(q: torch.Tensor, k_cache: torch.Tensor, indices: torch.Tensor, topk_length: torch.Tensor | None,
                  extra_k_cache: torch.Tensor | None, extra_indices_in_kvcache: torch.Tensor | None,
                  extra_topk_length: torch.Tensor | None, tile_scheduler_metadata: torch.Tensor | None,
                  num_splits: torch.Tensor | None, head_dim_v: int, softmax_scale: float, is_fp8: bool,
                  attn_sink: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse paged decode: query `(b, i)` sees exactly the cache slots `indices[b, i, :topk_length[b]]`
    (flat `block * 64 + row`, -1 = none), plus `extra_indices_in_kvcache[b, i, :extra_topk_length[b]]` of
    `extra_k_cache` in the same softmax. A length past topk counts every index, one of 0 or below none (not a
    Python slice's count from the end)."""
    _check_sparse("sparse_decode", q, k_cache, indices, topk_length, extra_k_cache, extra_indices_in_kvcache,
                  extra_topk_length, tile_scheduler_metadata, num_splits, head_dim_v, is_fp8, attn_sink)
    check_finite_scale("sparse_decode", "softmax_scale", softmax_scale)
    path = sparse_decode_path(q, k_cache, extra_k_cache, head_dim_v, is_fp8)
    if path == "cuda":
        return _cuda_sparse_decode(q, k_cache, indices, topk_length, softmax_scale, is_fp8, attn_sink, extra_k_cache,
                                   extra_indices_in_kvcache, extra_topk_length)
    if path == "triton":
        from .triton import sparse as triton_sparse

        return triton_sparse.sparse_decode(q, k_cache, indices, topk_length, extra_k_cache, extra_indices_in_kvcache,
                                           extra_topk_length, head_dim_v, softmax_scale, is_fp8, attn_sink)
    _ext.reference_fallback("sparse_decode", q.device)
    return sparse_decode_reference(q, k_cache, indices, topk_length, extra_k_cache, extra_indices_in_kvcache,
                                   extra_topk_length, head_dim_v, softmax_scale, is_fp8, attn_sink)


@sparse_decode.register_fake
def _(q, k_cache, indices, topk_length, extra_k_cache, extra_indices_in_kvcache, extra_topk_length,
      tile_scheduler_metadata, num_splits, head_dim_v, softmax_scale, is_fp8, attn_sink):
    _check_sparse("sparse_decode", q, k_cache, indices, topk_length, extra_k_cache, extra_indices_in_kvcache,
                  extra_topk_length, tile_scheduler_metadata, num_splits, head_dim_v, is_fp8, attn_sink)
    return _outputs(q, head_dim_v)
