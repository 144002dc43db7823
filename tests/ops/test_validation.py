"""Bad inputs get a ValueError or TypeError that names the argument, from the API, the ops, and the fake impls."""
import math
import re

import pytest
import torch

import flashmla_ops
import mla_oracle as oracle

ops = torch.ops.flashmla
I32 = torch.int32


def fp8_cache(num_blocks):
    return ops.quantize_kv_fp8(oracle.bf16(num_blocks, 64, 1, oracle.D_QK))


# Valid arguments for every entry point; each case below breaks one of them.
def dense_api():
    return dict(q=oracle.bf16(2, 1, 4, 576), k_cache=oracle.bf16(4, 64, 1, 576),
                block_table=torch.tensor([[0, 1], [2, 3]], dtype=I32), cache_seqlens=torch.tensor([70, 5], dtype=I32),
                head_dim_v=512, tile_scheduler_metadata=None)


def sparse_api():
    return dict(q=oracle.bf16(2, 1, 4, 576), k_cache=fp8_cache(3), block_table=None, cache_seqlens=None, head_dim_v=512,
                tile_scheduler_metadata=None, is_fp8_kvcache=True,
                indices=torch.randint(-1, 3 * 64, (2, 1, 10), dtype=I32), topk_length=torch.tensor([10, 3], dtype=I32),
                extra_k_cache=fp8_cache(2), extra_indices_in_kvcache=torch.randint(-1, 128, (2, 1, 5), dtype=I32),
                extra_topk_length=torch.tensor([5, 1], dtype=I32), attn_sink=torch.randn(4))


def sparse_fwd():
    return dict(q=oracle.bf16(6, 4, 576), kv=oracle.bf16(6, 1, 576), indices=torch.randint(-1, 8, (6, 1, 8), dtype=I32),
                sm_scale=0.05, d_v=512, attn_sink=torch.randn(4), topk_length=torch.full((6,), 5, dtype=I32),
                indexer_topk=4)


def dense_op():
    api = dense_api()
    return dict(q=api["q"], k_cache=api["k_cache"], block_table=api["block_table"], cache_seqlens=api["cache_seqlens"],
                tile_scheduler_metadata=None, num_splits=None, head_dim_v=512, softmax_scale=0.04, causal=False,
                is_fp8=False, attn_sink=None)


def sparse_op():
    api = sparse_api()
    return dict(q=api["q"], k_cache=api["k_cache"], indices=api["indices"], topk_length=api["topk_length"],
                extra_k_cache=api["extra_k_cache"], extra_indices_in_kvcache=api["extra_indices_in_kvcache"],
                extra_topk_length=api["extra_topk_length"], tile_scheduler_metadata=None, num_splits=None,
                head_dim_v=512, softmax_scale=0.04, is_fp8=True, attn_sink=api["attn_sink"])


def prefill_op():
    return sparse_fwd()


def write_kv(fp8=False):
    cache = fp8_cache(2) if fp8 else oracle.bf16(2, 64, 1, 576)
    return dict(kv_cache=cache, latent=oracle.bf16(3, 512), rope=oracle.bf16(3, 64),
                slot_mapping=torch.tensor([0, 100, -1], dtype=I32), is_fp8=fp8)


def write_index():
    return dict(index_cache=oracle.bf16(2, 64, 32), k=oracle.bf16(3, 32), slot_mapping=torch.tensor([0, 100, -1], dtype=I32))


def logits_args(fp8=False):
    q, k = oracle.bf16(4, 2, 16), oracle.bf16(10, 16)
    args = dict(q=q, k=k, weights=torch.randn(4, 2), k_start=torch.tensor([0, 0, 2, 5], dtype=I32),
                k_end=torch.tensor([1, 10, 2, 9], dtype=I32), q_scale=None, k_scale=None)
    if fp8:
        args.update(q=q.to(torch.float8_e4m3fn), k=k.to(torch.float8_e4m3fn), q_scale=torch.ones(4, 2),
                    k_scale=torch.ones(10))
    return args


def paged_args():
    return dict(q=oracle.bf16(2, 1, 2, 16), index_cache=oracle.bf16(3, 64, 16), weights=torch.randn(2, 1, 2),
                block_table=torch.tensor([[0, 1], [2, 0]], dtype=I32), cache_seqlens=torch.tensor([70, 10], dtype=I32),
                q_scale=None)


def topk_args():
    return dict(logits=torch.randn(2, 3, 100), topk=5, block_table=torch.tensor([[0, 1], [2, 3]], dtype=I32))


def metadata_args():
    return dict(cache_seqlens=torch.tensor([5, 100, 0], dtype=I32), num_sm_parts=4)


def experts_args():
    return dict(x=oracle.bf16(2, 16), gate_up_proj=oracle.bf16(3, 8, 16), down_proj=oracle.bf16(3, 16, 4),
                weights=torch.rand(2, 2), experts=torch.tensor([[0, 2], [1, 5]]))


ENTRIES = {
    "flash_mla_with_kvcache": (flashmla_ops.flash_mla_with_kvcache, dense_api),
    "flash_mla_with_kvcache[sparse]": (flashmla_ops.flash_mla_with_kvcache, sparse_api),
    "flash_mla_sparse_fwd": (flashmla_ops.flash_mla_sparse_fwd, sparse_fwd),
    "dense_decode": (ops.dense_decode, dense_op),
    "sparse_decode": (ops.sparse_decode, sparse_op),
    "sparse_prefill": (ops.sparse_prefill, prefill_op),
    "quantize_kv_fp8": (ops.quantize_kv_fp8, lambda: dict(kv=oracle.bf16(3, 576))),
    "dequantize_kv_fp8": (ops.dequantize_kv_fp8, lambda: dict(kv_fp8=fp8_cache(1)[0])),
    "write_kv_cache": (ops.write_kv_cache, write_kv),
    "write_kv_cache[fp8]": (ops.write_kv_cache, lambda: write_kv(fp8=True)),
    "write_index_cache": (ops.write_index_cache, write_index),
    "indexer_logits": (ops.indexer_logits, logits_args),
    "indexer_logits[fp8]": (ops.indexer_logits, lambda: logits_args(fp8=True)),
    "indexer_logits_paged": (ops.indexer_logits_paged, paged_args),
    "indexer_topk": (ops.indexer_topk, topk_args),
    "get_mla_metadata": (ops.get_mla_metadata, metadata_args),
    "routed_experts": (ops.routed_experts, experts_args),
}



def set_(**changes):
    return lambda args: args.update({k: (v(args) if callable(v) else v) for k, v in changes.items()})


def non_contiguous_last_dim(t):
    strided = torch.stack([t, t], dim=-1)[..., 0]
    assert strided.stride(-1) == 2 and torch.equal(strided, t)
    return strided


# (entry, what is wrong, how, exception, argument named; "value" cases read tensor values so are skipped on meta)
CASES = [
    # FlashMLA API, dense
    ("flash_mla_with_kvcache", "q dtype", set_(q=lambda a: a["q"].half()), TypeError, "q"),
    ("flash_mla_with_kvcache", "float32 q, BF16 cache", set_(q=lambda a: a["q"].float()), TypeError, "k_cache"),
    ("flash_mla_with_kvcache", "q rank", set_(q=lambda a: a["q"][0]), ValueError, "q"),
    ("flash_mla_with_kvcache", "q last dim non-contiguous", set_(q=lambda a: non_contiguous_last_dim(a["q"])), ValueError, "q"),
    ("flash_mla_with_kvcache", "h_kv 2", set_(k_cache=oracle.bf16(4, 64, 2, 576)), ValueError, "k_cache"),
    ("flash_mla_with_kvcache", "cache d_qk != q d_qk", set_(k_cache=oracle.bf16(4, 64, 1, 512)), ValueError, "k_cache"),
    ("flash_mla_with_kvcache", "page size 32", set_(k_cache=oracle.bf16(8, 32, 1, 576)), ValueError, "k_cache"),
    ("flash_mla_with_kvcache", "k_cache dtype", set_(k_cache=lambda a: a["k_cache"].half()), TypeError, "k_cache"),
    ("flash_mla_with_kvcache", "k_cache last dim non-contiguous",
     set_(k_cache=lambda a: non_contiguous_last_dim(a["k_cache"])), ValueError, "k_cache"),
    ("flash_mla_with_kvcache", "FP8 cache, d_qk 512",
     set_(q=oracle.bf16(2, 1, 4, 512), k_cache=fp8_cache(4), is_fp8_kvcache=True), ValueError, "q"),
    ("flash_mla_with_kvcache", "FP8 cache, head_dim_v 256",
     set_(k_cache=fp8_cache(4), is_fp8_kvcache=True, head_dim_v=256), ValueError, "head_dim_v"),
    ("flash_mla_with_kvcache", "FP8 flag on a BF16 cache", set_(is_fp8_kvcache=True), TypeError, "k_cache"),
    ("flash_mla_with_kvcache", "head_dim_v > d_qk", set_(head_dim_v=600), ValueError, "head_dim_v"),
    ("flash_mla_with_kvcache", "block_table dtype", set_(block_table=lambda a: a["block_table"].long()), TypeError, "block_table"),
    ("flash_mla_with_kvcache", "block_table batch 3",
     set_(block_table=torch.zeros(3, 2, dtype=I32)), ValueError, "block_table"),
    ("flash_mla_with_kvcache", "block_table 1-D", set_(block_table=torch.zeros(4, dtype=I32)), ValueError, "block_table"),
    ("flash_mla_with_kvcache", "cache_seqlens batch 3",
     set_(cache_seqlens=torch.tensor([1, 2, 3], dtype=I32)), ValueError, "cache_seqlens"),
    ("flash_mla_with_kvcache", "cache_seqlens dtype", set_(cache_seqlens=lambda a: a["cache_seqlens"].long()), TypeError,
     "cache_seqlens"),
    ("flash_mla_with_kvcache", "attn_sink shape", set_(attn_sink=torch.randn(5)), ValueError, "attn_sink"),
    ("flash_mla_with_kvcache", "attn_sink dtype", set_(attn_sink=torch.randn(4).bfloat16()), TypeError, "attn_sink"),
    ("flash_mla_with_kvcache", "num_splits given", set_(num_splits=torch.zeros(3, dtype=I32)), ValueError, "num_splits"),
    ("flash_mla_with_kvcache", "tile_scheduler_metadata a tensor",
     set_(tile_scheduler_metadata=torch.zeros(1, 8, dtype=I32)), TypeError, "tile_scheduler_metadata"),
    ("flash_mla_with_kvcache", "no block_table", set_(block_table=None), ValueError, "block_table"),
    ("flash_mla_with_kvcache", "cache_seqlens 2-D", set_(cache_seqlens=torch.tensor([[70, 5]], dtype=I32)), ValueError,
     "cache_seqlens"),
    ("flash_mla_with_kvcache", "cache_seqlens a list", set_(cache_seqlens=[70, 5]), TypeError, "cache_seqlens"),
    ("flash_mla_with_kvcache", "head_dim_v None", set_(head_dim_v=None), TypeError, "head_dim_v"),
    ("flash_mla_with_kvcache", "head_dim_v a bool", set_(head_dim_v=True), TypeError, "head_dim_v"),
    ("flash_mla_with_kvcache", "softmax_scale a string", set_(softmax_scale="0.1"), TypeError, "softmax_scale"),
    ("flash_mla_with_kvcache", "causal None", set_(causal=None), TypeError, "causal"),
    ("flash_mla_with_kvcache", "topk_length without indices", set_(topk_length=torch.tensor([1, 1], dtype=I32)),
     ValueError, "topk_length"),
    ("flash_mla_with_kvcache", "extra_k_cache without indices", set_(extra_k_cache=oracle.bf16(4, 64, 1, 576)),
     ValueError, "extra_k_cache"),
    ("flash_mla_with_kvcache", "value: cache_seqlens beyond the table (2 blocks = 128 tokens)",
     set_(cache_seqlens=torch.tensor([129, 5], dtype=I32)), ValueError, "cache_seqlens"),
    ("flash_mla_with_kvcache", "value: cache_seqlens negative", set_(cache_seqlens=torch.tensor([70, -1], dtype=I32)),
     ValueError, "cache_seqlens"),
    ("flash_mla_with_kvcache", "value: used block_table entry >= num_blocks",
     set_(block_table=torch.tensor([[0, 4], [2, 3]], dtype=I32)), ValueError, "block_table"),
    ("flash_mla_with_kvcache", "value: used block_table entry -1",
     set_(block_table=torch.tensor([[0, 1], [-1, 3]], dtype=I32)), ValueError, "block_table"),
    # FlashMLA API, sparse
    ("flash_mla_with_kvcache[sparse]", "causal with indices", set_(causal=True), ValueError, "causal"),
    # sparse attention reads no block_table or cache_seqlens, but one given must be what it says
    ("flash_mla_with_kvcache[sparse]", "block_table float16", set_(block_table=torch.zeros(2, 7, dtype=torch.float16)),
     TypeError, "block_table"),
    ("flash_mla_with_kvcache[sparse]", "cache_seqlens batch 1", set_(cache_seqlens=torch.tensor([-1], dtype=I32)),
     ValueError, "cache_seqlens"),
    ("flash_mla_with_kvcache", "d_qk 0 with the default scale (d_qk ** -0.5)", set_(q=oracle.bf16(2, 1, 4, 0)),
     ValueError, "q"),
    ("flash_mla_with_kvcache", "softmax_scale NaN", set_(softmax_scale=float("nan")), ValueError, "softmax_scale"),
    ("flash_mla_with_kvcache", "softmax_scale -inf", set_(softmax_scale=float("-inf")), ValueError, "softmax_scale"),
    ("flash_mla_with_kvcache", "softmax_scale a bool tensor", set_(softmax_scale=torch.tensor(True)), TypeError,
     "softmax_scale"),
    ("flash_mla_with_kvcache", "causal 2", set_(causal=2), TypeError, "causal"),
    ("flash_mla_with_kvcache", "is_fp8_kvcache -1", set_(is_fp8_kvcache=-1), TypeError, "is_fp8_kvcache"),
    ("flash_mla_sparse_fwd", "sm_scale inf", set_(sm_scale=float("inf")), ValueError, "sm_scale"),
    # a 0-d tensor scale is read and checked as a float (NaN in one gave NaN outputs)
    ("flash_mla_with_kvcache", "softmax_scale a NaN tensor", set_(softmax_scale=torch.tensor(float("nan"))),
     ValueError, "softmax_scale"),
    ("flash_mla_with_kvcache[sparse]", "softmax_scale an inf tensor", set_(softmax_scale=torch.tensor(float("inf"))),
     ValueError, "softmax_scale"),
    ("flash_mla_sparse_fwd", "sm_scale a NaN tensor", set_(sm_scale=torch.tensor(float("nan"))), ValueError,
     "sm_scale"),
    ("flash_mla_sparse_fwd", "sm_scale a complex tensor", set_(sm_scale=torch.tensor(0.1 + 1j)), TypeError,
     "sm_scale"),
    ("flash_mla_sparse_fwd", "sm_scale a meta tensor", set_(sm_scale=torch.tensor(0.1, device="meta")), TypeError,
     "sm_scale"),
    ("flash_mla_sparse_fwd", "sm_scale an int past float's range", set_(sm_scale=10 ** 400), ValueError, "sm_scale"),
    ("dense_decode", "tile_scheduler_metadata without num_splits", set_(tile_scheduler_metadata=torch.full(
        (1, 8), 123, dtype=I32)), ValueError, "num_splits"),
    ("dense_decode", "num_splits without tile_scheduler_metadata", set_(num_splits=torch.zeros(3, dtype=I32)),
     ValueError, "tile_scheduler_metadata"),
    ("get_mla_metadata", "value: cache_seqlens -1", set_(cache_seqlens=torch.tensor([5, -1, 0], dtype=I32)), ValueError,
     "cache_seqlens"),
    # a cache made by expand: a write to one block would land in every block
    ("write_kv_cache", "kv_cache overlapping itself", set_(kv_cache=oracle.bf16(1, 64, 1, 576).expand(2, 64, 1, 576)),
     ValueError, "kv_cache"),
    ("write_kv_cache[fp8]", "kv_cache rows overlapping", set_(kv_cache=fp8_cache(2)[:, :1].expand(2, 64, 1, 656)),
     ValueError, "kv_cache"),
    ("write_index_cache", "index_cache overlapping itself", set_(index_cache=oracle.bf16(1, 64, 32).expand(2, 64, 32)),
     ValueError, "index_cache"),
    # overlapping by one row or element: a block's first row is the previous one's last (a row's first element too)
    ("write_kv_cache", "kv_cache blocks sharing a row", set_(kv_cache=oracle.bf16(2 * 64 * 576).as_strided(
        (2, 64, 1, 576), (63 * 576, 576, 576, 1))), ValueError, "kv_cache"),
    ("write_index_cache", "index_cache rows sharing an element", set_(index_cache=oracle.bf16(2 * 64 * 32).as_strided(
        (2, 64, 32), (64 * 32, 31, 1))), ValueError, "index_cache"),
    ("flash_mla_with_kvcache[sparse]", "indices dtype", set_(indices=lambda a: a["indices"].long()), TypeError, "indices"),
    ("flash_mla_with_kvcache[sparse]", "indices batch 3", set_(indices=torch.zeros(3, 1, 10, dtype=I32)), ValueError,
     "indices"),
    ("flash_mla_with_kvcache[sparse]", "indices s_q 2", set_(indices=torch.zeros(2, 2, 10, dtype=I32)), ValueError,
     "indices"),
    ("flash_mla_with_kvcache[sparse]", "indices rank 2", set_(indices=torch.zeros(2, 10, dtype=I32)), ValueError, "indices"),
    ("flash_mla_with_kvcache[sparse]", "topk_length batch 3", set_(topk_length=torch.ones(3, dtype=I32)), ValueError,
     "topk_length"),
    ("flash_mla_with_kvcache[sparse]", "topk_length dtype", set_(topk_length=torch.ones(2, dtype=torch.int64)), TypeError,
     "topk_length"),
    ("flash_mla_with_kvcache[sparse]", "extra_k_cache alone", set_(extra_indices_in_kvcache=None, extra_topk_length=None),
     ValueError, "extra_indices_in_kvcache"),
    ("flash_mla_with_kvcache[sparse]", "extra_topk_length alone",
     set_(extra_k_cache=None, extra_indices_in_kvcache=None), ValueError, "extra_topk_length"),
    ("flash_mla_with_kvcache[sparse]", "extra_indices batch 3",
     set_(extra_indices_in_kvcache=torch.zeros(3, 1, 5, dtype=I32)), ValueError, "extra_indices_in_kvcache"),
    ("flash_mla_with_kvcache[sparse]", "extra_topk_length shape", set_(extra_topk_length=torch.ones(1, dtype=I32)),
     ValueError, "extra_topk_length"),
    ("flash_mla_with_kvcache[sparse]", "extra_k_cache h_kv 2", set_(extra_k_cache=torch.zeros(2, 64, 2, 656, dtype=torch.uint8)),
     ValueError, "extra_k_cache"),
    ("flash_mla_with_kvcache[sparse]", "extra_k_cache BF16 with an FP8 main cache",
     set_(extra_k_cache=oracle.bf16(2, 64, 1, 576)), TypeError, "extra_k_cache"),
    ("flash_mla_with_kvcache[sparse]", "FP8 cache row of 576 bytes", set_(k_cache=torch.zeros(3, 64, 1, 576, dtype=torch.uint8)),
     ValueError, "k_cache"),
    ("flash_mla_with_kvcache[sparse]", "attn_sink shape", set_(attn_sink=torch.randn(2, 2)), ValueError, "attn_sink"),
    ("flash_mla_with_kvcache[sparse]", "topk_length 2-D", set_(topk_length=torch.tensor([[10, 3]], dtype=I32)),
     ValueError, "topk_length"),
    ("flash_mla_with_kvcache[sparse]", "indices a list", set_(indices=lambda a: a["indices"].tolist()), TypeError,
     "indices"),
    ("flash_mla_with_kvcache[sparse]", "is_fp8_kvcache a string", set_(is_fp8_kvcache="yes"), TypeError,
     "is_fp8_kvcache"),
    ("flash_mla_with_kvcache[sparse]", "topk_length a list", set_(topk_length=[10, 3]), TypeError, "topk_length"),
    ("flash_mla_with_kvcache[sparse]", "value: index = num_blocks * 64",
     set_(indices=lambda a: a["indices"].index_fill(2, torch.tensor([3]), 3 * 64)), ValueError, "indices"),
    ("flash_mla_with_kvcache[sparse]", "value: index -2",
     set_(indices=lambda a: a["indices"].index_fill(2, torch.tensor([0]), -2)), ValueError, "indices"),
    ("flash_mla_with_kvcache[sparse]", "value: extra index = num_blocks * 64",
     set_(extra_indices_in_kvcache=lambda a: a["extra_indices_in_kvcache"].index_fill(2, torch.tensor([4]), 128)),
     ValueError, "extra_indices_in_kvcache"),
    # sparse prefill API
    ("flash_mla_sparse_fwd", "q dtype", set_(q=lambda a: a["q"].half()), TypeError, "q"),
    ("flash_mla_sparse_fwd", "q rank", set_(q=lambda a: a["q"][None]), ValueError, "q"),
    ("flash_mla_sparse_fwd", "q last dim non-contiguous", set_(q=lambda a: non_contiguous_last_dim(a["q"])), ValueError, "q"),
    ("flash_mla_sparse_fwd", "kv h_kv 2", set_(kv=oracle.bf16(6, 2, 576)), ValueError, "kv"),
    ("flash_mla_sparse_fwd", "kv d_qk 512", set_(kv=oracle.bf16(6, 1, 512)), ValueError, "kv"),
    ("flash_mla_sparse_fwd", "kv dtype", set_(kv=lambda a: a["kv"].half()), TypeError, "kv"),
    ("flash_mla_sparse_fwd", "float32 kv, BF16 q", set_(kv=lambda a: a["kv"].float()), TypeError, "kv"),
    ("flash_mla_sparse_fwd", "kv last dim non-contiguous", set_(kv=lambda a: non_contiguous_last_dim(a["kv"])), ValueError,
     "kv"),
    ("flash_mla_sparse_fwd", "indices s_q 5", set_(indices=torch.zeros(5, 1, 8, dtype=I32)), ValueError, "indices"),
    ("flash_mla_sparse_fwd", "indices h_kv 2", set_(indices=torch.zeros(6, 2, 8, dtype=I32)), ValueError, "indices"),
    ("flash_mla_sparse_fwd", "indices dtype", set_(indices=lambda a: a["indices"].long()), TypeError, "indices"),
    ("flash_mla_sparse_fwd", "d_v > d_qk", set_(d_v=577), ValueError, "d_v"),
    ("flash_mla_sparse_fwd", "attn_sink shape", set_(attn_sink=torch.randn(6)), ValueError, "attn_sink"),
    ("flash_mla_sparse_fwd", "topk_length shape", set_(topk_length=torch.ones(5, dtype=I32)), ValueError, "topk_length"),
    ("flash_mla_sparse_fwd", "indexer_topk -1", set_(indexer_topk=-1), ValueError, "indexer_topk"),
    ("flash_mla_sparse_fwd", "sm_scale None", set_(sm_scale=None), TypeError, "sm_scale"),
    ("flash_mla_sparse_fwd", "d_v a float", set_(d_v=512.0), TypeError, "d_v"),
    ("flash_mla_sparse_fwd", "indexer_topk None", set_(indexer_topk=None), TypeError, "indexer_topk"),
    ("flash_mla_sparse_fwd", "value: index -2", set_(indices=lambda a: a["indices"].index_fill(2, torch.tensor([1]), -2)),
     ValueError, "indices"),
    # the decode ops themselves
    # the ops check a non-finite scale as the API does (it gave NaN outputs); a value check: the fake impls see a
    # symbolic scale under torch.compile, and the compiled graph's real call checks it
    ("dense_decode", "value: softmax_scale NaN", set_(softmax_scale=float("nan")), ValueError, "softmax_scale"),
    ("sparse_decode", "value: softmax_scale inf", set_(softmax_scale=float("inf")), ValueError, "softmax_scale"),
    ("sparse_prefill", "value: sm_scale -inf", set_(sm_scale=float("-inf")), ValueError, "sm_scale"),
    ("dense_decode", "q dtype", set_(q=lambda a: a["q"].half()), TypeError, "q"),
    ("dense_decode", "q rank", set_(q=lambda a: a["q"][0]), ValueError, "q"),
    ("dense_decode", "h_kv 2", set_(k_cache=oracle.bf16(4, 64, 2, 576)), ValueError, "k_cache"),
    ("dense_decode", "block_table batch 1", set_(block_table=torch.zeros(1, 2, dtype=I32)), ValueError, "block_table"),
    ("dense_decode", "cache_seqlens 2-D", set_(cache_seqlens=torch.zeros(2, 1, dtype=I32)), ValueError, "cache_seqlens"),
    ("dense_decode", "tile_scheduler_metadata width 7", set_(tile_scheduler_metadata=torch.zeros(4, 7, dtype=I32)),
     ValueError, "tile_scheduler_metadata"),
    ("dense_decode", "num_splits length", set_(num_splits=torch.zeros(2, dtype=I32)), ValueError, "num_splits"),
    ("dense_decode", "tile_scheduler_metadata of no parts",
     set_(tile_scheduler_metadata=torch.zeros(0, 8, dtype=I32), num_splits=torch.zeros(3, dtype=I32)), ValueError,
     "tile_scheduler_metadata"),
    # get_mla_metadata's schedule for other lengths (same shapes): not the contract (its split does not balance them)
    ("dense_decode", "value: metadata of other cache_seqlens",
     set_(**dict(zip(("tile_scheduler_metadata", "num_splits"),
                     ops.get_mla_metadata(torch.tensor([5, 70], dtype=I32), 3)))), ValueError,
     "tile_scheduler_metadata"),
    # the metadata these lengths give, but num_splits not theirs (here every length gives [0, 1, 2])
    ("dense_decode", "value: num_splits not get_mla_metadata's",
     set_(tile_scheduler_metadata=ops.get_mla_metadata(torch.tensor([70, 5], dtype=I32), 3)[0],
          num_splits=torch.tensor([0, 2, 3], dtype=I32)), ValueError, "num_splits"),
    ("dense_decode", "FP8, head_dim_v 576", set_(k_cache=fp8_cache(4), is_fp8=True, head_dim_v=576), ValueError,
     "head_dim_v"),
    ("dense_decode", "value: cache_seqlens beyond the table", set_(cache_seqlens=torch.tensor([70, 200], dtype=I32)),
     ValueError, "cache_seqlens"),
    ("sparse_decode", "indices batch 1", set_(indices=torch.zeros(1, 1, 10, dtype=I32)), ValueError, "indices"),
    ("sparse_decode", "FP8 cache, q d_qk 512", set_(q=oracle.bf16(2, 1, 4, 512)), ValueError, "q"),
    ("sparse_decode", "extra_k_cache without extra_indices_in_kvcache",
     set_(extra_indices_in_kvcache=None, extra_topk_length=None), ValueError, "extra_indices_in_kvcache"),
    ("sparse_decode", "attn_sink shape", set_(attn_sink=torch.randn(3)), ValueError, "attn_sink"),
    ("sparse_decode", "value: index >= num_blocks * 64",
     set_(indices=lambda a: a["indices"].index_fill(2, torch.tensor([0]), 10_000)), ValueError, "indices"),
    ("sparse_prefill", "indices rank", set_(indices=torch.zeros(6, 8, dtype=I32)), ValueError, "indices"),
    ("sparse_prefill", "topk_length dtype", set_(topk_length=torch.ones(6)), TypeError, "topk_length"),
    # FP8 layout
    ("quantize_kv_fp8", "last dim 575", set_(kv=oracle.bf16(3, 575)), ValueError, "kv"),
    ("quantize_kv_fp8", "dtype", set_(kv=torch.randn(3, 576).half()), TypeError, "kv"),
    ("dequantize_kv_fp8", "last dim 655", set_(kv_fp8=torch.zeros(3, 655, dtype=torch.uint8)), ValueError, "kv_fp8"),
    ("dequantize_kv_fp8", "dtype", set_(kv_fp8=torch.zeros(3, 656, dtype=torch.int8)), TypeError, "kv_fp8"),
    # cache writes
    ("write_kv_cache", "kv_cache row 656 without is_fp8", set_(kv_cache=fp8_cache(2)), TypeError, "kv_cache"),
    ("write_kv_cache", "kv_cache h_kv 2", set_(kv_cache=oracle.bf16(2, 64, 2, 576)), ValueError, "kv_cache"),
    ("write_kv_cache", "kv_cache last dim non-contiguous",
     set_(kv_cache=lambda a: non_contiguous_last_dim(a["kv_cache"])), ValueError, "kv_cache"),
    ("write_kv_cache", "latent width 511", set_(latent=oracle.bf16(3, 511)), ValueError, "latent"),
    ("write_kv_cache", "latent dtype", set_(latent=torch.randn(3, 512).half()), TypeError, "latent"),
    ("write_kv_cache", "rope width 32", set_(rope=oracle.bf16(3, 32)), ValueError, "rope"),
    ("write_kv_cache", "rope tokens 2", set_(rope=oracle.bf16(2, 64)), ValueError, "rope"),
    ("write_kv_cache", "slot_mapping tokens 4", set_(slot_mapping=torch.zeros(4, dtype=I32)), ValueError, "slot_mapping"),
    ("write_kv_cache", "slot_mapping dtype", set_(slot_mapping=torch.zeros(3)), TypeError, "slot_mapping"),
    ("write_kv_cache", "value: slot = num_blocks * 64", set_(slot_mapping=torch.tensor([0, 128, -1], dtype=I32)),
     ValueError, "slot_mapping"),
    ("write_kv_cache", "value: slot -2", set_(slot_mapping=torch.tensor([0, -2, -1], dtype=I32)), ValueError, "slot_mapping"),
    ("write_kv_cache[fp8]", "FP8 cache row 576 bytes", set_(kv_cache=torch.zeros(2, 64, 1, 576, dtype=torch.uint8)),
     ValueError, "kv_cache"),
    ("write_kv_cache[fp8]", "value: slot = num_blocks * 64", set_(slot_mapping=torch.tensor([0, 128, -1], dtype=I32)),
     ValueError, "slot_mapping"),
    ("write_index_cache", "index_cache width", set_(index_cache=oracle.bf16(2, 64, 16)), ValueError, "index_cache"),
    ("write_index_cache", "index_cache dtype", set_(index_cache=torch.zeros(2, 64, 32).half()), TypeError, "index_cache"),
    ("write_index_cache", "k dtype", set_(k=torch.randn(3, 32).half()), TypeError, "k"),
    ("write_index_cache", "index_cache last dim non-contiguous",
     set_(index_cache=lambda a: non_contiguous_last_dim(a["index_cache"])), ValueError, "index_cache"),
    ("write_index_cache", "k d_i 0 into an FP8 index_cache",
     set_(index_cache=torch.zeros(2, 64, 4, dtype=torch.uint8), k=oracle.bf16(3, 0)), ValueError, "k"),
    ("write_index_cache", "value: slot = num_blocks * 64", set_(slot_mapping=torch.tensor([128, 0, 1], dtype=I32)),
     ValueError, "slot_mapping"),
    # indexer
    ("indexer_logits", "q dtype", set_(q=lambda a: a["q"].half()), TypeError, "q"),
    ("indexer_logits", "k d_i 8", set_(k=oracle.bf16(10, 8)), ValueError, "k"),
    ("indexer_logits", "weights dtype", set_(weights=lambda a: a["weights"].half()), TypeError, "weights"),
    ("indexer_logits", "weights heads 3", set_(weights=torch.randn(4, 3)), ValueError, "weights"),
    ("indexer_logits", "k_start length", set_(k_start=torch.zeros(3, dtype=I32)), ValueError, "k_start"),
    ("indexer_logits", "k_end dtype", set_(k_end=lambda a: a["k_end"].long()), TypeError, "k_end"),
    ("indexer_logits", "q_scale with BF16 q", set_(q_scale=torch.ones(4, 2)), ValueError, "q_scale"),
    ("indexer_logits", "value: k_end > s_kv", set_(k_end=torch.tensor([1, 11, 2, 9], dtype=I32)), ValueError, "k_end"),
    ("indexer_logits", "value: k_start > k_end", set_(k_start=torch.tensor([0, 0, 3, 5], dtype=I32)), ValueError, "k_start"),
    ("indexer_logits", "value: k_start < 0", set_(k_start=torch.tensor([-1, 0, 2, 5], dtype=I32)), ValueError,
     "k_start"),
    ("indexer_logits[fp8]", "no k_scale", set_(k_scale=None), ValueError, "k_scale"),
    ("indexer_logits[fp8]", "q_scale shape", set_(q_scale=torch.ones(4)), ValueError, "q_scale"),
    ("indexer_logits[fp8]", "k_scale dtype", set_(k_scale=torch.ones(10, dtype=torch.float64)), TypeError, "k_scale"),
    ("indexer_logits_paged", "index_cache dtype", set_(index_cache=torch.zeros(3, 64, 16).half()), TypeError, "index_cache"),
    ("indexer_logits_paged", "index_cache page 32", set_(index_cache=oracle.bf16(3, 32, 16)), ValueError, "index_cache"),
    ("indexer_logits_paged", "weights shape", set_(weights=torch.randn(2, 2)), ValueError, "weights"),
    ("indexer_logits_paged", "block_table batch 3", set_(block_table=torch.zeros(3, 2, dtype=I32)), ValueError,
     "block_table"),
    ("indexer_logits_paged", "q_scale with BF16 q", set_(q_scale=torch.ones(2, 1, 2)), ValueError, "q_scale"),
    ("indexer_logits_paged", "value: cache_seqlens beyond the table", set_(cache_seqlens=torch.tensor([129, 1], dtype=I32)),
     ValueError, "cache_seqlens"),
    ("indexer_logits_paged", "value: used block_table entry >= num_blocks",
     set_(block_table=torch.tensor([[0, 3], [2, 0]], dtype=I32)), ValueError, "block_table"),
    ("indexer_topk", "logits dtype", set_(logits=lambda a: a["logits"].double()), TypeError, "logits"),
    ("indexer_topk", "topk 0", set_(topk=0), ValueError, "topk"),
    ("indexer_topk", "logits wider than the table", set_(logits=torch.randn(2, 3, 129)), ValueError, "logits"),
    ("indexer_topk", "logits 2-D with a block_table", set_(logits=torch.randn(2, 100)), ValueError, "logits"),
    ("indexer_topk", "block_table batch 3", set_(block_table=torch.zeros(3, 2, dtype=I32)), ValueError, "block_table"),
    ("indexer_topk", "block_table dtype", set_(block_table=torch.zeros(2, 2)), TypeError, "block_table"),
    ("indexer_topk", "value: block_table entry -1 under finite logits",
     set_(block_table=torch.tensor([[0, -1], [2, 3]], dtype=I32)), ValueError, "block_table"),
    # block 2**26's slots pass int32: slot 2**32 + 6 would wrap around to slot 6, a real-looking token
    ("indexer_topk", "value: block_table entry 2**26 under finite logits",
     set_(block_table=torch.tensor([[0, 2 ** 26], [2, 3]], dtype=I32)), ValueError, "block_table"),
    ("indexer_topk", "value: block_table entry 2**25 under finite logits",
     set_(block_table=torch.tensor([[0, 1], [2 ** 25, 3]], dtype=I32)), ValueError, "block_table"),
    # metadata
    ("get_mla_metadata", "num_sm_parts 0", set_(num_sm_parts=0), ValueError, "num_sm_parts"),
    ("get_mla_metadata", "cache_seqlens dtype", set_(cache_seqlens=torch.tensor([5, 1], dtype=torch.int64)), TypeError,
     "cache_seqlens"),
    ("get_mla_metadata", "cache_seqlens 2-D", set_(cache_seqlens=torch.ones(2, 2, dtype=I32)), ValueError, "cache_seqlens"),
    # routed experts
    ("routed_experts", "x dtype", set_(x=lambda a: a["x"].half()), TypeError, "x"),
    ("routed_experts", "down_proj inter 3", set_(down_proj=oracle.bf16(3, 16, 3)), ValueError, "gate_up_proj"),
    ("routed_experts", "experts tokens 3", set_(experts=torch.zeros(3, 2, dtype=torch.int64)), ValueError, "experts"),
    # An argument whose dtype or size another one set: the error names that one too (a float32 q against a BF16
    # cache said only "k_cache must have dtype float32", blaming the cache for what q asked).
    ("dense_decode", "float32 q, BF16 cache: names q", set_(q=lambda a: a["q"].float()), TypeError, "q"),
    ("flash_mla_with_kvcache", "float32 q, BF16 cache: names q", set_(q=lambda a: a["q"].float()), TypeError, "q"),
    ("flash_mla_sparse_fwd", "float32 q, BF16 kv: names q", set_(q=lambda a: a["q"].float()), TypeError, "q"),
    ("write_kv_cache", "float32 kv_cache, BF16 rows: names kv_cache", set_(kv_cache=lambda a: a["kv_cache"].float()),
     TypeError, "kv_cache"),
    ("write_kv_cache[fp8]", "float32 latent, BF16 rope: names latent", set_(latent=lambda a: a["latent"].float()),
     TypeError, "latent"),
    ("write_index_cache", "float32 k, BF16 index_cache: names k", set_(k=lambda a: a["k"].float()), TypeError, "k"),
    ("routed_experts", "float32 x, BF16 experts: names x", set_(x=lambda a: a["x"].float()), TypeError, "x"),
    ("write_index_cache", "k d_i 33 against the cache's 32: names k", set_(k=oracle.bf16(3, 33)), ValueError, "k"),
    ("indexer_logits_paged", "q d_i 17 against the cache's 16: names q", set_(q=oracle.bf16(2, 1, 2, 17)), ValueError,
     "q"),
    ("indexer_topk", "block_table of 1 block for 100 keys: names block_table",
     set_(block_table=torch.zeros(2, 1, dtype=I32)), ValueError, "block_table"),
    # bounds of index values come from a cache's (or k's) size: a cache one block short is named with the indices
    ("flash_mla_with_kvcache[sparse]", "value: k_cache of 2 blocks: names k_cache", set_(
        k_cache=fp8_cache(2), indices=lambda a: a["indices"].index_fill(2, torch.tensor([0]), 150)), ValueError,
     "k_cache"),
    ("sparse_decode", "value: extra_k_cache of 1 block: names extra_k_cache", set_(
        extra_k_cache=fp8_cache(1), extra_indices_in_kvcache=lambda a: a["extra_indices_in_kvcache"].index_fill(
            2, torch.tensor([0]), 100)), ValueError, "extra_k_cache"),
    ("write_kv_cache", "value: kv_cache of 1 block: names kv_cache", set_(kv_cache=oracle.bf16(1, 64, 1, 576)),
     ValueError, "kv_cache"),
    ("write_index_cache", "value: index_cache of 1 block: names index_cache", set_(index_cache=oracle.bf16(1, 64, 32)),
     ValueError, "index_cache"),
    ("indexer_logits", "value: k of 9 rows: names k", set_(k=oracle.bf16(9, 16)), ValueError, "k"),
    # a cache of the other layout than the FP8 flag says: the flag may be what is wrong, so the error names it too
    ("flash_mla_with_kvcache", "FP8 flag on a BF16 cache: names is_fp8_kvcache", set_(is_fp8_kvcache=True), TypeError,
     "is_fp8_kvcache"),
    ("flash_mla_with_kvcache[sparse]", "FP8 cache without the flag: names is_fp8_kvcache", set_(is_fp8_kvcache=False),
     TypeError, "is_fp8_kvcache"),
    ("dense_decode", "is_fp8 on a BF16 cache: names is_fp8", set_(is_fp8=True), TypeError, "is_fp8"),
    ("sparse_decode", "FP8 caches without is_fp8: names is_fp8", set_(is_fp8=False), TypeError, "is_fp8"),
    ("write_kv_cache", "is_fp8 on a BF16 cache: names is_fp8", set_(is_fp8=True), TypeError, "is_fp8"),
    ("write_kv_cache[fp8]", "FP8 cache without is_fp8: names is_fp8", set_(is_fp8=False), TypeError, "is_fp8"),
]


def names_argument(message: str, name: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", message) is not None


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_valid_arguments_pass(entry):
    """The base arguments every case breaks are valid, so each case's error comes from its one change."""
    function, make_args = ENTRIES[entry]
    function(**make_args())


@pytest.mark.parametrize("entry,what,change,error,name", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_bad_argument_is_named(entry, what, change, error, name):
    function, make_args = ENTRIES[entry]
    args = make_args()
    change(args)
    with pytest.raises(error) as raised:
        function(**args)
    assert names_argument(str(raised.value), name), f"{error.__name__} does not name {name!r}: {raised.value}"


def test_a_mismatched_dimension_names_the_argument_that_set_it():
    """A q of d_qk 575 against a cache of 576: the error is raised at k_cache (checked after q) and says q set d_qk,
    so that a bad q is not read as a bad cache."""
    args = dense_api()
    args["q"] = oracle.bf16(2, 1, 4, 575)
    with pytest.raises(ValueError, match=re.escape("k_cache must have shape (*, 64, 1, d_qk) with d_qk=575 (as q has "
                                                   "it), got (4, 64, 1, 576)")):
        flashmla_ops.flash_mla_with_kvcache(**args)
    args = logits_args()
    args["k_end"] = torch.ones(3, dtype=I32)
    with pytest.raises(ValueError, match=re.escape("with s_q=4 (as q has it)")):
        ops.indexer_logits(**args)


def required_tensor_arguments():
    """(entry, argument) for every op argument whose schema type is a plain Tensor: None passes the schema (the
    dispatcher takes it for any Tensor), so the op's own check must name it."""
    pairs = []
    for entry, (function, make_args) in ENTRIES.items():
        if isinstance(function, torch._ops.OpOverloadPacket):
            pairs += [(entry, argument.name) for argument in function.default._schema.arguments
                      if str(argument.type) == "Tensor"]
    return pairs


@pytest.mark.parametrize("entry,argument", required_tensor_arguments())
def test_none_for_a_required_tensor_is_named(entry, argument):
    function, make_args = ENTRIES[entry]
    args = make_args()
    args[argument] = None
    with pytest.raises(TypeError) as raised:
        function(**args)
    assert names_argument(str(raised.value), argument), f"TypeError does not name {argument!r}: {raised.value}"


API_TENSOR_ARGUMENTS = [(entry, name, reused)
                        for entry, schedules in (("flash_mla_with_kvcache", (False, True)),
                                                 ("flash_mla_with_kvcache[sparse]", (False, True)),
                                                 ("flash_mla_sparse_fwd", (False,)))
                        for name, value in ENTRIES[entry][1]().items() if isinstance(value, torch.Tensor)
                        for reused in schedules]


@pytest.mark.parametrize("entry,argument,reused", API_TENSOR_ARGUMENTS)
def test_api_names_a_tensor_argument_that_is_not_a_tensor(entry, argument, reused):
    """A list where the FlashMLA API takes a tensor: a TypeError naming the API and the argument, also when a
    schedule from an earlier call is reused (which skips the API's shape checks) rather than the op schema's
    RuntimeError."""
    function, make_args = ENTRIES[entry]
    args = make_args()
    if reused:
        args["tile_scheduler_metadata"], _ = flashmla_ops.get_mla_metadata()
        function(**args)
    args[argument] = args[argument].tolist()
    with pytest.raises(TypeError) as raised:
        function(**args)
    message = str(raised.value)
    assert message.startswith(entry.split("[")[0]) and names_argument(message, argument), message


def to_meta(args):
    """Same shapes, strides and dtypes on the meta device (`.to("meta")` would make strided tensors contiguous)."""
    return {k: (torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="meta") if isinstance(v, torch.Tensor)
                else v) for k, v in args.items()}


OP_CASES = [c for c in CASES if isinstance(ENTRIES[c[0]][0], torch._ops.OpOverloadPacket) and not c[1].startswith("value")]


@pytest.mark.parametrize("entry,what,change,error,name", OP_CASES, ids=[f"{c[0]}-{c[1]}" for c in OP_CASES])
def test_fake_impl_checks_shapes_and_dtypes(entry, what, change, error, name):
    """On meta tensors the op runs its fake impl, which must reject the same inputs."""
    function, make_args = ENTRIES[entry]
    args = make_args()
    change(args)
    with pytest.raises(error) as raised:
        function(**to_meta(args))
    assert names_argument(str(raised.value), name), str(raised.value)


@pytest.mark.parametrize("entry", [e for e in ENTRIES if isinstance(ENTRIES[e][0], torch._ops.OpOverloadPacket)])
def test_fake_impl_shapes_match_the_op(entry):
    function, make_args = ENTRIES[entry]
    args = make_args()
    real = function(**{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in args.items()})
    fake = function(**to_meta(args))
    real = real if isinstance(real, tuple) else (real,)
    fake = fake if isinstance(fake, tuple) else (fake,)
    assert len(real) == len(fake)
    for r, f in zip(real, fake):
        if r is None:
            assert f is None
            continue
        assert f.device.type == "meta" and f.shape == r.shape and f.dtype == r.dtype


def test_value_checks_skipped_on_meta():
    """Index values are not read while tracing: out-of-range values on meta tensors pass the fake impl."""
    args = sparse_op()
    args["indices"] = args["indices"].index_fill(2, torch.tensor([0]), 10_000)
    out, lse = ops.sparse_decode(**to_meta(args))
    assert out.shape == (2, 1, 4, 512)


def test_unused_block_table_entries_are_not_checked():
    """Entries past a sequence's last block are padding and may hold anything."""
    args = dense_api()
    args["block_table"] = torch.tensor([[0, 1, -1, 1 << 30], [2, -7, 99, 3]], dtype=I32)
    flashmla_ops.flash_mla_with_kvcache(**args)
    # at the boundary: a sequence of exactly one block uses no second entry, an empty one no entry at all
    args["cache_seqlens"] = torch.tensor([64, 0], dtype=I32)
    args["block_table"] = torch.tensor([[0, -1, 1 << 30, 99], [-5, 99, -1, 1 << 30]], dtype=I32)
    flashmla_ops.flash_mla_with_kvcache(**args)


def test_cache_seqlens_at_the_table_capacity_pass():
    """A sequence that fills its block table exactly (2 blocks, 128 tokens) is valid; one token more is refused (the
    case "cache_seqlens beyond the table")."""
    args = dense_api()
    args["cache_seqlens"] = torch.tensor([128, 128], dtype=I32)
    flashmla_ops.flash_mla_with_kvcache(**args)
    op_args = dense_op()
    op_args["cache_seqlens"] = torch.tensor([128, 64], dtype=I32)
    ops.dense_decode(**op_args)
    paged = paged_args()
    paged["cache_seqlens"] = torch.tensor([128, 128], dtype=I32)
    ops.indexer_logits_paged(**paged)  # block_table [[0, 1], [2, 0]]: 128 tokens each


def test_the_api_names_cache_seqlens_on_another_device():
    """(meta stands for another device here, so that this runs without a GPU)"""
    api = dense_api()
    api["cache_seqlens"] = api["cache_seqlens"].to("meta")
    with pytest.raises(ValueError, match=r"^flash_mla_with_kvcache: .*cache_seqlens on meta"):
        flashmla_ops.flash_mla_with_kvcache(**api)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (a second device)")
@pytest.mark.parametrize("moved", ["q", "k_cache", "block_table", "cache_seqlens"])
def test_tensors_on_different_devices(moved):
    args = dense_api()
    args = {k: (v.cuda() if isinstance(v, torch.Tensor) and k != moved else v) for k, v in args.items()}
    with pytest.raises(ValueError) as raised:
        flashmla_ops.flash_mla_with_kvcache(**args)
    assert names_argument(str(raised.value), moved), str(raised.value)


@pytest.mark.parametrize("entry,what,change,error,name",
                         [c for c in CASES if c[0].startswith("flash_mla_with_kvcache")],
                         ids=[f"{c[0]}-{c[1]}" for c in CASES if c[0].startswith("flash_mla_with_kvcache")])
def test_flashmla_api_names_itself(entry, what, change, error, name):
    """The API checks its arguments before it computes the scheduling metadata from them: the error names the
    function the user called, not an op inside it (get_mla_metadata, dense_decode, ...)."""
    function, make_args = ENTRIES[entry]
    args = make_args()
    change(args)
    with pytest.raises(error) as raised:
        function(**args)
    assert str(raised.value).startswith("flash_mla_with_kvcache: "), str(raised.value)


# The ops' optional tensors, given so that each is checked too (a schedule, a sink)
DEVICE_CHECK_EXTRAS = {
    "dense_decode": dict(attn_sink=torch.randn(4), tile_scheduler_metadata=torch.zeros(1, 8, dtype=I32),
                         num_splits=torch.tensor([0, 1, 2], dtype=I32)),
    "sparse_decode": dict(tile_scheduler_metadata=torch.zeros(1, 8, dtype=I32),
                          num_splits=torch.tensor([0, 1, 1], dtype=I32)),
}
DEVICE_CHECKED = [(entry, name) for entry in ("dense_decode", "sparse_decode", "write_kv_cache", "write_kv_cache[fp8]",
                                              "write_index_cache", "indexer_logits", "indexer_logits[fp8]",
                                              "indexer_logits_paged", "indexer_topk", "routed_experts")
                  for name, value in {**ENTRIES[entry][1](), **DEVICE_CHECK_EXTRAS.get(entry, {})}.items()
                  if isinstance(value, torch.Tensor) and name != "q"]


@pytest.mark.parametrize("entry,moved", DEVICE_CHECKED)
def test_ops_check_every_tensor_device(entry, moved):
    """Every tensor argument of an op is on one device (meta stands for another device here, so that this runs
    without a GPU): a ValueError naming it before any compute, not a kernel handed another device's pointer."""
    function, make_args = ENTRIES[entry]
    args = {**make_args(), **DEVICE_CHECK_EXTRAS.get(entry, {})}
    args[moved] = args[moved].to("meta")
    with pytest.raises(ValueError, match="one device|on meta") as raised:
        function(**args)
    assert names_argument(str(raised.value), moved), str(raised.value)


def test_indices_past_topk_length_are_not_checked():
    """Entries past a sequence's topk_length do not count: like unused block_table entries they may hold anything,
    and the outputs are those with -1 there."""
    args = sparse_api()
    past = torch.arange(10) >= args["topk_length"][:, None, None]
    garbage = args["indices"].masked_fill(past, 1 << 30).masked_fill(past & (torch.arange(10) % 2 == 0), -7)
    got = flashmla_ops.flash_mla_with_kvcache(**{**args, "indices": garbage})
    want = flashmla_ops.flash_mla_with_kvcache(**{**args, "indices": args["indices"].masked_fill(past, -1)})
    assert all(torch.equal(g, w) for g, w in zip(got, want))

    extra_past = torch.arange(5) >= args["extra_topk_length"][:, None, None]
    extra = args["extra_indices_in_kvcache"]
    got = flashmla_ops.flash_mla_with_kvcache(**{**args, "extra_indices_in_kvcache": extra.masked_fill(extra_past, -9)})
    want = flashmla_ops.flash_mla_with_kvcache(**{**args, "extra_indices_in_kvcache": extra.masked_fill(extra_past, -1)})
    assert all(torch.equal(g, w) for g, w in zip(got, want))

    args = sparse_fwd()
    past = torch.arange(8) >= args["topk_length"][:, None, None]
    got = flashmla_ops.flash_mla_sparse_fwd(**{**args, "indices": args["indices"].masked_fill(past, -5)})
    want = flashmla_ops.flash_mla_sparse_fwd(**{**args, "indices": args["indices"].masked_fill(past, -1)})
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_topk_block_table_entries_under_masked_logits_are_not_checked():
    """A block whose logits are all -inf (past the sequence) may have any table entry: nothing there is selected."""
    args = topk_args()
    args["logits"][0, :, 64:] = float("-inf")
    args["block_table"] = torch.tensor([[0, -1], [2, 3]], dtype=I32)
    selected = ops.indexer_topk(**args)
    assert (selected[0] < 64).all() and (selected[0] >= 0).all()


def test_topk_largest_block_table_entry_passes():
    """Block 2**25 - 1: its last slot is int32's largest, the slots are exact."""
    args = topk_args()
    args["block_table"] = torch.tensor([[0, 2 ** 25 - 1], [2, 3]], dtype=I32)
    args["logits"][0, :, :64] = float("-inf")
    selected = ops.indexer_topk(**args)
    assert ((selected[0] >= (2 ** 25 - 1) * 64) & (selected[0] <= 2 ** 31 - 1 - 64 + 36)).all()



def test_int32_values_against_bounds_past_int32():
    """A cache of 2**31 slots or more (a 1.4 TB FP8 cache; here stride-0 views) with int32 indices, slots or tables:
    torch compares an int32 tensor with a Python bound past its range by wrapping the bound, so every valid index
    was refused (and the reference cache write would have skipped every row)."""
    from flashmla_ops import decode, kv_cache
    from flashmla_ops._checks import below, check_paged_table

    fp8 = torch.zeros(1, 64, 1, 656, dtype=torch.uint8).expand(2 ** 25, 64, 1, 656)
    q = oracle.bf16(1, 1, 4, 576)
    indices = torch.tensor([[[0, 5, -1, 2 ** 31 - 1]]], dtype=I32)
    decode._check_sparse("sparse_decode", q, fp8, indices, None, None, None, None, None, None, 512, True, None)
    with pytest.raises(ValueError, match="indices"):
        decode._check_sparse("sparse_decode", q, fp8[:2 ** 24], indices, None, None, None, None, None, None, 512,
                             True, None)
    kv_cache._check_slots("write_kv_cache", torch.tensor([0, 2 ** 31 - 1, -1], dtype=I32), 2 ** 31, "kv_cache")
    check_paged_table("dense_decode", torch.tensor([[0, 2 ** 31 - 1]], dtype=I32), torch.tensor([100], dtype=I32),
                      2 ** 31, 64, "k_cache")
    assert below(torch.tensor([-5, 0, 2 ** 31 - 1], dtype=I32), 2 ** 31).all()
    assert below(torch.tensor([3, 4], dtype=I32), 4).tolist() == [True, False]


def test_last_dim_contiguous_gives_unit_stride_to_size_1_dimensions():
    """A transposed (batch, 1) table counts as contiguous with its last stride `batch`: the kernels' copy still gets
    stride 1 (what their `stride(-1) == 1` checks ask)."""
    from flashmla_ops._checks import dense_aligned, last_dim_contiguous

    table = torch.arange(3, dtype=I32).view(1, 3).t()
    assert table.is_contiguous() and table.stride(-1) == 3 and table.contiguous().stride(-1) == 3
    copied = last_dim_contiguous(table)
    assert copied.stride(-1) == 1 and torch.equal(copied, table)
    flat = torch.arange(4 + 2 * 576, dtype=torch.bfloat16)
    rows = flat[4:].view(2, 576)
    assert rows.data_ptr() % 16 == 8
    aligned = dense_aligned(rows)
    assert aligned.data_ptr() % 16 == 0 and aligned.is_contiguous() and torch.equal(aligned, rows)
    assert dense_aligned(aligned) is aligned


def test_the_public_references_check_their_arguments_as_the_ops_do():
    """`flashmla_ops.reference.<op>` runs the op's checks first: a used block table entry of -1 had been read as the
    last block (dense decode), an entry past the index cache clamped to its last block (paged logits), and a top-k
    block table entry of -3 turned into negative slots; each now raises the op's error, naming reference.<op>."""
    from flashmla_ops import reference

    generator = torch.Generator().manual_seed(60)
    q = torch.randn(1, 1, 4, 576, generator=generator).bfloat16()
    cache = torch.randn(3, 64, 1, 576, generator=generator).bfloat16()
    seqlens = torch.tensor([10], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"reference\.dense_decode: .*block_table"):
        reference.dense_decode(q, cache, torch.tensor([[-1]], dtype=torch.int32), seqlens, 512, 0.04, False, False)
    index_cache = torch.randn(3, 64, 128, generator=generator).bfloat16()
    args = (torch.randn(1, 1, 2, 128, generator=generator).bfloat16(), index_cache, torch.randn(1, 1, 2))
    with pytest.raises(ValueError, match=r"reference\.indexer_logits_paged: .*block_table"):
        reference.indexer_logits_paged(*args, torch.tensor([[7]], dtype=torch.int32), seqlens)
    with pytest.raises(ValueError, match=r"reference\.indexer_topk: .*block_table"):
        reference.indexer_topk(torch.randn(1, 1, 10), 2, torch.tensor([[-3]], dtype=torch.int32))
    with pytest.raises(TypeError, match=r"reference\.quantize_kv_fp8: kv"):
        reference.quantize_kv_fp8(torch.randn(2, 576))
    # what the ops take, the references take: the same results as the unchecked implementations
    table = torch.tensor([[2]], dtype=torch.int32)
    assert all(torch.equal(a, b) for a, b in zip(
        reference.dense_decode(q, cache, table, seqlens, 512, 0.04, False, False),
        reference.dense_decode_reference(q, cache, table, seqlens, 512, 0.04, False, False)))


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), float("-inf")])
def test_the_public_references_refuse_a_softmax_scale_the_ops_refuse(scale):
    """A scale that is not finite: the ops raise, and so do their references (they returned NaN outputs), naming
    reference.<op> and the argument."""
    from flashmla_ops import reference

    q = torch.randn(1, 1, 4, 576).bfloat16()
    cache = torch.randn(3, 64, 1, 576).bfloat16()
    indices = torch.tensor([[[130, 131]]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"reference\.dense_decode: softmax_scale must be finite"):
        reference.dense_decode(q, cache, torch.tensor([[2]], dtype=torch.int32), torch.tensor([10], dtype=torch.int32),
                               512, scale, False, False)
    with pytest.raises(ValueError, match=r"reference\.sparse_decode: softmax_scale must be finite"):
        reference.sparse_decode(q, cache, indices, None, None, None, None, 512, scale, False)
    with pytest.raises(ValueError, match=r"reference\.sparse_prefill: sm_scale must be finite"):
        reference.sparse_prefill(q[0], cache[0], indices[0][None], scale)


def reference_args(entry):
    """The op's valid arguments as its public reference takes them (the decode references take no schedule)."""
    return {k: v for k, v in ENTRIES[entry][1]().items() if k not in ("tile_scheduler_metadata", "num_splits")}


# (reference, argument, value): a Python scalar of the wrong kind. The ops' schemas turn their scalars into ints,
# floats and bools before the op runs; the references take them as given, and raised from deep inside (`'<' not
# supported between 'int' and 'str'`, `zeros() takes 1 positional argument`, arange's `unsupported range: 0 -> nan`)
# or took them (an indexer_topk of NaN: lse_indexer over no index, +inf; a causal of "no" as true).
REFERENCE_SCALARS = [
    ("dense_decode", "head_dim_v", 512.0), ("dense_decode", "head_dim_v", None), ("dense_decode", "softmax_scale", "1"),
    ("dense_decode", "softmax_scale", None), ("dense_decode", "causal", "no"), ("dense_decode", "is_fp8", [0]),
    ("sparse_decode", "head_dim_v", [512]), ("sparse_decode", "softmax_scale", [0.04]),
    ("sparse_decode", "is_fp8", "yes"), ("sparse_prefill", "sm_scale", None), ("sparse_prefill", "d_v", 512.0),
    ("sparse_prefill", "indexer_topk", math.nan), ("sparse_prefill", "indexer_topk", "4"),
    ("get_mla_metadata", "num_sm_parts", math.inf),
    ("get_mla_metadata", "num_sm_parts", 4.0), ("indexer_topk", "topk", math.inf), ("indexer_topk", "topk", None),
    ("write_kv_cache", "is_fp8", "no"), ("write_kv_cache[fp8]", "is_fp8", [1]),
]


@pytest.mark.parametrize("entry,argument,value", REFERENCE_SCALARS)
def test_the_public_references_check_their_scalar_arguments(entry, argument, value):
    from flashmla_ops import reference

    op = entry.split("[")[0]
    args = reference_args(entry)
    args[argument] = value
    with pytest.raises(TypeError, match=rf"^reference\.{op}: {argument} must be ") as raised:
        getattr(reference, op)(**args)
    assert names_argument(str(raised.value), argument), str(raised.value)


@pytest.mark.parametrize("entry,argument", [("indexer_logits", "q_scale"), ("indexer_logits", "k_scale"),
                                             ("indexer_logits_paged", "q_scale")])
def test_a_scale_that_is_not_a_tensor_is_a_type_error(entry, argument):
    """A list for an optional scale: a TypeError (not "must be given exactly when q is float8_e4m3fn")."""
    from flashmla_ops import reference

    args = reference_args(entry)
    args[argument] = [1.0]
    with pytest.raises(TypeError, match=rf"{argument} must be a tensor"):
        getattr(reference, entry)(**args)
