// get_mla_metadata on the GPU: the decode work split of flashmla_ops/decode.py (`get_mla_metadata_reference`, whose
// docstring gives the rules) in one CTA and one launch instead of the reference's ~95 small kernels, equal to it value
// for value. A sequence of L tokens counts max(1, ceil(L / 64)) blocks; `ends` is their inclusive prefix sum, int64.
//   per_part = max(1, ceil(total / parts)); group = ceil(batch / parts)
//   whole sequences (group consecutive ones per part) when the heaviest group's blocks * 100 <= per_part * 115 + 200,
//   else equal runs: part p covers global blocks [p * per_part, min((p + 1) * per_part, total)).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <climits>

namespace flashmla {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;  // 32: the second level of each reduction is one warp
constexpr int kMetadataFields = 8;     // begin_batch, begin_block, end_batch, end_block, begin_split, 3 reserved
constexpr int64_t kPageBlockSize = 64;
constexpr int64_t kAlignedSlackPercent = 115, kAlignedSlackBlocks = 2;  // decode.py's ALIGNED_SLACK_*
constexpr int64_t kMaxCount = int64_t{1} << 30;  // batch and parts (decode.py's CUDA_METADATA_MAX_COUNT)

__device__ __forceinline__ int64_t blocks_of(int length) {
  // An empty sequence still counts one block, so that its output is written. C's division truncates where Python's
  // floors; both give at most 0 for a length <= 0, which the max makes 1.
  return max(int64_t{1}, (static_cast<int64_t>(length) + kPageBlockSize - 1) / kPageBlockSize);
}

struct Sum {
  __device__ int64_t operator()(int64_t a, int64_t b) const { return a + b; }
};
struct Max {
  __device__ int64_t operator()(int64_t a, int64_t b) const { return max(a, b); }
};

// Every thread gets op over the CTA's values.
template <typename Op>
__device__ int64_t block_reduce(int64_t value, Op op, int64_t* scratch) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value = op(value, __shfl_xor_sync(0xffffffffu, value, offset));
  __syncthreads();  // scratch's previous use is over
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  value = scratch[lane];
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value = op(value, __shfl_xor_sync(0xffffffffu, value, offset));
  return value;
}

// The inclusive prefix sum of the CTA's values in thread order; `total` gets their sum in every thread.
__device__ int64_t block_inclusive_sum(int64_t value, int64_t* scratch, int64_t& total) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const int64_t below = __shfl_up_sync(0xffffffffu, value, offset);
    if (lane >= offset) value += below;
  }
  __syncthreads();
  if (lane == 31) scratch[warp] = value;
  __syncthreads();
  int64_t warps_through = scratch[lane];  // lane w: the sum of warps 0..w
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const int64_t below = __shfl_up_sync(0xffffffffu, warps_through, offset);
    if (lane >= offset) warps_through += below;
  }
  const int64_t warps_before = __shfl_sync(0xffffffffu, warps_through, max(warp - 1, 0));
  total = __shfl_sync(0xffffffffu, warps_through, 31);
  return value + (warp > 0 ? warps_before : 0);
}

// How many of the ascending ends[0, batch) are <= value (torch.searchsorted(ends, value, right=True)).
__device__ int ends_at_or_below(const int64_t* ends, int batch, int64_t value) {
  int low = 0, high = batch;
  while (low < high) {
    const int middle = low + (high - low) / 2;
    if (ends[middle] <= value) {
      low = middle + 1;
    } else {
      high = middle;
    }
  }
  return low;
}

__global__ void __launch_bounds__(kThreads) mla_metadata_kernel(const int* __restrict__ cache_seqlens, int batch,
                                                                int num_parts, int64_t* ends,
                                                                int* __restrict__ metadata,
                                                                int* __restrict__ num_splits) {
  __shared__ int64_t scratch[kWarps];
  int64_t blocks = 0;
  for (int b = threadIdx.x; b < batch; b += kThreads) blocks += blocks_of(cache_seqlens[b]);
  const int64_t total = block_reduce(blocks, Sum{}, scratch);
  const int64_t per_part = max(int64_t{1}, (total + num_parts - 1) / num_parts);

  // ends, and num_splits for equal runs: sequence b touches parts start / per_part .. (end - 1) / per_part.
  int64_t blocks_before = 0, splits_before = 0;
  for (int base = 0; base < batch; base += kThreads) {
    const int b = base + threadIdx.x;
    const int64_t sequence_blocks = b < batch ? blocks_of(cache_seqlens[b]) : 0;
    int64_t chunk_blocks, chunk_splits;
    const int64_t end = blocks_before + block_inclusive_sum(sequence_blocks, scratch, chunk_blocks);
    const int64_t start = end - sequence_blocks;
    const int64_t splits = b < batch ? (end - 1) / per_part - start / per_part + 1 : 0;
    const int64_t splits_through = splits_before + block_inclusive_sum(splits, scratch, chunk_splits);
    if (b < batch) {
      ends[b] = end;
      num_splits[b + 1] = static_cast<int>(splits_through);
    }
    blocks_before += chunk_blocks;
    splits_before += chunk_splits;
  }
  if (threadIdx.x == 0) num_splits[0] = 0;
  __syncthreads();  // every end is written: the CTA's global writes are visible to it past the barrier

  const int64_t group = (int64_t{batch} + num_parts - 1) / num_parts;
  auto start_of = [&](int64_t b) { return b > 0 ? ends[b - 1] : int64_t{0}; };
  int64_t heaviest = 0;
  for (int part = threadIdx.x; part < num_parts; part += kThreads) {
    const int64_t first = part * group;
    if (first < batch) heaviest = max(heaviest, ends[min(first + group, int64_t{batch}) - 1] - start_of(first));
  }
  heaviest = block_reduce(heaviest, Max{}, scratch);
  const bool aligned = heaviest * 100 <= per_part * kAlignedSlackPercent + kAlignedSlackBlocks * 100;

  for (int part = threadIdx.x; part < num_parts; part += kThreads) {
    int row[kMetadataFields] = {batch, 0, batch, 0, 0, 0, 0, 0};  // an idle part
    if (aligned) {
      const int64_t first = part * group;
      if (first < batch) {
        const int64_t last = min(first + group, int64_t{batch}) - 1;
        row[0] = static_cast<int>(first);
        row[2] = static_cast<int>(last);
        row[3] = static_cast<int>(ends[last] - start_of(last));
      }
    } else {
      const int64_t begin = part * per_part, end = min(begin + per_part, total);
      if (begin < end) {
        const int begin_batch = ends_at_or_below(ends, batch, begin);
        const int last_batch = ends_at_or_below(ends, batch, end - 1);
        const int64_t begin_start = start_of(begin_batch);
        row[0] = begin_batch;
        row[1] = static_cast<int>(begin - begin_start);
        row[2] = last_batch;
        row[3] = static_cast<int>(end - start_of(last_batch));
        row[4] = static_cast<int>(part - begin_start / per_part);
      }
    }
#pragma unroll
    for (int field = 0; field < kMetadataFields; ++field) {
      metadata[static_cast<int64_t>(part) * kMetadataFields + field] = row[field];
    }
  }
  if (aligned) {
    for (int b = threadIdx.x; b <= batch; b += kThreads) num_splits[b] = b;  // one part per sequence
  }
}

}  // namespace

std::vector<torch::Tensor> get_mla_metadata(const torch::Tensor& cache_seqlens, int64_t num_sm_parts) {
  TORCH_CHECK(cache_seqlens.is_cuda() && cache_seqlens.scalar_type() == at::kInt && cache_seqlens.dim() == 1,
              "get_mla_metadata: cache_seqlens must be a CUDA int32 tensor (batch,)");
  // int loop counters step by kThreads past batch and num_sm_parts: both stay far below INT_MAX
  TORCH_CHECK(num_sm_parts >= 1 && num_sm_parts <= kMaxCount, "get_mla_metadata: num_sm_parts must be in [1, 2**30]");
  TORCH_CHECK(cache_seqlens.size(0) < kMaxCount, "get_mla_metadata: batch must be below 2**30");
  const c10::cuda::CUDAGuard guard(cache_seqlens.device());
  const auto seqlens = cache_seqlens.contiguous();
  const int batch = static_cast<int>(seqlens.size(0));
  const auto options = seqlens.options();
  if (batch == 0) {  // the reference's values: nothing to split
    return {torch::zeros({num_sm_parts, kMetadataFields}, options), torch::zeros({1}, options)};
  }
  auto metadata = torch::empty({num_sm_parts, kMetadataFields}, options);
  auto num_splits = torch::empty({batch + 1}, options);
  auto ends = torch::empty({batch}, options.dtype(at::kLong));
  mla_metadata_kernel<<<1, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      seqlens.data_ptr<int>(), batch, static_cast<int>(num_sm_parts), ends.data_ptr<int64_t>(),
      metadata.data_ptr<int>(), num_splits.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {metadata, num_splits};
}

}  // namespace flashmla
