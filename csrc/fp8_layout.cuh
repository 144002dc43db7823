// The 656-byte FP8 latent-cache row (SPEC.md §3), shared by every kernel that reads or writes it.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cstdint>

namespace flashmla {

constexpr int kLatentDim = 512;           // kv_lora_rank: the quantized NoPE part
constexpr int kRopeDim = 64;              // qk_rope_head_dim: kept in BF16
constexpr int kHeadDimQK = kLatentDim + kRopeDim;
constexpr int kFp8Tile = 128;             // latent values per float32 scale
constexpr int kNumTiles = kLatentDim / kFp8Tile;
constexpr int kScaleOffset = kLatentDim;  // 4 float32 scales
constexpr int kRopeOffset = kScaleOffset + kNumTiles * 4;
constexpr int kFp8RowBytes = kRopeOffset + kRopeDim * 2;  // 656
constexpr float kFp8Max = 448.f;
constexpr float kFp8MinScale = 1e-4f;

static_assert(kFp8RowBytes == 656, "FP8 row layout");

// scale = 2 ** ceil(log2(max(amax / 448, 1e-4))), exact: frexp gives ratio = m * 2^e with m in [0.5, 1).
__device__ __forceinline__ float fp8_tile_scale(float amax) {
  float ratio = fmaxf(amax / kFp8Max, kFp8MinScale);
  int exponent;
  float mantissa = frexpf(ratio, &exponent);
  if (mantissa == 0.5f) exponent -= 1;
  return ldexpf(1.f, exponent);
}

// A NaN stays a NaN (fmaxf / fminf would make it -448), as the reference's cast keeps it.
__device__ __forceinline__ uint8_t to_fp8(float x) {
  const float clamped = isnan(x) ? x : fminf(fmaxf(x, -kFp8Max), kFp8Max);
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(clamped, __NV_SATFINITE, __NV_E4M3));
}

// The two e4m3 values in the low 16 bits of `pair` as a bf16 pair (exact: e4m3 -> f16 in one conversion, then
// through float32).
__device__ __forceinline__ __nv_bfloat162 e4m3x2_to_bf16x2(uint32_t pair) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(pair), __NV_E4M3);
  const float2 values = __half22float2(__half2(h));
  return __floats2bfloat162_rn(values.x, values.y);
}

// The two e4m3 values in the low 16 bits of `pair` as an f16 pair's bits (exact: one conversion).
__device__ __forceinline__ uint32_t e4m3x2_to_f16x2(uint32_t pair) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(pair), __NV_E4M3);
  return static_cast<uint32_t>(h.x) | (static_cast<uint32_t>(h.y) << 16);
}

__device__ __forceinline__ float from_fp8(uint8_t x) {
  __half_raw h = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(x), __NV_E4M3);
  return __half2float(__half(h));
}

}  // namespace flashmla
