// The DSA lightning indexer's logits for packed prefill with FP8 (e4m3) q and keys, on Hopper (sm_90a):
//   logits[t, s] = sum_h weights[t, h] * relu(q_scale[t, h] * k_scale[s] * (q[t, h] . k[s]))   s in [k_start[t], k_end[t])
// and -inf elsewhere; d_i = 128, h_i <= 64.
//
// Keys are the wgmma M side (64 a tile) and the (query, head) pairs its N side: a consumer warpgroup holds 4 queries'
// 64 heads (padded with zero rows past h_i), 256 columns, and multiplies each key tile in four e4m3 m64n256k32 steps.
// A key's row of the accumulator lies in the four lanes of a quad, so the weighted sum over heads is 16 fused
// multiply-adds per (key, query) in a thread and two shuffle rounds. Signs: relu(s x) = |s| relu(sign(s) x), so the
// caller flips the e4m3 sign bits of keys whose scale is negative and passes |k_scale|, which multiplies a key's sum
// after the heads; a query head's negative scale flips its row of Q in shared memory once, and |q_scale| joins its
// weight.
//
// A CTA is two consumer warpgroups (8 queries) over one split of the key tiles. The key tiles they both read come by
// TMA into kStages stages; thread 0 refills a stage two tiles after it was read, when both warpgroups have released it
// (their mbarrier arrivals). The warpgroups issue their wgmmas in turn (named barriers), so that one's weighted sums
// run while the other's wgmmas keep the tensor cores busy. Tiles that no query of the CTA sees are not loaded, only
// written as -inf.
//
// Precision: Hopper's e4m3 wgmma adds its products inside the tensor core with about 14 bits kept: on the H200 errors
// reach 1.6e-4 of the absolute sum sum_h |w| sum_d |q_d k_d| with one head, 1.6e-5 with 64 (tests/ops/mla_oracle.py's
// E4M3_MMA_BAND), against ~1e-6 for float32 sums of exact products.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda.h>
#include <torch/extension.h>

#include <cmath>

#include "indexer_common.cuh"
#include "sm90.cuh"
#include "tensor_map.h"

namespace flashmla {
namespace {

using namespace sm90;

constexpr int kDim = 128;                // d_i: one e4m3 row is one 128-byte swizzled row
using indexer::kHeads;
constexpr int kGroupQueries = 4;         // a warpgroup's queries: N = 256
constexpr int kGroups = 2;               // consumer warpgroups per CTA
constexpr int kCtaQueries = kGroups * kGroupQueries;
constexpr int kKeys = 64;                // keys per tile (M)
constexpr int kStages = 8;
constexpr int kThreads = kGroups * 128;
constexpr int kQBytes = kGroupQueries * kHeads * kDim;  // 32 KiB
constexpr int kTileBytes = kKeys * kDim;                // 8 KiB
constexpr int kAcc = kGroupQueries * kHeads / 2;        // float32 accumulators per thread (m64n256)
constexpr int kWeights = kAcc / 2;                      // a thread's columns (64)

struct Layout {
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + kGroups * kQBytes;
  static constexpr int kFull = kK + kStages * kTileBytes;  // uint64_t [kStages]: a stage's tile landed
  static constexpr int kEmpty = kFull + kStages * 8;       // uint64_t [kStages]: both warpgroups are done with it
  static constexpr int kQBarrier = kEmpty + kStages * 8;   // uint64_t: Q landed
  static constexpr int kBytes = kQBarrier + 8 + 1024;      // + slack to align the base to 1024
  static_assert(kBytes <= 227 * 1024, "shared memory");
};

struct LogitsParams {
  CUtensorMap q_map;  // (128 bytes, h_i, s_q) e4m3, box (128, 64, 4): a warpgroup's Q, zeros past h_i and s_q
  CUtensorMap k_map;  // (128 bytes, s_kv), box (128, 64): a key tile, zeros past s_kv
  const float* q_scale;  // (s_q, h_i)
  const float* k_scale;  // (s_kv,): |scale|
  const float* weights;  // (s_q, h_i)
  const int* k_start;
  const int* k_end;
  float* out;  // (s_q, s_kv)
  int s_q, s_kv, h_i, tiles_per_split;
};

__global__ void __launch_bounds__(kThreads, 1) indexer_logits_kernel(const __grid_constant__ LogitsParams p) {
  extern __shared__ uint8_t raw_shared[];
  uint8_t* shared = raw_shared + ((1024 - (smem_address(raw_shared) & 1023)) & 1023);
  const int group = warp_uniform(threadIdx.x / 128), thread = threadIdx.x % 128;
  const int warp = thread / 32, lane = threadIdx.x % 32;
  const int cta_query = blockIdx.x * kCtaQueries, group_query = cta_query + group * kGroupQueries;
  const int num_tiles = (p.s_kv + kKeys - 1) / kKeys;
  const int split_begin = blockIdx.y * p.tiles_per_split;
  const int split_end = min(split_begin + p.tiles_per_split, num_tiles);

  // Key ranges: this warpgroup's union [group_lo, group_hi) and the CTA's, over the queries that see any key.
  int group_lo = p.s_kv, group_hi = 0, cta_lo = p.s_kv, cta_hi = 0;
#pragma unroll
  for (int q = 0; q < kCtaQueries; ++q) {
    const int t = cta_query + q;
    const int lo = t < p.s_q ? __ldg(p.k_start + t) : 0, hi = t < p.s_q ? __ldg(p.k_end + t) : 0;
    if (lo < hi) {
      cta_lo = min(cta_lo, lo), cta_hi = max(cta_hi, hi);
      if (q / kGroupQueries == group) group_lo = min(group_lo, lo), group_hi = max(group_hi, hi);
    }
  }
  // Loaded tiles [first, last) of the split: those the CTA's queries see.
  const int first = cta_lo < cta_hi ? max(split_begin, cta_lo / kKeys) : split_begin;
  const int last = cta_lo < cta_hi ? max(first, min(split_end, (cta_hi + kKeys - 1) / kKeys)) : split_begin;
  const int loaded = last - first;

  const uint32_t q_tile = smem_address(shared + Layout::kQ + group * kQBytes);
  const uint32_t k_tiles = smem_address(shared + Layout::kK);
  const auto full = [&](int stage) { return smem_address(shared + Layout::kFull + stage * 8); };
  const auto empty = [&](int stage) { return smem_address(shared + Layout::kEmpty + stage * 8); };
  const uint32_t q_barrier = smem_address(shared + Layout::kQBarrier);
  const auto load_tile = [&](int index) {  // thread 0: loaded tile `index` into its stage
    const int stage = index % kStages;
    mbarrier_arrive_expect_bytes(full(stage), kTileBytes);
    tma_load_2d(k_tiles + stage * kTileBytes, &p.k_map, full(stage), 0, (first + index) * kKeys);
  };
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(full(s), 1);
      mbarrier_init(empty(s), kGroups * 4);  // every consumer warp arrives
    }
    mbarrier_init(q_barrier, 1);
    fence_barrier_init();
  }
  __syncthreads();
  if (threadIdx.x == 0 && loaded > 0) {
    mbarrier_arrive_expect_bytes(q_barrier, kGroups * kQBytes);
    for (int g = 0; g < kGroups; ++g) {
      tma_load_3d(smem_address(shared + Layout::kQ + g * kQBytes), &p.q_map, q_barrier, 0, 0,
                  cta_query + g * kGroupQueries);
    }
    for (int index = 0; index < min(kStages, loaded); ++index) load_tile(index);
  }

  // This thread's columns n = 8 j + 2 (lane % 4) + e (query n / 64, head n % 64) hold accumulators 4 j + 2 h + e, for
  // rows (keys) 16 warp + lane / 4 + 8 h. Their weights, with |q_scale| (zero past h_i and s_q):
  float weight[kWeights];
#pragma unroll
  for (int j = 0; j < kWeights / 2; ++j) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int n = 8 * j + 2 * (lane % 4) + e, t = group_query + n / kHeads, head = n % kHeads;
      const int64_t at = static_cast<int64_t>(t) * p.h_i + head;
      weight[2 * j + e] = t < p.s_q && head < p.h_i ? __ldg(p.weights + at) * fabsf(__ldg(p.q_scale + at)) : 0.f;
    }
  }
  // After the sum over heads and the quad's two shuffle rounds, a lane holds the logits of key 16 warp + lane / 4 +
  // 8 h_out for queries 2 b + r (r < 2), h_out = bit 1 of the lane, b = bit 0.
  const int b0 = lane & 1, b1 = (lane >> 1) & 1;
  const int key_in_tile = 16 * warp + lane / 4 + 8 * b1;
  int out_lo[2], out_hi[2];
  float* out_row[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int t = group_query + 2 * b0 + r;
    const bool real = t < p.s_q;
    out_lo[r] = real ? __ldg(p.k_start + t) : 0;
    out_hi[r] = real ? __ldg(p.k_end + t) : 0;
    out_row[r] = real ? p.out + static_cast<int64_t>(t) * p.s_kv : nullptr;
  }
  const auto store = [&](int key, const float (&values)[2]) {
    if (key >= p.s_kv) return;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (out_row[r] != nullptr) __stcs(out_row[r] + key, values[r]);
    }
  };

  if (loaded > 0) {
    // Q's rows whose scale is negative take the sign (exact: the e4m3 sign bit), then go to the wgmmas.
    mbarrier_wait(q_barrier, 0);
    for (int row = thread; row < kGroupQueries * kHeads; row += 128) {
      const int t = group_query + row / kHeads, head = row % kHeads;
      if (t < p.s_q && head < p.h_i && __ldg(p.q_scale + static_cast<int64_t>(t) * p.h_i + head) < 0.f) {
        uint4* bytes = reinterpret_cast<uint4*>(shared + Layout::kQ + group * kQBytes + row * kDim);
#pragma unroll
        for (int c = 0; c < kDim / 16; ++c) {
          uint4 v = bytes[c];
          v.x ^= 0x80808080u, v.y ^= 0x80808080u, v.z ^= 0x80808080u, v.w ^= 0x80808080u;
          bytes[c] = v;
        }
      }
    }
    fence_async_shared();
    named_barrier_sync(2 + group, 128);
    if (group == 1) named_barrier_arrive(4, kThreads);  // warpgroup 0 issues first
  }

  // Tiles of the split before and after the loaded ones: -inf.
  const float unseen[2] = {-INFINITY, -INFINITY};
  for (int tile = split_begin; tile < min(first, split_end); ++tile) store(tile * kKeys + key_in_tile, unseen);
  for (int tile = last; tile < split_end; ++tile) store(tile * kKeys + key_in_tile, unseen);

  const uint64_t q_desc = smem_descriptor(q_tile, 16, 1024), k_desc = smem_descriptor(k_tiles, 16, 1024);
  float acc[kAcc];
  for (int index = 0; index < loaded; ++index) {
    const int stage = index % kStages, key0 = (first + index) * kKeys, key = key0 + key_in_tile;
    // Tiles none of this warpgroup's queries see are multiplied all the same (a branch around the wgmmas would
    // serialise them) and written as -inf.
    const bool scored = key0 < group_hi && key0 + kKeys > group_lo;
    const float key_scale = scored && key < p.s_kv ? __ldg(p.k_scale + key) : 0.f;
    mbarrier_wait(full(stage), (index / kStages) & 1);
    named_barrier_sync(4 + group, kThreads);  // this warpgroup's turn to issue
    wgmma_fence();
#pragma unroll
    for (int k = 0; k < kDim / 32; ++k) {
      wgmma_m64n256k32_e4m3(acc, descriptor_plus(k_desc, stage * kTileBytes + k * 32), descriptor_plus(q_desc, k * 32),
                            k > 0);
    }
    wgmma_commit();
    if (group == 0 || index + 1 < loaded) named_barrier_arrive(4 + (1 - group), kThreads);  // the other's turn
    // Both warpgroups have released the stage of tile index - 2: warpgroup 1 issued tile index - 1 (the barrier above)
    // after its wait for index - 2's wgmmas. It takes tile index - 2 + kStages.
    if (threadIdx.x == 0 && index >= 2 && index - 2 + kStages < loaded) {
      mbarrier_wait(empty((index - 2) % kStages), ((index - 2) / kStages) & 1);
      load_tile(index - 2 + kStages);
    }
    wgmma_wait<0>();
    fence_registers(acc);
    if (lane == 0) mbarrier_arrive(empty(stage));

    float logits[2] = {-INFINITY, -INFINITY};
    if (scored) {
      float part[2][kGroupQueries];  // [h][query]: this thread's heads
      indexer::weighted_head_sums<kGroupQueries>(acc, weight, part);
      // The quad's sums: lanes of bit 0 b keep queries 2 b, 2 b + 1; then lanes of bit 1 h keep row half h.
      float kept[2][2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const float send = b0 ? part[h][r] : part[h][2 + r], keep = b0 ? part[h][2 + r] : part[h][r];
          kept[h][r] = keep + __shfl_xor_sync(0xffffffffu, send, 1);
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float send = b1 ? kept[0][r] : kept[1][r], keep = b1 ? kept[1][r] : kept[0][r];
        const float sum = keep + __shfl_xor_sync(0xffffffffu, send, 2);
        if (key >= out_lo[r] && key < out_hi[r]) logits[r] = key_scale * sum;
      }
    }
    store(key, logits);
  }
}

CUtensorMap tensor_map(const void* base, int rank, const cuuint64_t* dims, const cuuint64_t* strides,
                       const cuuint32_t* box) {
  const auto encode = tensor_map_encoder();
  CUtensorMap map;
  const cuuint32_t element_strides[3] = {1, 1, 1};
  const CUresult result = encode(&map, CU_TENSOR_MAP_DATA_TYPE_UINT8, rank, const_cast<void*>(base), dims, strides,
                                 box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                 CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(result == CUDA_SUCCESS, "indexer_logits: cuTensorMapEncodeTiled failed with ", static_cast<int>(result));
  return map;
}

}  // namespace

// q (s_q, h_i, 128) and k (s_kv, 128) e4m3 (or uint8), contiguous; q_scale, weights (s_q, h_i) and k_scale (s_kv,)
// float32 (k_scale >= 0 or NaN: the caller folds a negative scale's sign into its key); k_start, k_end (s_q,) int32.
torch::Tensor indexer_logits(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& weights,
                             const torch::Tensor& k_start, const torch::Tensor& k_end, const torch::Tensor& q_scale,
                             const torch::Tensor& k_scale) {
  const char* op = "indexer_logits";
  const auto aligned = [](const torch::Tensor& x) { return reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0; };
  TORCH_CHECK(q.is_cuda() && q.element_size() == 1 && q.dim() == 3 && q.size(2) == kDim && q.is_contiguous() &&
                  aligned(q) && q.size(1) >= 1 && q.size(1) <= kHeads,
              op, ": q must be CUDA e4m3 (s_q, h_i <= 64, 128), contiguous, 16-byte aligned");
  TORCH_CHECK(k.is_cuda() && k.element_size() == 1 && k.dim() == 2 && k.size(1) == kDim && k.is_contiguous() &&
                  aligned(k),
              op, ": k must be CUDA e4m3 (s_kv, 128), contiguous, 16-byte aligned");
  const int64_t s_q = q.size(0), h_i = q.size(1), s_kv = k.size(0);
  const auto float_matrix = [&](const torch::Tensor& x, const char* name) {
    TORCH_CHECK(x.is_cuda() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(0) == s_q &&
                    x.size(1) == h_i && x.is_contiguous(),
                op, ": ", name, " must be CUDA float32 (s_q, h_i), contiguous");
  };
  float_matrix(weights, "weights");
  float_matrix(q_scale, "q_scale");
  TORCH_CHECK(k_scale.is_cuda() && k_scale.scalar_type() == at::kFloat && k_scale.dim() == 1 &&
                  k_scale.size(0) == s_kv && k_scale.is_contiguous(),
              op, ": k_scale must be CUDA float32 (s_kv,), contiguous");
  for (const torch::Tensor* bound : {&k_start, &k_end}) {
    TORCH_CHECK(bound->is_cuda() && bound->scalar_type() == at::kInt && bound->dim() == 1 && bound->size(0) == s_q &&
                    bound->is_contiguous(),
                op, ": k_start and k_end must be CUDA int32 (s_q,), contiguous");
  }
  TORCH_CHECK(s_q < (int64_t{1} << 31) && s_kv < (int64_t{1} << 31) - kKeys, op, ": s_q and s_kv must be < 2^31");
  const c10::cuda::CUDAGuard guard(q.device());
  auto out = torch::empty({s_q, s_kv}, q.options().dtype(at::kFloat));
  if (s_q == 0 || s_kv == 0) return out;

  LogitsParams p;
  const cuuint64_t q_dims[3] = {kDim, static_cast<cuuint64_t>(h_i), static_cast<cuuint64_t>(s_q)};
  const cuuint64_t q_strides[2] = {kDim, static_cast<cuuint64_t>(h_i * kDim)};
  const cuuint32_t q_box[3] = {kDim, kHeads, kGroupQueries};
  p.q_map = tensor_map(q.data_ptr(), 3, q_dims, q_strides, q_box);
  const cuuint64_t k_dims[2] = {kDim, static_cast<cuuint64_t>(s_kv)};
  const cuuint64_t k_strides[1] = {kDim};
  const cuuint32_t k_box[2] = {kDim, kKeys};
  p.k_map = tensor_map(k.data_ptr(), 2, k_dims, k_strides, k_box);
  p.q_scale = q_scale.data_ptr<float>();
  p.k_scale = k_scale.data_ptr<float>();
  p.weights = weights.data_ptr<float>();
  p.k_start = k_start.data_ptr<int>();
  p.k_end = k_end.data_ptr<int>();
  p.out = out.data_ptr<float>();
  p.s_q = static_cast<int>(s_q), p.s_kv = static_cast<int>(s_kv), p.h_i = static_cast<int>(h_i);

  // Splits of the key tiles so that the grid fills the GPU twice over (one CTA per SM at a time).
  int multiprocessors = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, q.get_device()));
  const int64_t query_ctas = (s_q + kCtaQueries - 1) / kCtaQueries, tiles = (s_kv + kKeys - 1) / kKeys;
  const int64_t wanted = std::min<int64_t>(tiles, (2 * multiprocessors + query_ctas - 1) / query_ctas);
  p.tiles_per_split = static_cast<int>((tiles + wanted - 1) / wanted);
  const int64_t splits = (tiles + p.tiles_per_split - 1) / p.tiles_per_split;
  TORCH_CHECK(query_ctas < (int64_t{1} << 31) && splits <= 65535, op, ": too large for one launch");

  const auto stream = at::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cudaFuncSetAttribute(indexer_logits_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      Layout::kBytes));
  indexer_logits_kernel<<<dim3(static_cast<unsigned>(query_ctas), static_cast<unsigned>(splits)), kThreads,
                          Layout::kBytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace flashmla
