"""The plain-PyTorch reference of every op: the numerical oracle and the CPU path; runs on any device.

`flashmla_ops.reference.<op>` runs the op's own checks first (naming `reference.<op>`; values where the op checks
them: always on the CPU, on a GPU with FLASHMLA_CHECK=1), so a bad argument gets the error the op would give, not a
block table entry of -1 read as the last block. The `*_reference` functions are the unchecked implementations the
ops call after their checks. The scalars too: the ops' schemas turn theirs into ints, floats and bools before the op
runs, the references check what they are given."""
from ._checks import check_scalar, check_scale, is_flag, is_int
from .decode import (_check_dense, _check_metadata, _check_sparse, dense_decode_reference, get_mla_metadata_reference,
                     sparse_decode_reference)
from .indexer import (_check_logits, _check_logits_paged, _check_topk, indexer_logits_paged_reference,
                      indexer_logits_reference, indexer_topk_reference)
from .kv_cache import (_check_dequantize, _check_quantize, _check_write_index, _check_write_kv,
                       dequantize_index_fp8_reference, dequantize_kv_fp8_reference, quantize_index_fp8_reference,
                       quantize_kv_fp8_reference, write_index_cache_reference, write_kv_cache_reference)
from .moe import _check as _check_experts
from .moe import routed_experts_reference
from .sparse_prefill import _check_sparse_prefill, sparse_prefill_reference

# The index cache's FP8 rows have no op of their own (write_index_cache quantizes through them): unchecked.
quantize_index_fp8 = quantize_index_fp8_reference
dequantize_index_fp8 = dequantize_index_fp8_reference


# The ops' names (every op of the flashmla namespace; the decode references take no schedule: the metadata only
# splits the work).
def get_mla_metadata(cache_seqlens, num_sm_parts):
    check_scalar("reference.get_mla_metadata", "num_sm_parts", num_sm_parts, is_int, "an int")
    _check_metadata("reference.get_mla_metadata", cache_seqlens, num_sm_parts)
    return get_mla_metadata_reference(cache_seqlens, num_sm_parts)


def dense_decode(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, is_fp8, attn_sink=None):
    op = "reference.dense_decode"
    check_scalar(op, "head_dim_v", head_dim_v, is_int, "an int")
    check_scalar(op, "causal", causal, is_flag, "a bool")
    check_scalar(op, "is_fp8", is_fp8, is_flag, "a bool")
    _check_dense(op, q, k_cache, block_table, cache_seqlens, None, None, head_dim_v, is_fp8, attn_sink)
    softmax_scale = check_scale(op, "softmax_scale", softmax_scale)
    return dense_decode_reference(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, is_fp8,
                                  attn_sink)


def sparse_decode(q, k_cache, indices, topk_length, extra_k_cache, extra_indices_in_kvcache, extra_topk_length,
                  head_dim_v, softmax_scale, is_fp8, attn_sink=None):
    op = "reference.sparse_decode"
    check_scalar(op, "head_dim_v", head_dim_v, is_int, "an int")
    check_scalar(op, "is_fp8", is_fp8, is_flag, "a bool")
    _check_sparse(op, q, k_cache, indices, topk_length, extra_k_cache, extra_indices_in_kvcache, extra_topk_length,
                  None, None, head_dim_v, is_fp8, attn_sink)
    softmax_scale = check_scale(op, "softmax_scale", softmax_scale)
    return sparse_decode_reference(q, k_cache, indices, topk_length, extra_k_cache, extra_indices_in_kvcache,
                                   extra_topk_length, head_dim_v, softmax_scale, is_fp8, attn_sink)


def sparse_prefill(q, kv, indices, sm_scale, d_v=512, attn_sink=None, topk_length=None, indexer_topk=0):
    op = "reference.sparse_prefill"
    check_scalar(op, "d_v", d_v, is_int, "an int")
    check_scalar(op, "indexer_topk", indexer_topk, is_int, "an int")
    _check_sparse_prefill(op, q, kv, indices, d_v, attn_sink, topk_length, indexer_topk)
    sm_scale = check_scale(op, "sm_scale", sm_scale)
    return sparse_prefill_reference(q, kv, indices, sm_scale, d_v, attn_sink, topk_length, indexer_topk)


def quantize_kv_fp8(kv):
    _check_quantize("reference.quantize_kv_fp8", kv)
    return quantize_kv_fp8_reference(kv)


def dequantize_kv_fp8(kv_fp8):
    _check_dequantize("reference.dequantize_kv_fp8", kv_fp8)
    return dequantize_kv_fp8_reference(kv_fp8)


def write_kv_cache(kv_cache, latent, rope, slot_mapping, is_fp8):
    check_scalar("reference.write_kv_cache", "is_fp8", is_fp8, is_flag, "a bool")
    _check_write_kv("reference.write_kv_cache", kv_cache, latent, rope, slot_mapping, is_fp8)
    return write_kv_cache_reference(kv_cache, latent, rope, slot_mapping, is_fp8)


def write_index_cache(index_cache, k, slot_mapping):
    _check_write_index("reference.write_index_cache", index_cache, k, slot_mapping)
    return write_index_cache_reference(index_cache, k, slot_mapping)


def routed_experts(x, gate_up_proj, down_proj, weights, experts):
    _check_experts("reference.routed_experts", x, gate_up_proj, down_proj, weights, experts)
    return routed_experts_reference(x, gate_up_proj, down_proj, weights, experts)


def indexer_logits(q, k, weights, k_start, k_end, q_scale=None, k_scale=None):
    _check_logits("reference.indexer_logits", q, k, weights, k_start, k_end, q_scale, k_scale)
    return indexer_logits_reference(q, k, weights, k_start, k_end, q_scale, k_scale)


def indexer_logits_paged(q, index_cache, weights, block_table, cache_seqlens, q_scale=None):
    _check_logits_paged("reference.indexer_logits_paged", q, index_cache, weights, block_table, cache_seqlens,
                        q_scale)
    return indexer_logits_paged_reference(q, index_cache, weights, block_table, cache_seqlens, q_scale)


def indexer_topk(logits, topk, block_table=None):
    check_scalar("reference.indexer_topk", "topk", topk, is_int, "an int")
    _check_topk("reference.indexer_topk", logits, topk, block_table)
    return indexer_topk_reference(logits, topk, block_table)
