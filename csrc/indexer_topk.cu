// The DSA indexer's top-k: the `topk` largest logits of each row, written as key positions (or as flat cache slots
// through a block table), -1 past a row's finite logits. One CTA of kThreads per row.
//
// Radix select on the logits as uint32 codes whose order is the float order: three passes (12, 10 and 10 bits from
// the top), each a shared-memory histogram of the next digit among the keys that share the digits found so far, fix
// the threshold code T, the topk-th largest. A last pass writes, in ascending position, every key above T and the
// first keys equal to T (by position) that make up topk: the output is the same on every run, so the sparse attention
// that reads it sums in the same order every time. A row of up to kSharedKeys logits is read from global memory once,
// into shared memory; a longer one is read in each of the four passes (mostly from L2).
#include <atomic>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

namespace flashmla {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxBins = 1 << 12;
// 192 KiB of codes; with the 17 KiB of histogram and counts, under the 227 KiB an sm_90 CTA may take.
constexpr int kSharedKeys = 48 * 1024;
constexpr int kPageBlockSize = 64;
constexpr uint32_t kNegativeInfinity = 0x007FFFFFu;  // ordered(-inf): a key counts when its code is above it

// The float order as unsigned order: negative floats get every bit flipped, the others their sign bit.
__device__ __forceinline__ uint32_t ordered(float value) {
  const uint32_t bits = __float_as_uint(value);
  return bits ^ (static_cast<uint32_t>(static_cast<int32_t>(bits) >> 31) | 0x80000000u);
}

struct Selection {
  uint32_t threshold;  // T: every key above it is taken
  int ties;            // and the first `ties` keys equal to it, by position
};

// The codes of keys i .. i + 3 (i a multiple of 4; keys past the row read as 0, below every threshold). From shared
// memory, or from global memory in one 16-byte load where the row is 16-byte aligned (`aligned`).
template <bool kInShared>
__device__ __forceinline__ void load4(const uint32_t* codes, const float* row, int num_keys, bool aligned, int i,
                                      uint32_t (&out)[4]) {
  if (i + 3 < num_keys && (kInShared || aligned)) {
    if constexpr (kInShared) {
      const uint4 v = *reinterpret_cast<const uint4*>(codes + i);
      out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
    } else {
      const float4 v = __ldg(reinterpret_cast<const float4*>(row + i));
      out[0] = ordered(v.x), out[1] = ordered(v.y), out[2] = ordered(v.z), out[3] = ordered(v.w);
    }
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      out[j] = i + j >= num_keys ? 0u : kInShared ? codes[i + j] : ordered(__ldg(row + i + j));
    }
  }
}

// visit(i, code) for each group of 4 keys i .. i + 3 that this thread owns (i = 4 (threadIdx.x + k kThreads)), in
// order, with the loads of kGroupsInFlight groups issued before any of them is visited: their memory latencies overlap
// instead of adding up (with one load4 per visit, compiled for sm_90, each global load waited for its use before the
// next was issued). `kWhole`: 16-byte loads for groups wholly inside the row (shared memory, or an aligned row).
constexpr int kGroupsInFlight = 4;

template <bool kInShared, bool kWhole, typename Visit>
__device__ __forceinline__ void for_each_group_of(const uint32_t* codes, const float* row, int num_keys,
                                                  Visit&& visit) {
  int i = 4 * static_cast<int>(threadIdx.x);
  for (; i + 4 * (kGroupsInFlight - 1) * kThreads + 3 < num_keys; i += 4 * kGroupsInFlight * kThreads) {
    uint32_t code[kGroupsInFlight][4];
#pragma unroll
    for (int u = 0; u < kGroupsInFlight; ++u) {
      const int first = i + 4 * u * kThreads;
      if constexpr (kInShared) {
        const uint4 v = *reinterpret_cast<const uint4*>(codes + first);
        code[u][0] = v.x, code[u][1] = v.y, code[u][2] = v.z, code[u][3] = v.w;
      } else if constexpr (kWhole) {
        const float4 v = __ldg(reinterpret_cast<const float4*>(row + first));
        code[u][0] = ordered(v.x), code[u][1] = ordered(v.y), code[u][2] = ordered(v.z), code[u][3] = ordered(v.w);
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) code[u][j] = ordered(__ldg(row + first + j));
      }
    }
#pragma unroll
    for (int u = 0; u < kGroupsInFlight; ++u) visit(i + 4 * u * kThreads, code[u]);
  }
  for (; i < num_keys; i += 4 * kThreads) {
    uint32_t code[4];
    load4<kInShared>(codes, row, num_keys, kWhole, i, code);
    visit(i, code);
  }
}

template <bool kInShared, typename Visit>
__device__ __forceinline__ void for_each_group(const uint32_t* codes, const float* row, int num_keys, bool aligned,
                                               Visit&& visit) {
  if (kInShared || aligned) {
    for_each_group_of<kInShared, true>(codes, row, num_keys, visit);
  } else {
    for_each_group_of<kInShared, false>(codes, row, num_keys, visit);
  }
}

// The digit (of `bits` bits) whose bin holds the `remaining`-th largest of the histogrammed keys, counting from the
// top bin down, and how many of those keys lie in the bins above it, into shared_scalars[0] and [1]; shared_scalars[2]
// gets the number of keys histogrammed. Every thread takes part: warp w, lane l owns `per_lane` consecutive bins from
// the top, starting (w * 32 + l) * per_lane bins down. Ends on a barrier; `warp_totals` is kWarps ints.
__device__ __forceinline__ void find_digit(const int* histogram, int bits, int remaining, int* warp_totals,
                                           int* shared_scalars) {
  const int thread = threadIdx.x, lane = thread % 32, warp = thread / 32;
  const int bins = 1 << bits, per_lane = bins / kThreads;  // 4 or 1
  const int top = bins - 1 - thread * per_lane;
  int lane_total = 0;
  for (int k = 0; k < per_lane; ++k) lane_total += histogram[top - k];
  int inclusive = lane_total;  // over the lanes of this warp
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const int from_below = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += from_below;
  }
  if (lane == 31) warp_totals[warp] = inclusive;
  __syncthreads();
  const int warp_total = warp_totals[lane];
  int warps_inclusive = warp_total;
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const int from_below = __shfl_up_sync(0xffffffffu, warps_inclusive, offset);
    if (lane >= offset) warps_inclusive += from_below;
  }
  int before = __shfl_sync(0xffffffffu, warps_inclusive - warp_total, warp) + inclusive - lane_total;
  const int histogrammed = __shfl_sync(0xffffffffu, warps_inclusive, 31);
  if (thread == 0) shared_scalars[2] = histogrammed;
  if (before < remaining && remaining <= before + lane_total) {
    for (int k = 0; k < per_lane; ++k) {
      const int count = histogram[top - k];
      if (remaining <= before + count) {
        shared_scalars[0] = top - k;
        shared_scalars[1] = before;
        break;
      }
      before += count;
    }
  }
  __syncthreads();
}

// Three passes: the top 12 bits of the codes (sign, exponent and 3 mantissa bits: the logits of a row spread over
// tens to hundreds of bins, where 8 bits put a normal row's into 2-4 and its threads' atomics on few addresses),
// then 10 and 10.
template <bool kInShared>
__device__ Selection select_threshold(const uint32_t* codes, const float* row, int num_keys, bool aligned, int topk,
                                      int* histogram, int* warp_totals, int* shared_scalars) {
  const int thread = threadIdx.x;
  uint32_t prefix = 0, prefix_mask = 0;
  int remaining = topk;
#pragma unroll 1
  for (int pass = 0; pass < 3; ++pass) {
    const int bits = pass == 0 ? 12 : 10, shift = pass == 0 ? 20 : pass == 1 ? 10 : 0;
    const uint32_t digit_mask = (1u << bits) - 1;
    for (int b = thread; b < (1 << bits); b += kThreads) histogram[b] = 0;
    __syncthreads();
    for_each_group<kInShared>(codes, row, num_keys, aligned, [&](int, const uint32_t(&code)[4]) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if ((code[j] & prefix_mask) == prefix && code[j] > kNegativeInfinity) {
          atomicAdd(&histogram[(code[j] >> shift) & digit_mask], 1);
        }
      }
    });
    __syncthreads();
    find_digit(histogram, bits, remaining, warp_totals, shared_scalars);
    // The first pass counts every finite key (and +inf): if they are no more than topk, all are taken. shared_scalars
    // is read here, before the next pass's find_digit's first barrier, after which it is rewritten.
    if (pass == 0 && shared_scalars[2] <= topk) return {kNegativeInfinity, 0};
    prefix |= static_cast<uint32_t>(shared_scalars[0]) << shift;
    prefix_mask |= digit_mask << shift;
    remaining -= shared_scalars[1];
  }
  return {prefix, remaining};
}

// logits: `rows` rows of `num_keys` float32, contiguous (`aligned`: each row 16-byte aligned). out: `rows` x `topk`
// int32. With a block table (`table_stride` entries per sequence, `rows_per_sequence` rows each) positions become
// slots.
template <bool kInShared, typename TableT>
__global__ void __launch_bounds__(kThreads) topk_kernel(const float* __restrict__ logits, int num_keys, bool aligned,
                                                        int topk, const TableT* __restrict__ block_table,
                                                        int64_t table_stride, int rows_per_sequence,
                                                        int32_t* __restrict__ out) {
  extern __shared__ __align__(16) uint32_t codes[];
  __shared__ int histogram[kMaxBins];
  __shared__ int warp_totals[kWarps];
  __shared__ int shared_scalars[3];
  __shared__ uint32_t warp_counts[2][kWarps];
  const int thread = threadIdx.x, lane = thread % 32, warp = thread / 32;
  const int64_t row_index = blockIdx.x;
  const float* row = logits + row_index * num_keys;
  int32_t* out_row = out + row_index * topk;
  if constexpr (kInShared) {  // the first pass's barrier orders these stores before its reads
    for_each_group<false>(codes, row, num_keys, aligned, [&](int i, const uint32_t(&code)[4]) {
      if (i + 3 < num_keys) {
        *reinterpret_cast<uint4*>(codes + i) = make_uint4(code[0], code[1], code[2], code[3]);
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (i + j < num_keys) codes[i + j] = code[j];
        }
      }
    });
  }
  const Selection selection =
      select_threshold<kInShared>(codes, row, num_keys, aligned, topk, histogram, warp_totals, shared_scalars);
  const TableT* table_row = block_table ? block_table + (row_index / rows_per_sequence) * table_stride : nullptr;

  // Rounds of 4 kThreads consecutive keys, 4 a thread. Counts (per thread, then per warp) of the keys above T in the
  // low 16 bits and of those equal to T in the high 16 bits: at most 4 kThreads each.
  // The next round's keys are loaded before this round's barrier.
  int written = 0, ties_left = selection.ties;
  uint32_t code[4], next[4];
  load4<kInShared>(codes, row, num_keys, aligned, 4 * thread, next);
  for (int base = 0, round = 0; base < num_keys; base += 4 * kThreads, ++round) {
    const int first = base + 4 * thread;
#pragma unroll
    for (int j = 0; j < 4; ++j) code[j] = next[j];
    if (base + 4 * kThreads < num_keys) load4<kInShared>(codes, row, num_keys, aligned, first + 4 * kThreads, next);
    uint32_t thread_count = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const bool equal = first + j < num_keys && code[j] == selection.threshold;
      thread_count += (code[j] > selection.threshold) + (equal ? 0x10000u : 0u);
    }
    uint32_t inclusive = thread_count;  // over the lanes of this warp
#pragma unroll
    for (int offset = 1; offset < 32; offset *= 2) {
      const uint32_t from_below = __shfl_up_sync(0xffffffffu, inclusive, offset);
      if (lane >= offset) inclusive += from_below;
    }
    if (lane == 31) warp_counts[round & 1][warp] = inclusive;
    __syncthreads();  // the other parity's counts were last read a round ago, before this round's barrier
    const uint32_t warp_count = warp_counts[round & 1][lane];
    uint32_t warps_inclusive = warp_count;
#pragma unroll
    for (int offset = 1; offset < 32; offset *= 2) {
      const uint32_t from_below = __shfl_up_sync(0xffffffffu, warps_inclusive, offset);
      if (lane >= offset) warps_inclusive += from_below;
    }
    const uint32_t before = __shfl_sync(0xffffffffu, warps_inclusive - warp_count, warp) + inclusive - thread_count;
    const uint32_t total = __shfl_sync(0xffffffffu, warps_inclusive, 31);
    int greater_before = static_cast<int>(before & 0xFFFF), equal_before = static_cast<int>(before >> 16);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int i = first + j;
      const bool greater = code[j] > selection.threshold;
      const bool equal = i < num_keys && code[j] == selection.threshold;
      if (greater || (equal && equal_before < ties_left)) {
        const int slot = written + greater_before + min(equal_before, ties_left);
        // A block entry of 2**25 or more (refused where the op checks values) would pass int32: -1, no token.
        const int64_t flat = table_row ? static_cast<int64_t>(table_row[i / kPageBlockSize]) * kPageBlockSize +
                                             i % kPageBlockSize
                                       : i;
        out_row[slot] = flat <= INT32_MAX ? static_cast<int32_t>(flat) : -1;
      }
      greater_before += greater;
      equal_before += equal;
    }
    const int equal_taken = min(static_cast<int>(total >> 16), ties_left);
    written += static_cast<int>(total & 0xFFFF) + equal_taken;
    ties_left -= equal_taken;
  }
  for (int slot = written + thread; slot < topk; slot += kThreads) out_row[slot] = -1;
}

}  // namespace

torch::Tensor indexer_topk(const torch::Tensor& logits, int64_t topk, const c10::optional<torch::Tensor>& block_table) {
  TORCH_CHECK(logits.is_cuda() && logits.scalar_type() == at::kFloat && logits.dim() >= 1 && logits.is_contiguous(),
              "indexer_topk: logits must be a contiguous CUDA float32 tensor (..., num_keys)");
  TORCH_CHECK(topk >= 1 && topk < (1 << 30), "indexer_topk: topk must be in [1, 2^30)");
  const int64_t num_keys = logits.size(-1);
  TORCH_CHECK(num_keys < (1 << 30), "indexer_topk: num_keys must be below 2^30");
  const c10::cuda::CUDAGuard guard(logits.device());
  auto sizes = logits.sizes().vec();
  sizes.back() = topk;
  auto out = torch::empty(sizes, logits.options().dtype(at::kInt));
  const int64_t rows = num_keys ? logits.numel() / num_keys : out.numel() / topk;
  if (rows == 0) return out;
  TORCH_CHECK(rows < (int64_t{1} << 31), "indexer_topk: at most 2^31 - 1 rows");
  int rows_per_sequence = 1;
  int64_t table_stride = 0;
  if (block_table) {
    TORCH_CHECK(logits.dim() == 3 && block_table->is_cuda() && block_table->dim() == 2 &&
                    block_table->stride(1) == 1 && block_table->size(0) == logits.size(0) &&
                    block_table->size(1) * kPageBlockSize >= num_keys,
                "indexer_topk: block_table must be a CUDA (batch, max_blocks_per_seq) table covering logits' keys");
    rows_per_sequence = static_cast<int>(logits.size(1));
    table_stride = block_table->stride(0);
  }
  const bool in_shared = num_keys <= kSharedKeys;
  const bool aligned = num_keys % 4 == 0 && reinterpret_cast<uintptr_t>(logits.data_ptr()) % 16 == 0;
  // Rounded up to whole groups of 4 codes: load4 reads a row's last, partial group with loads the compiler may merge
  // into one of the group's width (compute-sanitizer's memcheck saw a 12-byte read past a row of 70 codes, stop 52).
  const int shared_bytes = in_shared ? static_cast<int>((num_keys + 3) / 4 * 4 * sizeof(uint32_t)) : 0;
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto launch = [&](auto in_shared_constant, const auto* table) {
    using TableT = std::remove_cv_t<std::remove_pointer_t<decltype(table)>>;
    auto kernel = topk_kernel<decltype(in_shared_constant)::value, TableT>;
    // The default dynamic limit is 48 KiB less the kernel's static shared memory (~16 KiB): from ~8.1k keys a row's
    // codes need the opt-in. Set once per device (a bit each) to what the longest shared row takes, so that every
    // launch fits and host threads never lower the limit under one another's launch.
    if constexpr (decltype(in_shared_constant)::value) {
      static std::atomic<uint64_t> opted_in{0};  // one per kernel instantiation
      const int device = logits.get_device();
      const uint64_t bit = device < 64 ? uint64_t{1} << device : 0;  // past 64 devices: set on every launch
      if ((opted_in.load() & bit) == 0) {
        C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(kSharedKeys * sizeof(uint32_t))));
        opted_in.fetch_or(bit);
      }
    }
    kernel<<<static_cast<unsigned>(rows), kThreads, shared_bytes, stream>>>(
        logits.data_ptr<float>(), static_cast<int>(num_keys), aligned, static_cast<int>(topk), table, table_stride,
        rows_per_sequence, out.data_ptr<int32_t>());
  };
  auto with_table = [&](auto in_shared_constant) {
    if (!block_table) {
      launch(in_shared_constant, static_cast<const int32_t*>(nullptr));
    } else if (block_table->scalar_type() == at::kLong) {
      launch(in_shared_constant, block_table->data_ptr<int64_t>());
    } else {
      TORCH_CHECK(block_table->scalar_type() == at::kInt, "indexer_topk: block_table must be int32 or int64");
      launch(in_shared_constant, block_table->data_ptr<int32_t>());
    }
  };
  in_shared ? with_table(std::true_type{}) : with_table(std::false_type{});
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace flashmla
