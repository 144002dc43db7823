"""Every GPU kernel of the ops once over small edge-case inputs, for NVIDIA's compute-sanitizer (memcheck, initcheck,
racecheck, synccheck), each output checked against the reference. Run with the caching allocator off, so that every
tensor is an allocation of its own and a read or write past its end is one the sanitizer sees; the caches here are
exact-size allocations (the tests' are mostly slices of wider buffers, which hide such reads):

    python -m flashmla_ops.build    # the CUDA kernels first: the sanitizer would follow the compilers too
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 9 \
        python scripts/sanitize_ops.py

runs each op's best kernel (the CUDA one where built, else Triton's: write_index_cache and routed_experts have only
Triton ones); `--backend cuda` or `triton` that path alone (the reference where an op has none); `--only NAME` the
cases whose name contains NAME. Prints one line a
case, exits 1 if an output differs from the reference or, by default, if a case ran an op's reference on the GPU
(its kernels not built, or inputs they do not cover: the sanitizer would have checked no kernel); the sanitizer's own
exit code says whether it found errors.
"""
import argparse
import os
import sys

import torch

# the bands of the kernel tests: these are smoke checks on top of the sanitizer's, not the tests
BF16_BAND = 1e-2
LSE_TOLERANCE = 1e-3
INDEXER_BAND = 2e-2  # e4m3 products, relative to the largest logit
DEVICE = "cuda"  # --device cpu runs the cases on the reference path (a check of this script, not of kernels)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-12)).item()


def check_attention(out, lse, want_out, want_lse) -> str | None:
    """None when out and lse (finite where the reference's is) agree with the reference; else what differs."""
    if not torch.isfinite(out).all():
        return "non-finite output"
    error = relative_error(out, want_out)
    if error > BF16_BAND:
        return f"output off by {error:.2e}"
    if not torch.equal(torch.isinf(lse), torch.isinf(want_lse)):
        return "lse infinite elsewhere than the reference's"
    finite = torch.isfinite(want_lse)
    if finite.any() and (lse[finite] - want_lse[finite]).abs().max() > LSE_TOLERANCE:
        return "lse off"
    return None


class Inputs:
    """Random inputs of exact sizes on the GPU (a fresh generator per case)."""

    def __init__(self, seed: int):
        self.generator = torch.Generator(DEVICE).manual_seed(seed)

    def randn(self, *shape, scale=1.0):
        return torch.randn(*shape, generator=self.generator, device=DEVICE) * scale

    def randint(self, low, high, shape):
        return torch.randint(low, high, shape, generator=self.generator, device=DEVICE, dtype=torch.int32)

    def paged_cache(self, num_blocks: int, is_fp8: bool) -> torch.Tensor:
        from flashmla_ops import reference
        from flashmla_ops.kv_cache import D_QK, PAGE_BLOCK_SIZE
        cache = self.randn(num_blocks, PAGE_BLOCK_SIZE, 1, D_QK).bfloat16()
        return reference.quantize_kv_fp8(cache).clone() if is_fp8 else cache

    def q(self, batch, s_q, h_q):
        from flashmla_ops.kv_cache import D_QK
        return self.randn(batch, s_q, h_q, D_QK).bfloat16()

    def block_table(self, seqlens, unused: int | None = None):
        """(table, num_blocks): each sequence's blocks, shuffled, in a pool of exactly the blocks they use (their last
        rows are the cache's last bytes); `unused` fills the entries past a sequence's blocks (None: the pool's last
        block, a valid one)."""
        blocks = [max(1, -(-length // 64)) for length in seqlens]
        num_blocks = sum(blocks)
        fill = num_blocks - 1 if unused is None else unused
        table = torch.full((len(seqlens), max(blocks)), fill, dtype=torch.int32, device=DEVICE)
        order = torch.randperm(num_blocks, generator=self.generator, device=DEVICE).int()
        start = 0
        for b, count in enumerate(blocks):
            table[b, :count] = order[start:start + count]
            start += count
        return table, num_blocks

    def write_slots(self, num_slots: int, num_tokens: int):
        """Distinct int64 slots of a cache of `num_slots` (two writes of one slot race), the last of them the cache's
        last slot; from 3 tokens the second -1 (skipped)."""
        slots = torch.randperm(num_slots - 1, generator=self.generator, device=DEVICE)[:num_tokens - 1]
        slots = torch.cat([slots, slots.new_full((1,), num_slots - 1)])
        if num_tokens > 2:
            slots[1] = -1
        return slots

    def indices(self, shape, num_rows):
        """Random rows with -1s, duplicates, the last row of the cache, and the first query's list all -1."""
        indices = self.randint(0, num_rows, shape)
        indices[torch.rand(shape, generator=self.generator, device=DEVICE) < 0.2] = -1
        indices[..., -1] = num_rows - 1
        if shape[-1] > 3:
            indices[..., 1] = indices[..., 3]
        indices.view(-1, shape[-1])[0] = -1
        return indices


def dense_cases():
    """Dense decode through the public API (with and without get_mla_metadata's schedule): the narrow kernel (up to 16
    rows), the wide one, both caches, causal s_q 2 with a one-token sequence (its first query sees nothing), an empty
    sequence, lengths off the block size, a sink, batch 1 long enough for the many-splits combine."""
    shapes = [  # (seqlens, s_q, h_q, causal); the launch each reaches on a 132-SM H100 (decode.py's rules)
        ([1, 63, 65, 300], 1, 16, False),
        ([0, 1, 130, 1000], 2, 8, True),
        ([1, 200, 64 * 9 + 5], 2, 64, True),
        ([700, 3], 1, 128, False),
        ([400, 3], 1, 128, False),  # the few-splits combine of 4 (f16 partials)
        ([257, 64], 1, 100, False),
        ([9000], 1, 128, False),
        ([4500], 1, 128, False),  # by shape 70 CTAs (35 splits x 2 row tiles), scheduled 132: for racecheck (stop 53)
        ([9000], 1, 16, False),
        ([700] * 70, 1, 128, False),  # more CTAs than an H100's SMs: CTAs follow others on an SM
        ([1250, 3], 2, 100, True),  # no early refill (200 rows), Q by cp.async, the generic combine (10 splits)
        ([4300], 2, 16, False),  # Q's TMA box of whole queries; the many-splits combine in 8 parts
        ([0, 1, 64], 1, 8, False),  # the narrow kernel unsplit, 8 rows
        ([400, 0, 9], 1, 12, False),  # the few-splits combine of 4 (float32 partials); a sink on the narrow kernel
        ([4300, 0, 5, 130], 3, 4, True),  # the many-splits combine in 4 parts (float32)
        ([2100] + [64] * 7, 1, 16, False),  # the many-splits combine in 2 parts (float32)
    ]
    for seqlens, s_q, h_q, causal in shapes:
        for is_fp8 in (False, True):
            for scheduled in (True, False):
                cache = "fp8" if is_fp8 else "bf16"
                lengths = f"[{seqlens[0]}] x {len(seqlens)}" if len(seqlens) > 6 else str(seqlens)
                name = f"dense {cache} s_q{s_q} h{h_q} {lengths} {'scheduled' if scheduled else 'by shape'}"
                yield name, lambda seqlens=seqlens, s_q=s_q, h_q=h_q, causal=causal, is_fp8=is_fp8, \
                    scheduled=scheduled: run_dense(seqlens, s_q, h_q, causal, is_fp8, scheduled, sink=h_q in (12, 100))


def run_dense(seqlens, s_q, h_q, causal, is_fp8, scheduled, sink):
    import flashmla_ops
    from flashmla_ops import reference
    from flashmla_ops.kv_cache import D_QK, KV_LORA_RANK
    inputs = Inputs(sum(seqlens) + s_q + h_q + is_fp8)
    batch = len(seqlens)
    table, num_blocks = inputs.block_table(seqlens)
    cache = inputs.paged_cache(num_blocks, is_fp8)
    q = inputs.q(batch, s_q, h_q)
    lengths = torch.tensor(seqlens, dtype=torch.int32, device=DEVICE)
    attn_sink = inputs.randn(h_q) + 3 if sink else None
    meta = flashmla_ops.get_mla_metadata()[0] if scheduled else None
    out, lse = flashmla_ops.flash_mla_with_kvcache(q, cache, table, lengths, KV_LORA_RANK, meta, causal=causal,
                                                   is_fp8_kvcache=is_fp8, attn_sink=attn_sink)
    want_out, want_lse = reference.dense_decode(q, cache, table, lengths, KV_LORA_RANK, D_QK ** -0.5, causal, is_fp8,
                                                attn_sink)
    return check_attention(out, lse, want_out, want_lse)


def sparse_decode_cases():
    """Sparse decode over each cache: topk off the block size and up to 2048, topk_length with 0, h_q 64, 128 and 100
    (a part-empty second row tile), an extra cache with its own lengths, a sink."""
    shapes = [  # (batch, s_q, h_q, topk, extra_topk)
        (3, 2, 64, 600, 0),
        (2, 1, 128, 2048, 0),
        (3, 1, 100, 130, 90),
        (70, 1, 64, 64, 64),
        (2, 2, 128, 2048, 512),
        (2, 1, 32, 64, 0),  # no split: partials for neither cache (Triton: 32-head tiles)
        (1, 1, 64, 4300, 0),  # the many-splits combine in 4 parts
    ]
    for batch, s_q, h_q, topk, extra_topk in shapes:
        for is_fp8 in (False, True):
            name = f"sparse decode {'fp8' if is_fp8 else 'bf16'} b{batch} s_q{s_q} h{h_q} topk{topk}+{extra_topk}"
            yield name, lambda batch=batch, s_q=s_q, h_q=h_q, topk=topk, extra_topk=extra_topk, is_fp8=is_fp8: \
                run_sparse_decode(batch, s_q, h_q, topk, extra_topk, is_fp8)


def run_sparse_decode(batch, s_q, h_q, topk, extra_topk, is_fp8):
    import flashmla_ops
    from flashmla_ops import reference
    from flashmla_ops.kv_cache import D_QK, KV_LORA_RANK, PAGE_BLOCK_SIZE
    inputs = Inputs(batch + s_q + h_q + topk + extra_topk + is_fp8)
    main_blocks, extra_blocks = 5, 2
    cache = inputs.paged_cache(main_blocks, is_fp8)
    q = inputs.q(batch, s_q, h_q)
    indices = inputs.indices((batch, s_q, topk), main_blocks * PAGE_BLOCK_SIZE)
    topk_length = inputs.randint(0, topk + 1, (batch,))
    topk_length[0] = 0
    extra = {}
    if extra_topk:
        extra_length = inputs.randint(0, extra_topk + 1, (batch,))
        extra_length[-1] = 0
        extra = dict(extra_k_cache=inputs.paged_cache(extra_blocks, is_fp8),
                     extra_indices_in_kvcache=inputs.indices((batch, s_q, extra_topk), extra_blocks * PAGE_BLOCK_SIZE),
                     extra_topk_length=extra_length)
    attn_sink = inputs.randn(h_q) + 3 if h_q == 100 else None
    # Unchecked on the GPU, slots outside a cache are no token: one past the main cache's end, and in the extra list
    # slots of the main cache past the extra one's end (a kernel bounding them by the wrong cache reads past it), -7
    # and 2**31 - 1. The reference takes them as -1. (On the CPU the op's value checks reject them.)
    bad = {"indices": indices}
    if DEVICE == "cuda" and not os.environ.get("FLASHMLA_CHECK"):
        bad["indices"] = indices.clone()
        bad["indices"][..., 2::9] = main_blocks * PAGE_BLOCK_SIZE
        if extra_topk:
            bad_extra = extra["extra_indices_in_kvcache"].clone()
            bad_extra[..., 0::3] = inputs.randint(extra_blocks * PAGE_BLOCK_SIZE, main_blocks * PAGE_BLOCK_SIZE,
                                                  bad_extra[..., 0::3].shape)
            bad_extra[..., 1::7], bad_extra[..., 2::11] = 2 ** 31 - 1, -7
            extra["extra_indices_in_kvcache"] = torch.where(bad_extra < extra_blocks * PAGE_BLOCK_SIZE, bad_extra, -1)
            bad["extra_indices_in_kvcache"] = bad_extra
        indices = torch.where(bad["indices"] < main_blocks * PAGE_BLOCK_SIZE, bad["indices"], -1)
    meta = flashmla_ops.get_mla_metadata()[0]
    out, lse = flashmla_ops.flash_mla_with_kvcache(q, cache, None, None, KV_LORA_RANK, meta, is_fp8_kvcache=is_fp8,
                                                   attn_sink=attn_sink, topk_length=topk_length, **{**extra, **bad})
    want_out, want_lse = reference.sparse_decode(q, cache, indices, topk_length, extra.get("extra_k_cache"),
                                                 extra.get("extra_indices_in_kvcache"),
                                                 extra.get("extra_topk_length"), KV_LORA_RANK, D_QK ** -0.5, is_fp8,
                                                 attn_sink)
    return check_attention(out, lse, want_out, want_lse)


def sparse_prefill_cases():
    """Sparse prefill: h_q 64, 128 and 100, topk off the block size, indices at and past s_kv, topk_length, a sink, the
    indexer's LSE (not under --backend cuda: its kernel leaves that to Triton)."""
    for s_q, s_kv, h_q, topk, extras in [(37, 200, 64, 600, False), (5, 70, 128, 2048, True),
                                         (9, 129, 100, 130, True)]:
        yield f"sparse prefill s_q{s_q} s_kv{s_kv} h{h_q} topk{topk}", \
            lambda s_q=s_q, s_kv=s_kv, h_q=h_q, topk=topk, extras=extras: run_sparse_prefill(s_q, s_kv, h_q, topk,
                                                                                             extras)


def run_sparse_prefill(s_q, s_kv, h_q, topk, extras):
    import flashmla_ops
    from flashmla_ops import reference
    from flashmla_ops.kv_cache import D_QK, KV_LORA_RANK
    inputs = Inputs(s_q + s_kv + h_q + topk)
    q = inputs.randn(s_q, h_q, D_QK).bfloat16()
    kv = inputs.randn(s_kv, 1, D_QK).bfloat16()
    indices = inputs.indices((s_q, 1, topk), s_kv)
    indices[:, :, -2] = s_kv  # past the end: no token
    topk_length = inputs.randint(0, topk + 1, (s_q,)) if extras else None
    attn_sink = inputs.randn(h_q) + 3 if extras else None
    # the CUDA kernel leaves the indexer's LSE to the next path: under --backend cuda the op would run the reference
    indexer_topk = topk // 2 if extras and os.environ.get("FLASHMLA_BACKEND") != "cuda" else 0
    got = flashmla_ops.flash_mla_sparse_fwd(q, kv, indices, D_QK ** -0.5, KV_LORA_RANK, attn_sink, topk_length,
                                            indexer_topk)
    want = reference.sparse_prefill(q, kv, indices, D_QK ** -0.5, KV_LORA_RANK, attn_sink, topk_length, indexer_topk)
    out, max_logits, lse = got[:3]
    want_out, want_max, want_lse = want[:3]
    problem = check_attention(out, lse, want_out, want_lse)
    finite = torch.isfinite(want_max)
    if problem is None and not torch.equal(torch.isinf(max_logits), torch.isinf(want_max)):
        problem = "max_logits infinite elsewhere"
    if problem is None and finite.any() and (max_logits[finite] - want_max[finite]).abs().max() > LSE_TOLERANCE:
        problem = "max_logits off"
    if problem is None and indexer_topk:
        finite = torch.isfinite(want[3])
        if not torch.equal(torch.isinf(got[3]), torch.isinf(want[3])) or (
                finite.any() and (got[3][finite] - want[3][finite]).abs().max() > LSE_TOLERANCE):
            problem = "lse_indexer off"
    return problem


def kv_cache_cases():
    """The cache ops: quantize / dequantize odd token counts, writes of both caches into the last slots."""
    for num_tokens in (1, 67):
        yield f"quantize and dequantize {num_tokens} tokens", lambda n=num_tokens: run_quantize(n)
        for is_fp8 in (False, True):
            yield f"write_kv_cache {'fp8' if is_fp8 else 'bf16'} {num_tokens} tokens", \
                lambda n=num_tokens, is_fp8=is_fp8: run_write_kv(n, is_fp8)
            yield f"write_index_cache {'fp8' if is_fp8 else 'bf16'} {num_tokens} tokens", \
                lambda n=num_tokens, is_fp8=is_fp8: run_write_index(n, is_fp8)


def run_quantize(num_tokens):
    from flashmla_ops import reference
    from flashmla_ops.kv_cache import D_QK
    kv = Inputs(num_tokens).randn(num_tokens, D_QK).bfloat16()
    packed = torch.ops.flashmla.quantize_kv_fp8(kv)
    if not torch.equal(packed, reference.quantize_kv_fp8(kv)):
        return "quantize differs"
    if not torch.equal(torch.ops.flashmla.dequantize_kv_fp8(packed).view(torch.int16),
                       reference.dequantize_kv_fp8(packed).view(torch.int16)):
        return "dequantize differs"
    return None


def run_write_kv(num_tokens, is_fp8):
    from flashmla_ops import reference
    from flashmla_ops.kv_cache import KV_LORA_RANK, PAGE_BLOCK_SIZE, ROPE_DIM
    inputs = Inputs(num_tokens + is_fp8)
    num_blocks = 2
    cache = inputs.paged_cache(num_blocks, is_fp8)
    want = cache.clone()
    latent = inputs.randn(num_tokens, KV_LORA_RANK).bfloat16()
    rope = inputs.randn(num_tokens, ROPE_DIM).bfloat16()
    slots = inputs.write_slots(num_blocks * PAGE_BLOCK_SIZE, num_tokens)
    slots = slots.int() if num_tokens > 1 else slots  # both slot dtypes
    torch.ops.flashmla.write_kv_cache(cache, latent, rope, slots, is_fp8)
    reference.write_kv_cache(want, latent, rope, slots, is_fp8)
    return None if torch.equal(cache.view(torch.uint8), want.view(torch.uint8)) else "cache differs"


def run_write_index(num_tokens, is_fp8, d_i=128):
    from flashmla_ops import reference
    from flashmla_ops.kv_cache import PAGE_BLOCK_SIZE
    inputs = Inputs(num_tokens + 2 * is_fp8)
    num_blocks = 2
    if is_fp8:
        cache = torch.randint(0, 256, (num_blocks, PAGE_BLOCK_SIZE, d_i + 4), generator=inputs.generator,
                              device=DEVICE, dtype=torch.uint8)
    else:
        cache = inputs.randn(num_blocks, PAGE_BLOCK_SIZE, d_i).bfloat16()
    want = cache.clone()
    keys = inputs.randn(num_tokens, d_i).bfloat16()
    slots = inputs.write_slots(num_blocks * PAGE_BLOCK_SIZE, num_tokens)
    torch.ops.flashmla.write_index_cache(cache, keys, slots)
    reference.write_index_cache(want, keys, slots)
    return None if torch.equal(cache.view(torch.uint8), want.view(torch.uint8)) else "cache differs"


def indexer_cases():
    """The indexer: packed causal logits (FP8 q and keys, ragged and empty key ranges), paged logits over the FP8 index
    cache (lengths 0, 1, 65; s_q 2), top-k over rows with fewer finite keys than k, through a block table."""
    yield "indexer logits s_q 301 s_kv 4100 h 64", lambda: run_indexer_logits(301, 4100, 64)  # stages refilled
    yield "indexer logits s_q 5 s_kv 70 h 3", lambda: run_indexer_logits(5, 70, 3)
    yield "indexer paged logits [0, 1, 65, 700] s_q 2", lambda: run_indexer_paged([0, 1, 65, 700], 2, 64)
    yield "indexer paged logits [600] x 132 s_q 1", lambda: run_indexer_paged([600] * 132, 1, 32)
    yield "indexer top-k 3 x 20000 keys, k 2048", lambda: run_topk(3, 20000, 2048)  # four groups in flight
    yield "indexer top-k 2 x 70 keys, k 2048, block table", lambda: run_topk(2, 70, 2048, table=True)
    yield "indexer top-k 2 x 50001 keys, k 2048, block table", lambda: run_topk(2, 50001, 2048, table=True)
    yield "indexer top-k 1 x 50000 keys, k 2048", lambda: run_topk(1, 50000, 2048)  # rows past shared memory


def run_indexer_logits(s_q, s_kv, h_i):
    from flashmla_ops import indexer
    from flashmla_ops.kv_cache import quantize_fp8_rows
    inputs = Inputs(s_q + s_kv + h_i)
    q, q_scale = quantize_fp8_rows(inputs.randn(s_q, h_i, 128))
    k, k_scale = quantize_fp8_rows(inputs.randn(s_kv, 128))
    weights = inputs.randn(s_q, h_i)
    k_start = torch.div(torch.arange(s_q, device=DEVICE) * s_kv, 2 * s_q, rounding_mode="floor").int()
    k_end = (k_start + torch.arange(s_q, device=DEVICE) * 3).clamp_max(s_kv).int()
    k_end[0] = k_start[0]  # an empty range
    k_end[-1] = s_kv
    got = torch.ops.flashmla.indexer_logits(q, k, weights, k_start, k_end, q_scale, k_scale)
    want = indexer.indexer_logits_reference(q, k, weights, k_start, k_end, q_scale, k_scale)
    return check_logits(got, want)


def run_indexer_paged(seqlens, s_q, h_i):
    from flashmla_ops import indexer
    from flashmla_ops.kv_cache import quantize_fp8_rows, quantize_index_fp8_reference
    inputs = Inputs(sum(seqlens) + s_q + h_i)
    batch = len(seqlens)
    table, num_blocks = inputs.block_table(seqlens, unused=-1)
    cache = quantize_index_fp8_reference(inputs.randn(num_blocks, 64, 128))
    q, q_scale = quantize_fp8_rows(inputs.randn(batch, s_q, h_i, 128))
    weights = inputs.randn(batch, s_q, h_i)
    lengths = torch.tensor(seqlens, dtype=torch.int32, device=DEVICE)
    got = torch.ops.flashmla.indexer_logits_paged(q, cache, weights, table, lengths, q_scale)
    want = indexer.indexer_logits_paged_reference(q, cache, weights, table, lengths, q_scale)
    return check_logits(got, want)


def check_logits(got, want):
    if not torch.equal(torch.isinf(got), torch.isinf(want)):
        return "-inf elsewhere than the reference's"
    finite = torch.isfinite(want)
    if finite.any():
        error = (got[finite] - want[finite]).abs().max() / want[finite].abs().max().clamp_min(1e-12)
        if error > INDEXER_BAND:
            return f"logits off by {error:.2e} of the largest"
    return None


def run_topk(rows, num_keys, topk, table=False):
    from flashmla_ops import indexer
    inputs = Inputs(rows + num_keys + topk)
    logits = inputs.randn(rows, 2, num_keys)
    logits[0, :, num_keys // 3:] = float("-inf")  # fewer finite keys than k (in the first row)
    if table:  # through a block table: slots of shuffled blocks
        blocks = -(-num_keys // 64)
        table = torch.stack([torch.randperm(4 * blocks, generator=inputs.generator, device=DEVICE)[:blocks]
                             for _ in range(rows)]).int()
    else:
        table = None
    got = torch.ops.flashmla.indexer_topk(logits, topk, table)
    # The reference on the CPU: torch.topk's multi-block radix select on the GPU reads scratch it never wrote, which
    # initcheck reports (stop 53: 212,796 reads in at::native::mbtopk::computeBlockDigitCounts at 50,000 keys).
    want = indexer.indexer_topk_reference(logits.cpu(), topk, None if table is None else table.cpu())
    return None if torch.equal(got.cpu(), want) else "selection differs"


def metadata_cases():
    """get_mla_metadata on the device alone, for batches with empty and long sequences."""
    for seqlens in ([0, 0, 1], [5, 70000, 64, 0], [4096] * 1100):  # past 1024 sequences: another loop
        yield f"get_mla_metadata {len(seqlens)} sequences", lambda seqlens=seqlens: run_metadata(seqlens)


def run_metadata(seqlens):
    from flashmla_ops import decode
    lengths = torch.tensor(seqlens, dtype=torch.int32, device=DEVICE)
    parts = decode.num_sm_parts(DEVICE, 1, 128)
    got = torch.ops.flashmla.get_mla_metadata(lengths, parts)
    want = decode.get_mla_metadata_reference(lengths, parts)
    return None if all(torch.equal(a, b) for a, b in zip(got, want)) else "schedule differs"


def moe_cases():
    """The routed experts (a Triton kernel; no CUDA one): choices of experts outside [0, E) among them."""
    yield "routed_experts 3 tokens", lambda: run_moe(3)


def run_moe(tokens):
    from flashmla_ops import reference
    inputs = Inputs(tokens)
    hidden, inter, num_experts, top_k = 200, 70, 4, 2
    x = inputs.randn(tokens, hidden).bfloat16()
    gate_up = inputs.randn(num_experts, 2 * inter, hidden, scale=0.1).bfloat16()
    down = inputs.randn(num_experts, hidden, inter, scale=0.1).bfloat16()
    weights = torch.rand(tokens, top_k, generator=inputs.generator, device=DEVICE)
    experts = torch.randint(0, num_experts, (tokens, top_k), generator=inputs.generator, device=DEVICE)
    experts[0, 1], experts[-1, 0] = -1, num_experts  # another rank's experts: not chosen
    got = torch.ops.flashmla.routed_experts(x, gate_up, down, weights, experts)
    error = relative_error(got, reference.routed_experts(x, gate_up, down, weights, experts))
    return None if error < BF16_BAND else f"output off by {error:.2e}"


CASES = (dense_cases, sparse_decode_cases, sparse_prefill_cases, kv_cache_cases, indexer_cases, metadata_cases,
         moe_cases)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("auto", "cuda", "triton"), default="auto",
                        help="auto: each op's best kernel (CUDA, else Triton: write_index_cache and routed_experts "
                             "have only Triton ones); cuda / triton: that path only, the reference elsewhere")
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: the reference path on the CPU (checks this script)")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    os.environ["FLASHMLA_BACKEND"] = args.backend if DEVICE == "cuda" else "reference"
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("sanitize_ops.py: needs a CUDA GPU (or --device cpu)")
        return 2
    import flashmla_ops

    # the ops run on the GPU here: under --backend auto each has a kernel for every case, and a reference run means
    # the sanitizer checked no kernel
    expect_kernels = DEVICE == "cuda" and args.backend == "auto"
    failed = 0
    for cases in CASES:
        for name, case in cases():
            if args.only not in name:
                continue
            with flashmla_ops.reference_runs() as ran_reference:
                problem = case()
            if expect_kernels and ran_reference:
                problem = f"ran the reference of {', '.join(sorted(set(ran_reference)))}, no kernel"
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            failed += problem is not None
            print(f"{name:64} {problem or 'ok'}", flush=True)
    print(f"{failed} case(s) failed: an output off the reference, or no kernel run")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
