"""The plain-PyTorch reference of every op: the numerical oracle and the CPU path; runs on any device."""
from .decode import dense_decode_reference, get_mla_metadata_reference, sparse_decode_reference
from .indexer import indexer_logits_paged_reference, indexer_logits_reference, indexer_topk_reference
from .kv_cache import (dequantize_index_fp8_reference, dequantize_kv_fp8_reference, quantize_index_fp8_reference,
                       quantize_kv_fp8_reference, write_index_cache_reference, write_kv_cache_reference)
from .moe import routed_experts_reference
from .sparse_prefill import sparse_prefill_reference

# The ops' names, for `flashmla_ops.reference.<op>` (every op of the flashmla namespace; the decode references take
# no schedule: the metadata only splits the work).
get_mla_metadata = get_mla_metadata_reference
dense_decode = dense_decode_reference
sparse_decode = sparse_decode_reference
sparse_prefill = sparse_prefill_reference
quantize_kv_fp8 = quantize_kv_fp8_reference
dequantize_kv_fp8 = dequantize_kv_fp8_reference
quantize_index_fp8 = quantize_index_fp8_reference
dequantize_index_fp8 = dequantize_index_fp8_reference
write_kv_cache = write_kv_cache_reference
write_index_cache = write_index_cache_reference
routed_experts = routed_experts_reference
indexer_logits = indexer_logits_reference
indexer_logits_paged = indexer_logits_paged_reference
indexer_topk = indexer_topk_reference
