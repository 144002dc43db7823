// Does a Q K^T wgmma chain slow down when bulk copies land in shared memory, or when another warpgroup's P V runs?
// Standalone: nvcc -O3 -gencode=arch=compute_90a,code=sm_90a -std=c++17 -o wgmma_interference docs/bench/wgmma_interference_h200.cu
// One CTA per SM (132), two warpgroups. Warpgroup 0 times `groups` chains of 36 m64n64k16 SS wgmma over a 64 x 576
// Q tile and a 64 x 576 K tile (the wide decode kernel's Q K^T of one block, same 128-byte-swizzled descriptors).
// While it runs, by mode: warpgroup 1 loops P V (4 m64n256k16 SS, B MN-major: one warpgroup's half of a block's
// P V), and/or one thread of warpgroup 1 keeps 72 KB bulk copies (cp.async.bulk, 8 x 9 KB on one mbarrier: the size
// of a KV block) in flight from global memory into a third 72 KB shared tile, from a 2 GB buffer (DRAM) or a 4 MB one (L2).
#include <cstdint>
#include <cstdio>
#include <cuda_runtime.h>

__device__ __forceinline__ uint64_t desc(uint32_t address, uint32_t leading) {
  uint64_t d = (address & 0x3FFFFu) >> 4;
  d |= (uint64_t)((leading >> 4) & 0x3FFF) << 16;
  d |= (uint64_t)(1024 >> 4) << 32;
  d |= (uint64_t)1 << 62;
  return d;
}
__device__ __forceinline__ void ss64(float (&d)[32], uint64_t a, uint64_t b) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, "
      "%13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, 1, 1, "
      "1, 0, 0;\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),
        "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
        "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(a), "l"(b));
}
#define R8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
__device__ __forceinline__ void ss256tb(float (&d)[128], uint64_t a, uint64_t b) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, "
      "%13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, "
      "%35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, "
      "%57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, "
      "%79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, "
      "%101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, "
      "%119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, 1, 1, 1, 0, 1;\n"
      : R8(0), R8(8), R8(16), R8(24), R8(32), R8(40), R8(48), R8(56), R8(64), R8(72), R8(80), R8(88), R8(96), R8(104),
        R8(112), R8(120)
      : "l"(a), "l"(b));
}
__device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }

constexpr int kTile = 8192, kMatrix = 9 * kTile, kCopy = 9216;
constexpr int kSmem = 3 * kMatrix + 1024 + 64;

__global__ void __launch_bounds__(256, 1) bench(int groups, int mode, const uint8_t* src, long long src_chunks, long long* out) {
  extern __shared__ uint8_t raw[];
  uint8_t* smem = (uint8_t*)(((uintptr_t)raw + 1023) & ~(uintptr_t)1023);
  const uint32_t base = (uint32_t)__cvta_generic_to_shared(smem);
  const uint32_t q = base, k = base + kMatrix, dst = base + 2 * kMatrix, bar = base + 3 * kMatrix;
  volatile int* stop = (volatile int*)(smem + 3 * kMatrix + 8);
  for (int i = threadIdx.x; i < 2 * kMatrix / 4; i += blockDim.x) {
    uint32_t h = (uint32_t)i * 2654435761u + blockIdx.x * 97u;
    h ^= h >> 13;
    const uint32_t lo = ((h & 1u) << 15) | ((0x70u + (h >> 1) % 15u) << 7) | ((h >> 5) & 0x7fu);
    const uint32_t hi = (((h >> 12) & 1u) << 15) | ((0x70u + (h >> 13) % 15u) << 7) | ((h >> 17) & 0x7fu);
    ((uint32_t*)smem)[i] = lo | (hi << 16);
  }
  if (threadIdx.x == 0) {
    *stop = 0;
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(bar));
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  __syncthreads();
  const int wg = threadIdx.x / 128;
  if (wg == 0) {
    float d[32];
    _Pragma("unroll") for (int i = 0; i < 32; ++i) d[i] = 0.f;
    const long long t0 = clock64();
    for (int g = 0; g < groups; ++g) {
      fence();
#pragma unroll
      for (int s = 0; s < 36; ++s) {
        const uint32_t off = (s / 4) * kTile + (s % 4) * 32;
        ss64(d, desc(q + off, 16), desc(k + off, 16));
      }
      commit();
      wait0();
    }
    const long long t1 = clock64();
    *stop = 1;
    float sum = 0.f;
    _Pragma("unroll") for (int i = 0; i < 32; ++i) sum += d[i];
    if (threadIdx.x == 0) {
      out[blockIdx.x * 4 + 0] = t1 - t0;
      out[blockIdx.x * 4 + 3] = sum == 12345.f;
    }
  } else if (mode != 0) {
    // Warpgroup 1: thread 128 keeps one 72 KB batch of copies in flight (polled, so that it never blocks the P V
    // chains), and the warpgroup loops P V chains if asked.
    float d[128];
    _Pragma("unroll") for (int i = 0; i < 128; ++i) d[i] = 0.f;
    long long chains = 0, copies = 0;
    uint32_t phase = 0;
    bool in_flight = false;
    while (!*stop) {
      if ((mode & 2) && threadIdx.x == 128) {
        uint32_t done = 1;
        if (in_flight)
          asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                       : "=r"(done)
                       : "r"(bar), "r"(phase)
                       : "memory");
        if (done) {
          if (in_flight) phase ^= 1, ++copies;
          const long long chunk = ((long long)blockIdx.x * 7919 + copies * 131) % src_chunks;
          asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(8 * kCopy) : "memory");
          for (int c = 0; c < 8; ++c)
            asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                             dst + c * kCopy),
                         "l"(src + chunk * 8 * kCopy + c * kCopy), "r"(kCopy), "r"(bar)
                         : "memory");
          in_flight = true;
        }
      }
      __syncwarp();
      if (mode & 1) {
        fence();
#pragma unroll
        for (int s = 0; s < 4; ++s) ss256tb(d, desc(q + s * 32, 16), desc(k + 4 * kTile + s * 16 * 128, kTile));
        commit();
        wait0();
        ++chains;
      }
    }
    float sum = 0.f;
    _Pragma("unroll") for (int i = 0; i < 128; ++i) sum += d[i];
    if (threadIdx.x == 128) {
      out[blockIdx.x * 4 + 1] = chains + (sum == 12345.f);
      out[blockIdx.x * 4 + 2] = copies;
    }
  }
}

int main() {
  const int sms = 132, groups = 4000;
  const long long big = 2ll << 30, small = 4ll << 20;
  uint8_t* src;
  cudaMalloc(&src, big);
  cudaMemset(src, 0, big);
  long long* out;
  cudaMalloc(&out, sms * 4 * sizeof(long long));
  cudaFuncSetAttribute(bench, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  const char* names[] = {"alone", "+P V (wg1)", "+copies DRAM", "+P V +copies DRAM", "+copies L2", "+P V +copies L2"};
  const int modes[] = {0, 1, 2, 3, 2, 3};
  for (int r = 0; r < 6; ++r) {
    const long long chunks = (r >= 4 ? small : big) / (8 * kCopy);
    for (int rep = 0; rep < 2; ++rep) {
      cudaMemset(out, 0, sms * 4 * sizeof(long long));
      cudaEvent_t e0, e1;
      cudaEventCreate(&e0);
      cudaEventCreate(&e1);
      cudaEventRecord(e0);
      bench<<<sms, 256, kSmem>>>(groups, modes[r], src, chunks, out);
      cudaEventRecord(e1);
      cudaEventSynchronize(e1);
      float ms;
      cudaEventElapsedTime(&ms, e0, e1);
      long long h[sms * 4];
      cudaMemcpy(h, out, sizeof(h), cudaMemcpyDeviceToHost);
      double cyc = 0, pv = 0, cp = 0;
      for (int b = 0; b < sms; ++b) cyc += h[4 * b], pv += h[4 * b + 1], cp += h[4 * b + 2];
      cyc /= sms;
      const double per = cyc / (groups * 36.0), clock_hz = cyc / (ms * 1e-3);
      const double copy_bytes = cp * 8 * kCopy;
      if (rep == 1)
        printf("%-18s Q K^T %5.1f cycles per m64n64k16 | P V chains per SM %8.0f (%5.1f cycles per m64n256k16 issued) | "
               "copies %6.1f B/cycle/SM, %6.0f GB/s | clock %4.0f MHz  %s\n",
               names[r], per, pv / sms, pv > 0 ? cyc / (pv / sms * 4) : 0.0, copy_bytes / sms / cyc,
               copy_bytes / (ms * 1e-3) / 1e9, clock_hz / 1e6, cudaGetErrorString(cudaGetLastError()));
    }
  }
  return 0;
}
