// The DSA lightning indexer's logits for decode over the paged FP8 index cache, on Hopper (sm_90a):
//   logits[b, t, s] = sum_h weights[b, t, h] * relu(q[b, t, h] . (k_scale[s] * k_e4m3[s]))   s <= L_b - s_q + t
// and -inf for the other logical positions up to the block table's capacity; d_i = 128, h_i <= 64, s_q <= 2, q bf16.
// (The caller widens e4m3 q to bf16 exactly, its scale's sign into q and its magnitude into the weights.)
//
// A cache row is 128 e4m3 bytes and its float32 scale: 132 bytes, so rows are not 16-byte aligned and TMA tiles do not
// apply; a block's 64 rows are 8448 contiguous bytes, and one thread of a producer warpgroup brings each whole block by
// one bulk copy into a staging ring. Keys are the wgmma M side (64), the sequence's queries x 64 heads its N side (64
// or 128), bf16 m64nNk16 over the 128 columns with the keys' operand A in registers: each thread reads its own two
// keys' bytes from the staging stage, widens them to bf16 (exact; the sign of a negative scale flipped into the values,
// as relu(s x) = |s| relu(sign(s) x)) and releases the stage, so a key is never written back to shared memory. For a
// thread's A fragment to be 4 contiguous bytes of a row per k-step, the columns are permuted (the sum over them does
// not care): logical column 16 c + j of k-step c is d = 32 t + 4 c + 2 (j / 8) + j % 2 with t = (j % 8) / 2, and Q is
// stored in that order. A warpgroup widens its next block while the wgmmas of the current one run. The weighted sum
// over heads and the quad shuffles are indexer_logits.cu's; |scale| multiplies a key's sum. The two consumer warpgroups
// take alternate blocks. Products are exact and summed in float32.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <cmath>

#include "fp8_layout.cuh"
#include "indexer_common.cuh"
#include "sm90.cuh"

namespace flashmla {
namespace {

using namespace sm90;

constexpr int kDim = 128;
using indexer::kHeads;
constexpr int kKeys = 64;                          // rows of a cache block, keys of a tile (M)
constexpr int kRowBytes = kDim + 4;                // e4m3 values and the float32 scale
constexpr int kBlockBytes = kKeys * kRowBytes;     // 8448: one bulk copy
constexpr int kStages = 8;
constexpr int kGroups = 2;                         // consumer warpgroups
constexpr int kThreads = (kGroups + 1) * 128;      // + the producer warpgroup (one thread of it works)
// Registers: the launch's 168 (65536 over 384 threads), then 40 for the producer and 232 for the consumers (s_q 2
// holds 64 accumulators, two 32-register fragment buffers and 32 weights).
constexpr int kProducerRegisters = 40, kConsumerRegisters = 232;
constexpr int kLaunchRegisters = 65536 / kThreads / 8 * 8;  // per thread, as the launch allocates them (168)
static_assert((kProducerRegisters + kGroups * kConsumerRegisters) * 128 <= kLaunchRegisters * kThreads,
              "setmaxnreg.inc would wait forever for registers the launch did not give the CTA");
constexpr int kSteps = kDim / 16;                  // k-steps of 16 columns

template <int kQueries>
struct Layout {
  static constexpr int kQRows = kQueries * kHeads;                  // N
  static constexpr int kQColumnTileBytes = kQRows * 128;
  static constexpr int kQ = 0;                                      // two column tiles of kQRows rows
  static constexpr int kStaging = kQ + 2 * kQColumnTileBytes;
  static constexpr int kFull = kStaging + kStages * kBlockBytes;    // uint64_t [kStages]
  static constexpr int kEmpty = kFull + kStages * 8;                // uint64_t [kStages]
  static constexpr int kBytes = kEmpty + kStages * 8 + 1024;
  static_assert(kStaging % 1024 == 0 && kBlockBytes % 16 == 0, "alignment");
  static_assert(kBytes <= 227 * 1024, "shared memory");
};

struct PagedParams {
  const __nv_bfloat16* q;  // (batch, s_q, h_i, 128)
  const float* weights;    // (batch, s_q, h_i), with |q_scale|
  const uint8_t* cache;    // (num_blocks, 64, 132)
  int64_t cache_block_bytes;
  const int* block_table;
  int64_t block_table_stride;
  const int* cache_seqlens;
  float* out;  // (batch, s_q, capacity)
  int s_q, h_i, num_blocks, max_blocks, tiles_per_split;
};

// A thread's A fragment of k-step c for its keys `row` and `row + 8` (the column permutation above): the 4 bytes
// at 32 (lane % 4) + 4 c of each row, widened to bf16 pairs (exact), sign-flipped where `flip` (0x80808080).
__device__ __forceinline__ void widen_fragment(const uint8_t* row, uint32_t flip, uint32_t flip8, uint32_t (&a)[4]) {
  const uint32_t packed[2] = {*reinterpret_cast<const uint32_t*>(row) ^ flip,
                              *reinterpret_cast<const uint32_t*>(row + 8 * kRowBytes) ^ flip8};
#pragma unroll
  for (int half = 0; half < 2; ++half) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const __nv_bfloat162 pair = e4m3x2_to_bf16x2(packed[r] >> (16 * half));
      a[2 * half + r] = *reinterpret_cast<const uint32_t*>(&pair);
    }
  }
}

template <int kQueries>
__device__ __forceinline__ void wgmma_keys_by_queries(float (&d)[kQueries * 32], const uint32_t (&a)[4],
                                                      uint64_t desc_b, int accumulate) {
  if constexpr (kQueries == 1) {
    wgmma_m64n64k16_rs(d, a, desc_b, accumulate);
  } else {
    wgmma_m64n128k16_rs(d, a, desc_b, accumulate);
  }
}

template <int kQueries>
__global__ void __launch_bounds__(kThreads, 1) indexer_logits_paged_kernel(const __grid_constant__ PagedParams p) {
  using L = Layout<kQueries>;
  constexpr int kAcc = kQueries * 32, kWeights = kAcc / 2;
  extern __shared__ uint8_t raw_shared[];
  uint8_t* shared = raw_shared + ((1024 - (smem_address(raw_shared) & 1023)) & 1023);
  const int batch = blockIdx.x;
  const int length = p.cache_seqlens[batch];
  const int capacity_tiles = p.max_blocks;
  const int split_begin = blockIdx.y * p.tiles_per_split;
  const int split_end = min(split_begin + p.tiles_per_split, capacity_tiles);
  // Keys [0, length) are seen by some query (the last sees them all): their tiles of the split are loaded.
  const int seen_tiles = min((max(length, 0) + kKeys - 1) / kKeys, capacity_tiles);
  const int first = split_begin, last = max(split_begin, min(split_end, seen_tiles));
  const int loaded = last - first;
  const auto full = [&](int stage) { return smem_address(shared + L::kFull + stage * 8); };
  const auto empty = [&](int stage) { return smem_address(shared + L::kEmpty + stage * 8); };

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(full(s), 1);
      mbarrier_init(empty(s), 4);  // the consuming warpgroup's warps
    }
    fence_barrier_init();
  }
  __syncthreads();

  if (threadIdx.x >= kGroups * 128) {  // the producer warpgroup: its first thread brings each block into its stage
    setmaxnreg_dec<kProducerRegisters>();
    if (threadIdx.x == kGroups * 128) {
      for (int index = 0; index < loaded; ++index) {
        const int stage = index % kStages;
        if (index >= kStages) mbarrier_wait(empty(stage), ((index / kStages) - 1) & 1);
        const int entry = p.block_table[batch * p.block_table_stride + first + index];
        const int page = min(max(entry, 0), p.num_blocks - 1);  // entries are checked by the op; never out of bounds
        mbarrier_arrive_expect_bytes(full(stage), kBlockBytes);
        bulk_copy(smem_address(shared + L::kStaging + stage * kBlockBytes), p.cache + page * p.cache_block_bytes,
                  kBlockBytes, full(stage));
      }
    }
    return;
  }

  setmaxnreg_inc<kConsumerRegisters>();
  const int group = warp_uniform(threadIdx.x / 128), thread = threadIdx.x % 128;
  const int warp = thread / 32, lane = threadIdx.x % 32;

  // Q: (query, head) rows n = 64 query + head in two 64-column swizzled tiles, columns permuted (logical 8 chunk .. + 7
  // are the bf16 pairs at d = 32 t + 4 (chunk / 2) + 2 (chunk % 2), t = 0..3); zeros past s_q and h_i.
  for (int i = threadIdx.x; i < L::kQRows * (kDim / 8); i += kGroups * 128) {
    const int n = i / (kDim / 8), chunk = i % (kDim / 8), t = n / kHeads, head = n % kHeads;
    uint32_t words[4] = {0u, 0u, 0u, 0u};
    if (t < p.s_q && head < p.h_i) {
      const __nv_bfloat16* source = p.q + ((static_cast<int64_t>(batch) * p.s_q + t) * p.h_i + head) * kDim +
                                    4 * (chunk / 2) + 2 * (chunk % 2);
#pragma unroll
      for (int w = 0; w < 4; ++w) words[w] = *reinterpret_cast<const uint32_t*>(source + 32 * w);
    }
    *reinterpret_cast<uint4*>(shared + L::kQ + (chunk / 8) * L::kQColumnTileBytes + swizzled_offset(n, chunk % 8)) =
        make_uint4(words[0], words[1], words[2], words[3]);
  }

  // Columns n = 8 j + 2 (lane % 4) + e of the accumulators 4 j + 2 h + e (keys 16 warp + lane / 4 + 8 h): weights.
  float weight[kWeights];
#pragma unroll
  for (int j = 0; j < kWeights / 2; ++j) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int n = 8 * j + 2 * (lane % 4) + e, t = n / kHeads, head = n % kHeads;
      weight[2 * j + e] = t < p.s_q && head < p.h_i
                              ? p.weights[(static_cast<int64_t>(batch) * p.s_q + t) * p.h_i + head]
                              : 0.f;
    }
  }
  // After the quad's shuffles a lane holds key 16 warp + lane / 4 + 8 (kQueries == 2 ? b1 : b0) for query
  // (kQueries == 2 ? b0 : 0); with one query the lanes of b1 = 1 hold copies and do not store.
  const int b0 = lane & 1, b1 = (lane >> 1) & 1;
  const int key_in_tile = 16 * warp + lane / 4 + 8 * (kQueries == 2 ? b1 : b0);
  const int query = kQueries == 2 ? b0 : 0;
  const bool stores = query < p.s_q && (kQueries == 2 || b1 == 0);
  float* out_row = p.out + (static_cast<int64_t>(batch) * p.s_q + query) * (static_cast<int64_t>(capacity_tiles) *
                                                                             kKeys);
  const int last_visible = length - p.s_q + query;  // keys <= it
  const auto store = [&](int key, float value) {
    if (stores) __stcs(out_row + key, key <= last_visible ? value : -INFINITY);
  };
  // Tiles of the split past the sequence: -inf (alternate tiles per warpgroup).
  for (int tile = last + group; tile < split_end; tile += kGroups) store(tile * kKeys + key_in_tile, -INFINITY);

  fence_async_shared();
  named_barrier_sync(3, kGroups * 128);  // Q is in place

  const uint64_t q_desc = smem_descriptor(smem_address(shared + L::kQ), 16, 1024);
  const int fragment_row = 16 * warp + lane / 4;  // and + 8
  // Waits for own block `index`, reads its keys' bytes as A fragments and the stored key's |scale|, frees the stage.
  const auto widen_block = [&](int index, uint32_t (&a)[kSteps][4], float& key_scale) {
    const int stage = index % kStages;
    mbarrier_wait(full(stage), (index / kStages) & 1);
    const uint8_t* block = shared + L::kStaging + stage * kBlockBytes;
    const uint8_t* row = block + fragment_row * kRowBytes;
    const uint32_t flip = *reinterpret_cast<const float*>(row + kDim) < 0.f ? 0x80808080u : 0u;
    const uint32_t flip8 = *reinterpret_cast<const float*>(row + 8 * kRowBytes + kDim) < 0.f ? 0x80808080u : 0u;
    key_scale = fabsf(*reinterpret_cast<const float*>(block + key_in_tile * kRowBytes + kDim));
#pragma unroll
    for (int c = 0; c < kSteps; ++c) widen_fragment(row + 32 * (lane % 4) + 4 * c, flip, flip8, a[c]);
    __syncwarp();
    if (lane == 0) mbarrier_arrive(empty(stage));  // the staging stage is read
  };
  float acc[kAcc];
  // Multiplies own block `index` (its fragments in `a`), widens the next own block into `next` meanwhile, then sums
  // and stores the logits.
  const auto multiply_block = [&](int index, uint32_t (&a)[kSteps][4], float key_scale, uint32_t (&next)[kSteps][4],
                                  float& next_scale) {
    wgmma_fence();
#pragma unroll
    for (int k = 0; k < kSteps; ++k) {
      wgmma_keys_by_queries<kQueries>(acc, a[k], descriptor_plus(q_desc, (k / 4) * L::kQColumnTileBytes + (k % 4) * 32),
                                      k > 0);
    }
    wgmma_commit();
    if (index + kGroups < loaded) widen_block(index + kGroups, next, next_scale);
    wgmma_wait<0>();
    fence_registers(acc);
#pragma unroll
    for (int k = 0; k < kSteps; ++k) fence_registers(a[k]);  // read by the wgmmas until here

    float part[2][kQueries];
    indexer::weighted_head_sums<kQueries>(acc, weight, part);
    float sum;
    if constexpr (kQueries == 2) {  // lanes of bit 0 b keep query b, then lanes of bit 1 h keep row half h
      float kept[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float send = b0 ? part[h][0] : part[h][1], keep = b0 ? part[h][1] : part[h][0];
        kept[h] = keep + __shfl_xor_sync(0xffffffffu, send, 1);
      }
      const float send = b1 ? kept[0] : kept[1], keep = b1 ? kept[1] : kept[0];
      sum = keep + __shfl_xor_sync(0xffffffffu, send, 2);
    } else {  // lanes of bit 0 h keep row half h; then the quad's other pair adds in
      const float send = b0 ? part[0][0] : part[1][0], keep = b0 ? part[1][0] : part[0][0];
      sum = keep + __shfl_xor_sync(0xffffffffu, send, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    }
    store((first + index) * kKeys + key_in_tile, key_scale * sum);
  };
  // Two fragment buffers in turn: a block's wgmmas read one while the next block is widened into the other.
  uint32_t even[kSteps][4], odd[kSteps][4];
  float even_scale = 0.f, odd_scale = 0.f;
  if (group < loaded) widen_block(group, even, even_scale);
  for (int index = group; index < loaded; index += 2 * kGroups) {
    multiply_block(index, even, even_scale, odd, odd_scale);
    if (index + kGroups < loaded) multiply_block(index + kGroups, odd, odd_scale, even, even_scale);
  }
}

template <int kQueries>
void launch(const PagedParams& p, int64_t batch, int64_t splits, cudaStream_t stream) {
  using L = Layout<kQueries>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(indexer_logits_paged_kernel<kQueries>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, L::kBytes));
  indexer_logits_paged_kernel<kQueries>
      <<<dim3(static_cast<unsigned>(batch), static_cast<unsigned>(splits)), kThreads, L::kBytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// q (batch, s_q <= 2, h_i <= 64, 128) bf16, contiguous; index_cache (num_blocks, 64, 132) 1-byte, rows contiguous,
// 16-byte aligned blocks; weights (batch, s_q, h_i) float32 (with |q_scale| for e4m3 q); block_table
// (batch, max_blocks) and cache_seqlens (batch,) int32.
torch::Tensor indexer_logits_paged(const torch::Tensor& q, const torch::Tensor& index_cache,
                                   const torch::Tensor& weights, const torch::Tensor& block_table,
                                   const torch::Tensor& cache_seqlens) {
  const char* op = "indexer_logits_paged";
  TORCH_CHECK(q.is_cuda() && q.scalar_type() == at::kBFloat16 && q.dim() == 4 && q.size(3) == kDim &&
                  q.is_contiguous() && reinterpret_cast<uintptr_t>(q.data_ptr()) % 16 == 0 && q.size(1) >= 1 &&
                  q.size(1) <= 2 && q.size(2) >= 1 && q.size(2) <= kHeads,
              op, ": q must be CUDA bfloat16 (batch, s_q <= 2, h_i <= 64, 128), contiguous, 16-byte aligned");
  const int64_t batch = q.size(0), s_q = q.size(1), h_i = q.size(2);
  TORCH_CHECK(index_cache.is_cuda() && index_cache.element_size() == 1 && index_cache.dim() == 3 &&
                  index_cache.size(1) == kKeys && index_cache.size(2) == kRowBytes && index_cache.stride(2) == 1 &&
                  index_cache.stride(1) == kRowBytes && index_cache.stride(0) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(index_cache.data_ptr()) % 16 == 0,
              op, ": index_cache must be CUDA FP8 (num_blocks, 64, 132) with contiguous rows and 16-byte aligned blocks");
  TORCH_CHECK(weights.is_cuda() && weights.scalar_type() == at::kFloat && weights.dim() == 3 &&
                  weights.size(0) == batch && weights.size(1) == s_q && weights.size(2) == h_i &&
                  weights.is_contiguous(),
              op, ": weights must be CUDA float32 (batch, s_q, h_i), contiguous");
  TORCH_CHECK(block_table.is_cuda() && block_table.scalar_type() == at::kInt && block_table.dim() == 2 &&
                  block_table.size(0) == batch && block_table.stride(1) == 1,
              op, ": block_table must be CUDA int32 (batch, max_blocks) with contiguous rows");
  TORCH_CHECK(cache_seqlens.is_cuda() && cache_seqlens.scalar_type() == at::kInt && cache_seqlens.dim() == 1 &&
                  cache_seqlens.size(0) == batch && cache_seqlens.is_contiguous(),
              op, ": cache_seqlens must be CUDA int32 (batch,), contiguous");
  const int64_t max_blocks = block_table.size(1), capacity = max_blocks * kKeys;
  TORCH_CHECK(capacity < (int64_t{1} << 31), op, ": max_blocks * 64 must be < 2^31");
  const c10::cuda::CUDAGuard guard(q.device());
  auto out = torch::empty({batch, s_q, capacity}, q.options().dtype(at::kFloat));
  if (batch == 0 || capacity == 0) return out;
  TORCH_CHECK(index_cache.size(0) >= 1, op, ": index_cache has no blocks");

  PagedParams p;
  p.q = reinterpret_cast<const __nv_bfloat16*>(q.data_ptr());
  p.weights = weights.data_ptr<float>();
  p.cache = static_cast<const uint8_t*>(index_cache.data_ptr());
  p.cache_block_bytes = index_cache.stride(0);
  p.block_table = block_table.data_ptr<int>();
  p.block_table_stride = block_table.stride(0);
  p.cache_seqlens = cache_seqlens.data_ptr<int>();
  p.out = out.data_ptr<float>();
  p.s_q = static_cast<int>(s_q), p.h_i = static_cast<int>(h_i);
  p.num_blocks = static_cast<int>(std::min<int64_t>(index_cache.size(0), INT32_MAX));
  p.max_blocks = static_cast<int>(max_blocks);

  int multiprocessors = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, q.get_device()));
  // Splits per sequence (one CTA fits an SM): the fewest whose waves of CTAs fill the SMs within 5% of the best
  // split up to 4 CTAs per SM, as every CTA starts by loading Q and filling its stages. A split is whole tiles, so
  // `wanted` splits launch as ceil(max_blocks / ceil(max_blocks / wanted)).
  const auto launched = [&](int64_t wanted) {
    const int64_t tiles = (max_blocks + wanted - 1) / wanted;
    return (max_blocks + tiles - 1) / tiles;
  };
  const auto filled = [&](int64_t wanted) {
    const int64_t ctas = batch * launched(wanted);
    return static_cast<double>(ctas) / (((ctas + multiprocessors - 1) / multiprocessors) * multiprocessors);
  };
  const int64_t most = std::max<int64_t>(1, std::min<int64_t>(max_blocks, (4 * multiprocessors + batch - 1) / batch));
  double best = 0.;
  for (int64_t s = 1; s <= most; ++s) best = std::max(best, filled(s));
  int64_t wanted = 1;
  while (filled(wanted) < 0.95 * best) ++wanted;
  p.tiles_per_split = static_cast<int>((max_blocks + wanted - 1) / wanted);
  const int64_t splits = launched(wanted);
  TORCH_CHECK(batch <= INT32_MAX && splits <= 65535, op, ": too large for one launch");
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (s_q == 1) {
    launch<1>(p, batch, splits, stream);
  } else {
    launch<2>(p, batch, splits, stream);
  }
  return out;
}

}  // namespace flashmla
