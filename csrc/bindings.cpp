// Python bindings of the CUDA kernels; the `flashmla` custom ops (flashmla_ops/*.py) call these for CUDA tensors.
#include <torch/extension.h>

namespace py = pybind11;

namespace flashmla {
torch::Tensor quantize_kv_fp8(const torch::Tensor& kv);
torch::Tensor dequantize_kv_fp8(const torch::Tensor& kv_fp8);
std::vector<torch::Tensor> get_mla_metadata(const torch::Tensor& cache_seqlens, int64_t num_sm_parts);
void write_kv_cache(torch::Tensor& kv_cache, const torch::Tensor& latent, const torch::Tensor& rope,
                    const torch::Tensor& slot_mapping, bool is_fp8);
std::vector<torch::Tensor> dense_decode(const torch::Tensor& q, const torch::Tensor& kv_cache,
                                        const torch::Tensor& block_table, const torch::Tensor& cache_seqlens,
                                        double softmax_scale, bool causal, bool is_fp8, int64_t num_splits,
                                        const c10::optional<torch::Tensor>& tile_scheduler_metadata,
                                        const c10::optional<torch::Tensor>& split_offsets, bool narrow,
                                        const c10::optional<torch::Tensor>& attn_sink);
std::vector<torch::Tensor> sparse_decode(const torch::Tensor& q, const torch::Tensor& kv_cache,
                                         const torch::Tensor& indices, const c10::optional<torch::Tensor>& topk_length,
                                         double softmax_scale, bool is_fp8, int64_t num_splits,
                                         const c10::optional<torch::Tensor>& attn_sink,
                                         const c10::optional<torch::Tensor>& extra_kv_cache,
                                         const c10::optional<torch::Tensor>& extra_indices,
                                         const c10::optional<torch::Tensor>& extra_topk_length,
                                         int64_t extra_num_splits);
std::vector<torch::Tensor> sparse_prefill(const torch::Tensor& q, const torch::Tensor& kv, const torch::Tensor& indices,
                                          const c10::optional<torch::Tensor>& topk_length, double softmax_scale,
                                          const c10::optional<torch::Tensor>& attn_sink);
torch::Tensor indexer_logits(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& weights,
                             const torch::Tensor& k_start, const torch::Tensor& k_end, const torch::Tensor& q_scale,
                             const torch::Tensor& k_scale);
torch::Tensor indexer_logits_paged(const torch::Tensor& q, const torch::Tensor& index_cache,
                                   const torch::Tensor& weights, const torch::Tensor& block_table,
                                   const torch::Tensor& cache_seqlens);
torch::Tensor indexer_topk(const torch::Tensor& logits, int64_t topk, const c10::optional<torch::Tensor>& block_table);
}  // namespace flashmla

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantize_kv_fp8", &flashmla::quantize_kv_fp8, "BF16 (..., 576) -> FP8 cache rows (..., 656) uint8");
  m.def("dequantize_kv_fp8", &flashmla::dequantize_kv_fp8, "FP8 cache rows (..., 656) uint8 -> BF16 (..., 576)");
  m.def("get_mla_metadata", &flashmla::get_mla_metadata,
        "decode work split in one launch, equal to get_mla_metadata_reference: cache_seqlens (batch,) int32, "
        "num_sm_parts -> tile_scheduler_metadata (num_sm_parts, 8), num_splits (batch + 1,) int32");
  m.def("dense_decode", &flashmla::dense_decode,
        "paged MLA decode, BF16 or FP8 cache (sm_90a): q, kv_cache, block_table, cache_seqlens, scale, causal, is_fp8, "
        "num_splits, tile_scheduler_metadata, num_splits (cumulative), narrow (s_q * h_q <= 16: the few-rows "
        "kernel), attn_sink (h_q,) float32 or None -> out, lse",
        py::arg("q"), py::arg("kv_cache"), py::arg("block_table"), py::arg("cache_seqlens"), py::arg("softmax_scale"),
        py::arg("causal"), py::arg("is_fp8"), py::arg("num_splits"), py::arg("tile_scheduler_metadata"),
        py::arg("split_offsets"), py::arg("narrow"), py::arg("attn_sink") = py::none());
  m.def("sparse_decode", &flashmla::sparse_decode,
        "sparse paged MLA decode, BF16 or FP8 cache (sm_90a): q, kv_cache, indices, topk_length, scale, is_fp8, "
        "num_splits, attn_sink; an extra cache (same format) with its indices, lengths and splits in the same softmax "
        "-> out, lse",
        py::arg("q"), py::arg("kv_cache"), py::arg("indices"), py::arg("topk_length"), py::arg("softmax_scale"),
        py::arg("is_fp8"), py::arg("num_splits"), py::arg("attn_sink") = py::none(),
        py::arg("extra_kv_cache") = py::none(), py::arg("extra_indices") = py::none(),
        py::arg("extra_topk_length") = py::none(), py::arg("extra_num_splits") = 1);
  m.def("sparse_prefill", &flashmla::sparse_prefill,
        "sparse MLA prefill over a flat BF16 kv (sm_90a): q, kv, indices, topk_length, scale, attn_sink -> out, "
        "max_logits, lse",
        py::arg("q"), py::arg("kv"), py::arg("indices"), py::arg("topk_length"), py::arg("softmax_scale"),
        py::arg("attn_sink") = py::none());
  m.def("indexer_logits", &flashmla::indexer_logits,
        "indexer logits of packed prefill, e4m3 q (s_q, h_i <= 64, 128) and keys (s_kv, 128) (sm_90a): q, k, weights, "
        "k_start, k_end, q_scale, |k_scale| (a negative scale's sign folded into its key) -> (s_q, s_kv) float32");
  m.def("indexer_logits_paged", &flashmla::indexer_logits_paged,
        "indexer logits of decode over the paged FP8 index cache (num_blocks, 64, 132) (sm_90a): bf16 q (batch, "
        "s_q <= 2, h_i <= 64, 128), index_cache, weights (with |q_scale|), block_table, cache_seqlens -> (batch, s_q, "
        "max_blocks * 64) float32");
  m.def("indexer_topk", &flashmla::indexer_topk,
        "the topk largest logits of each row as int32 key positions (or flat cache slots through block_table), "
        "ascending, -1 past the finite ones: logits, topk, block_table");
  m.def("write_kv_cache", &flashmla::write_kv_cache, "store latent + rope rows at flat slots (-1 skips)");
}
