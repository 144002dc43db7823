// KV-cache kernels: FP8 quantize / dequantize of the 656-byte layout, and writing new tokens into the paged cache.
// One warp per token: lane l owns latent values [16 l, 16 l + 16), so lanes 8 t .. 8 t + 7 own FP8 tile t and
// reduce its amax with shuffles; lanes 0..7 move the 128 RoPE bytes. All global accesses are 16 bytes wide.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "fp8_layout.cuh"

namespace flashmla {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kValuesPerLane = kLatentDim / 32;  // 16
constexpr int kLanesPerTile = kFp8Tile / kValuesPerLane;  // 8

union Vec16 {
  uint4 raw;
  __nv_bfloat16 bf16[8];
  uint8_t bytes[16];
};

// latent_row: 512 bf16, rope_row: 64 bf16 (both 16-byte aligned); out_row: 656 bytes, 16-byte aligned.
__device__ __forceinline__ void quantize_row(const __nv_bfloat16* latent_row, const __nv_bfloat16* rope_row,
                                             uint8_t* out_row, int lane) {
  Vec16 in[2];
  in[0].raw = reinterpret_cast<const uint4*>(latent_row)[2 * lane];
  in[1].raw = reinterpret_cast<const uint4*>(latent_row)[2 * lane + 1];
  float values[kValuesPerLane];
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < kValuesPerLane; ++i) {
    values[i] = __bfloat162float(in[i / 8].bf16[i % 8]);
    amax = fmaxf(amax, fabsf(values[i]));
  }
#pragma unroll
  for (int offset = kLanesPerTile / 2; offset > 0; offset /= 2) {
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
  }
  const float scale = fp8_tile_scale(amax);
  Vec16 packed;
#pragma unroll
  for (int i = 0; i < kValuesPerLane; ++i) packed.bytes[i] = to_fp8(values[i] / scale);
  reinterpret_cast<uint4*>(out_row)[lane] = packed.raw;
  if (lane % kLanesPerTile == 0) {
    reinterpret_cast<float*>(out_row + kScaleOffset)[lane / kLanesPerTile] = scale;
  }
  if (lane < kRopeDim * 2 / 16) {
    reinterpret_cast<uint4*>(out_row + kRopeOffset)[lane] = reinterpret_cast<const uint4*>(rope_row)[lane];
  }
}

__global__ void quantize_kernel(const __nv_bfloat16* __restrict__ kv, uint8_t* __restrict__ out, int64_t num_tokens) {
  const int lane = threadIdx.x % 32;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (token >= num_tokens) return;
  const __nv_bfloat16* row = kv + token * kHeadDimQK;
  quantize_row(row, row + kLatentDim, out + token * kFp8RowBytes, lane);
}

__global__ void dequantize_kernel(const uint8_t* __restrict__ kv_fp8, __nv_bfloat16* __restrict__ out,
                                  int64_t num_tokens) {
  const int lane = threadIdx.x % 32;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (token >= num_tokens) return;
  const uint8_t* row = kv_fp8 + token * kFp8RowBytes;
  __nv_bfloat16* out_row = out + token * kHeadDimQK;
  Vec16 packed;
  packed.raw = reinterpret_cast<const uint4*>(row)[lane];
  const float scale = reinterpret_cast<const float*>(row + kScaleOffset)[lane / kLanesPerTile];
  Vec16 values[2];
#pragma unroll
  for (int i = 0; i < kValuesPerLane; ++i) {
    values[i / 8].bf16[i % 8] = __float2bfloat16_rn(from_fp8(packed.bytes[i]) * scale);
  }
  reinterpret_cast<uint4*>(out_row)[2 * lane] = values[0].raw;
  reinterpret_cast<uint4*>(out_row)[2 * lane + 1] = values[1].raw;
  if (lane < kRopeDim * 2 / 16) {
    reinterpret_cast<uint4*>(out_row + kLatentDim)[lane] = reinterpret_cast<const uint4*>(row + kRopeOffset)[lane];
  }
}

// cache: base of (num_blocks, page_block_size, 1, row) with block stride `block_stride_bytes` and row stride
// `row_stride_bytes` (the cache may be a slice of a padded buffer). Slots outside [0, num_slots) are skipped: -1 is
// padding, and a bad slot (the op checks values only on the CPU or with FLASHMLA_CHECK=1) must not write past the
// cache (into the next layer's, where caches are slices of one pool).
template <bool kIsFp8, typename SlotT>
__global__ void write_kv_cache_kernel(uint8_t* __restrict__ cache, const __nv_bfloat16* __restrict__ latent,
                                      const __nv_bfloat16* __restrict__ rope, const SlotT* __restrict__ slot_mapping,
                                      int64_t num_tokens, int64_t num_slots, int page_block_size,
                                      int64_t block_stride_bytes, int64_t row_stride_bytes) {
  const int lane = threadIdx.x % 32;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (token >= num_tokens) return;
  const int64_t slot = static_cast<int64_t>(slot_mapping[token]);
  if (slot < 0 || slot >= num_slots) return;  // padding token (-1), or a slot outside the cache
  uint8_t* dst = cache + (slot / page_block_size) * block_stride_bytes + (slot % page_block_size) * row_stride_bytes;
  const __nv_bfloat16* latent_row = latent + token * kLatentDim;
  const __nv_bfloat16* rope_row = rope + token * kRopeDim;
  if constexpr (kIsFp8) {
    quantize_row(latent_row, rope_row, dst, lane);
  } else {
    uint4* dst_vec = reinterpret_cast<uint4*>(dst);
    const uint4* latent_vec = reinterpret_cast<const uint4*>(latent_row);
    dst_vec[2 * lane] = latent_vec[2 * lane];
    dst_vec[2 * lane + 1] = latent_vec[2 * lane + 1];
    if (lane < kRopeDim * 2 / 16) dst_vec[kLatentDim * 2 / 16 + lane] = reinterpret_cast<const uint4*>(rope_row)[lane];
  }
}

int grid_for(int64_t num_tokens) { return static_cast<int>((num_tokens + kWarpsPerBlock - 1) / kWarpsPerBlock); }

void check_launch() { C10_CUDA_KERNEL_LAUNCH_CHECK(); }

}  // namespace

torch::Tensor quantize_kv_fp8(const torch::Tensor& kv) {
  TORCH_CHECK(kv.is_cuda() && kv.scalar_type() == at::kBFloat16 && kv.size(-1) == kHeadDimQK && kv.is_contiguous(),
              "quantize_kv_fp8: kv must be a contiguous CUDA bfloat16 tensor (..., 576)");
  const c10::cuda::CUDAGuard guard(kv.device());
  auto sizes = kv.sizes().vec();
  sizes.back() = kFp8RowBytes;
  auto out = torch::empty(sizes, kv.options().dtype(at::kByte));
  const int64_t num_tokens = kv.numel() / kHeadDimQK;
  if (num_tokens == 0) return out;
  quantize_kernel<<<grid_for(num_tokens), kWarpsPerBlock * 32, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const __nv_bfloat16*>(kv.data_ptr()), out.data_ptr<uint8_t>(), num_tokens);
  check_launch();
  return out;
}

torch::Tensor dequantize_kv_fp8(const torch::Tensor& kv_fp8) {
  TORCH_CHECK(kv_fp8.is_cuda() && kv_fp8.scalar_type() == at::kByte && kv_fp8.size(-1) == kFp8RowBytes &&
                  kv_fp8.is_contiguous(),
              "dequantize_kv_fp8: kv_fp8 must be a contiguous CUDA uint8 tensor (..., 656)");
  const c10::cuda::CUDAGuard guard(kv_fp8.device());
  auto sizes = kv_fp8.sizes().vec();
  sizes.back() = kHeadDimQK;
  auto out = torch::empty(sizes, kv_fp8.options().dtype(at::kBFloat16));
  const int64_t num_tokens = kv_fp8.numel() / kFp8RowBytes;
  if (num_tokens == 0) return out;
  dequantize_kernel<<<grid_for(num_tokens), kWarpsPerBlock * 32, 0, c10::cuda::getCurrentCUDAStream()>>>(
      kv_fp8.data_ptr<uint8_t>(), reinterpret_cast<__nv_bfloat16*>(out.data_ptr()), num_tokens);
  check_launch();
  return out;
}

void write_kv_cache(torch::Tensor& kv_cache, const torch::Tensor& latent, const torch::Tensor& rope,
                    const torch::Tensor& slot_mapping, bool is_fp8) {
  TORCH_CHECK(kv_cache.is_cuda() && kv_cache.dim() == 4 && kv_cache.stride(-1) == 1,
              "write_kv_cache: kv_cache must be a CUDA tensor (num_blocks, page_block_size, 1, row)");
  TORCH_CHECK(latent.is_contiguous() && rope.is_contiguous() && slot_mapping.is_contiguous(),
              "write_kv_cache: latent, rope and slot_mapping must be contiguous");
  const int64_t element = kv_cache.element_size();
  const int64_t block_stride = kv_cache.stride(0) * element, row_stride = kv_cache.stride(1) * element;
  TORCH_CHECK(reinterpret_cast<uintptr_t>(kv_cache.data_ptr()) % 16 == 0 && block_stride % 16 == 0 &&
                  row_stride % 16 == 0,
              "write_kv_cache: the CUDA kernel needs kv_cache's base and strides 16-byte aligned");
  const c10::cuda::CUDAGuard guard(kv_cache.device());
  const int64_t num_tokens = latent.size(0);
  if (num_tokens == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto* cache = reinterpret_cast<uint8_t*>(kv_cache.data_ptr());
  auto* latent_ptr = reinterpret_cast<const __nv_bfloat16*>(latent.data_ptr());
  auto* rope_ptr = reinterpret_cast<const __nv_bfloat16*>(rope.data_ptr());
  const int page_block_size = static_cast<int>(kv_cache.size(1));
  const int64_t num_slots = kv_cache.size(0) * kv_cache.size(1);
  auto launch = [&](auto is_fp8_constant, auto* slots) {
    write_kv_cache_kernel<decltype(is_fp8_constant)::value><<<grid_for(num_tokens), kWarpsPerBlock * 32, 0, stream>>>(
        cache, latent_ptr, rope_ptr, slots, num_tokens, num_slots, page_block_size, block_stride, row_stride);
  };
  const bool slots64 = slot_mapping.scalar_type() == at::kLong;
  if (is_fp8) {
    slots64 ? launch(std::true_type{}, slot_mapping.data_ptr<int64_t>())
            : launch(std::true_type{}, slot_mapping.data_ptr<int32_t>());
  } else {
    slots64 ? launch(std::false_type{}, slot_mapping.data_ptr<int64_t>())
            : launch(std::false_type{}, slot_mapping.data_ptr<int32_t>());
  }
  check_launch();
}

}  // namespace flashmla
