// What the indexer's logits kernels share (indexer_logits.cu, indexer_logits_paged.cu): keys are the wgmma M side and
// (query, head) pairs its N side, 64 heads per query.
#pragma once

namespace flashmla::indexer {

constexpr int kHeads = 64;  // heads per query on the N side (h_i padded)

// relu that keeps NaN, as torch.relu (the references) does: fmaxf(x, 0.f) would return 0 for a NaN score. One
// FMNMX.NAN, as fmaxf's one FMNMX (x < 0.f ? 0.f : x would take a compare and a select).
__device__ __forceinline__ float relu(float x) {
  float y;
  asm("max.NaN.f32 %0, %1, 0f00000000;" : "=f"(y) : "f"(x));
  return y;
}

// A thread's part of sum_h weight[h] * relu(S[key, (query, h)]) for its two keys (row halves) and each query: its
// accumulators 4 j + 2 h + e hold columns n = 8 j + 2 (lane % 4) + e (query n / 64) of key row half h, and weight
// [2 j + e] is column n's weight. The quad's four lanes then hold the whole sum between them.
template <int kQueries>
__device__ __forceinline__ void weighted_head_sums(const float (&acc)[kQueries * kHeads / 2],
                                                   const float (&weight)[kQueries * kHeads / 4],
                                                   float (&part)[2][kQueries]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int q = 0; q < kQueries; ++q) part[h][q] = 0.f;
  }
#pragma unroll
  for (int j = 0; j < kQueries * kHeads / 8; ++j) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        part[h][j / 8] = fmaf(weight[2 * j + e], relu(acc[4 * j + 2 * h + e]), part[h][j / 8]);
      }
    }
  }
}

}  // namespace flashmla::indexer
