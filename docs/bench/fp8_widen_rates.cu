// What widening e4m3 to f16 costs on the SM: the narrow FP8 decode kernel's longest phase (stop 32, call 4:
// ~2250 of ~6760 cycles a block) is 128 e4m3x2 -> f16x2 conversions and 128 HMUL2 (the tile scale) per thread. This
// times each part alone, with 256 threads per CTA (the kernel's) and one or two CTAs per SM, in SM-cycles per warp
// instruction (of a pair of values):
//   cvt        cvt.rn.f16x2.e4m3x2 (F2FP), the kernel's conversion
//   cvt+hmul2  the kernel's widen_fp8_unit: conversion, then the pair times the tile's scale
//   int        the bits by integer ops: byte b -> f16 bits (b & 0x80) << 8 | (b & 0x7f) << 7, which is b's value
//              times 2^-8 (normal and subnormal e4m3 alike; 0x7f / 0xff, e4m3's NaN, become 480 / -480)
//   int+hmul2  the same, then times scale * 2^8 (the kernel's values)
//   hmul2      the multiply alone
// Every mode's words are checked against the conversion on all 65536 pairs first (NaN pairs left out).
//
//   nvcc -O3 -gencode=arch=compute_90a,code=sm_90a -std=c++17 -o fp8_widen_rates docs/bench/fp8_widen_rates.cu
//   ./fp8_widen_rates
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>

namespace {

enum Mode { kCvt, kCvtMul, kInt, kIntMul, kMul, kModes };
const char* const kNames[kModes] = {"cvt", "cvt+hmul2", "int", "int+hmul2", "hmul2"};
constexpr int kThreads = 256, kIterations = 2048, kWords = 4;  // 4 packed words: 8 pairs an iteration

__device__ __forceinline__ uint32_t cvt_pair(uint32_t pair) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(pair), __NV_E4M3);
  return static_cast<uint32_t>(h.x) | (static_cast<uint32_t>(h.y) << 16);
}
// Bytes 0, 1 (half 0) or 2, 3 (half 1) of `word` as f16 bits worth 2^-8 of their e4m3 values.
__device__ __forceinline__ uint32_t int_pair(uint32_t word, int half) {
  const uint32_t spread = __byte_perm(word, 0, half == 0 ? 0x1404 : 0x3424);  // b_lo << 8 | b_hi << 24
  return ((spread >> 1) & 0x3F803F80u) | (spread & 0x80008000u);
}
__device__ __forceinline__ uint32_t mul_pair(uint32_t bits, __half2 scale) {
  const __half2 product = __hmul2(*reinterpret_cast<const __half2*>(&bits), scale);
  return *reinterpret_cast<const uint32_t*>(&product);
}

template <Mode kMode>
__device__ __forceinline__ uint32_t widen(uint32_t word, int half, __half2 scale) {
  if constexpr (kMode == kCvt) return cvt_pair(word >> (16 * half));
  if constexpr (kMode == kCvtMul) return mul_pair(cvt_pair(word >> (16 * half)), scale);
  if constexpr (kMode == kInt) return int_pair(word, half);
  if constexpr (kMode == kIntMul) return mul_pair(int_pair(word, half), scale);
  return mul_pair(word, scale);
}

// Every pair (a, b) of e4m3 bytes through the mode, against the conversion (times scale where the mode multiplies;
// int modes carry 2^-8, which the int+hmul2 scale undoes). mismatches[0]: pairs that differ.
template <Mode kMode>
__global__ void check(unsigned* mismatches) {
  const uint32_t pair = blockIdx.x * blockDim.x + threadIdx.x;  // 65536 threads
  const uint32_t a = pair & 0xff, b = pair >> 8;
  if ((a & 0x7f) == 0x7f || (b & 0x7f) == 0x7f || kMode == kMul) return;
  const __half2 scale = __floats2half2_rn(0.5f, 0.5f), int_scale = __floats2half2_rn(128.f, 128.f);
  const uint32_t word = a | b << 8 | a << 16 | b << 24;
  const uint32_t expected = kMode == kCvtMul || kMode == kIntMul ? mul_pair(cvt_pair(pair), scale) : cvt_pair(pair);
  for (int half = 0; half < 2; ++half) {
    uint32_t got = widen<kMode>(word, half, kMode == kIntMul ? int_scale : scale);
    if (kMode == kInt) got = mul_pair(got, __floats2half2_rn(256.f, 256.f));
    if (got != expected) atomicAdd(mismatches, 1u);
  }
}

template <Mode kMode>
__global__ void __launch_bounds__(kThreads) rate(const uint32_t* input, uint32_t* sink, long long* cycles) {
  uint32_t words[kWords], acc = 0;
  for (int w = 0; w < kWords; ++w) words[w] = input[(threadIdx.x + w * kThreads) % 1024];
  const __half2 scale = __floats2half2_rn(0.25f, 0.25f);
  __syncthreads();
  const long long start = clock64();
  for (int i = 0; i < kIterations; ++i) {
#pragma unroll
    for (int w = 0; w < kWords; ++w) {
      const uint32_t word = words[w] ^ static_cast<uint32_t>(i);  // no two iterations alike
#pragma unroll
      for (int half = 0; half < 2; ++half) acc ^= widen<kMode>(word, half, scale);
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) cycles[blockIdx.x] = clock64() - start;
  if (acc == 0x12345678u) sink[0] = acc;  // keeps the work
}

template <Mode kMode>
void run(int sms, const uint32_t* input, uint32_t* sink, long long* cycles, unsigned* mismatches) {
  cudaMemset(mismatches, 0, sizeof(unsigned));
  check<kMode><<<256, 256>>>(mismatches);
  unsigned wrong = 0;
  cudaMemcpy(&wrong, mismatches, sizeof(unsigned), cudaMemcpyDeviceToHost);
  for (int per_sm = 1; per_sm <= 2; ++per_sm) {
    const int ctas = sms * per_sm;
    rate<kMode><<<ctas, kThreads>>>(input, sink, cycles);  // warm
    rate<kMode><<<ctas, kThreads>>>(input, sink, cycles);
    long long host[1024];
    cudaMemcpy(host, cycles, sizeof(long long) * ctas, cudaMemcpyDeviceToHost);
    double mean = 0;
    for (int c = 0; c < ctas; ++c) mean += static_cast<double>(host[c]) / ctas;
    // warp instructions (pairs) per SM while a CTA runs: its warps times the CTAs sharing the SM
    const double warp_pairs = (kThreads / 32.0) * per_sm * kIterations * kWords * 2;
    printf("%-10s %d CTA/SM: %8.0f cycles per CTA, %6.3f SM-cycles per warp pair, %s (%u wrong of 131072)\n",
           kNames[kMode], per_sm, mean, mean / warp_pairs, cudaGetErrorString(cudaGetLastError()), wrong);
  }
}

}  // namespace

int main() {
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  printf("%s, %d SMs\n", prop.name, prop.multiProcessorCount);
  uint32_t host_input[1024];
  for (int i = 0; i < 1024; ++i) host_input[i] = 0x9E3779B9u * (i + 1);
  uint32_t *input, *sink;
  long long* cycles;
  unsigned* mismatches;
  cudaMalloc(&input, sizeof(host_input));
  cudaMalloc(&sink, 4);
  cudaMalloc(&cycles, sizeof(long long) * 1024);
  cudaMalloc(&mismatches, sizeof(unsigned));
  cudaMemcpy(input, host_input, sizeof(host_input), cudaMemcpyHostToDevice);
  const int sms = prop.multiProcessorCount;
  run<kCvt>(sms, input, sink, cycles, mismatches);
  run<kCvtMul>(sms, input, sink, cycles, mismatches);
  run<kInt>(sms, input, sink, cycles, mismatches);
  run<kIntMul>(sms, input, sink, cycles, mismatches);
  run<kMul>(sms, input, sink, cycles, mismatches);
  return 0;
}
