// Stop 56: is racecheck's report in store_output<true> (docs/HISTORY.md, stops 52-54) the tool's? A kernel with the
// wide decode kernel's barrier protocol and nothing else: warpgroup 0 publishes on named barrier 2 and releases on 4,
// warpgroup 1 publishes on 3, each syncs its own 128 threads on 5 / 6 (attend_pairs' kPublishedA, kReleasedB,
// kPublishedB, kOwnBarrier), over `blocks` blocks in pairs; then store_output's two sections around barrier 1 (row
// sums written by every fourth thread and read by all, staged values written and read back), at the decode kernel's
// 232,000 bytes of dynamic shared memory (one CTA an SM). Every access is ordered by a barrier, so racecheck should
// report nothing. Each CTA records its SM and its start and end times, which say whether CTAs followed others on an SM.
// A report only where `ctas` fills the GPU (132 on an H100) and `blocks` >= 2 would be the tool's, as in the decode
// kernel's [9000] case. Build and run on the device:
//   nvcc -arch=sm_90a -O2 -lineinfo -o bench/racecheck_probe docs/bench/stop56_racecheck_probe.cu
//   for ctas in 20 70 132 140; do for blocks in 1 2 3; do bench/racecheck_probe $ctas $blocks | tail -1
//     compute-sanitizer --tool racecheck --print-limit 2 bench/racecheck_probe $ctas $blocks | grep -E "SUMMARY|rror"
//   done; done
#include <cstdio>
#include <algorithm>
#include <cstdlib>
#include <vector>

namespace {

constexpr int kThreads = 256;
constexpr int kDynamicShared = 232000;
constexpr int kRowSums = 50000;  // float offset of the row sums, away from the exchanged values
constexpr int kStaged = 1000;    // float offset of the staged values

__device__ __forceinline__ void barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

__global__ void __launch_bounds__(kThreads, 1) probe(float* out, unsigned long long* record, int blocks) {
  extern __shared__ float shared[];
  const int thread = threadIdx.x, warpgroup = thread / 128;
  unsigned long long start, end;
  unsigned sm;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  float value = thread;
  for (int pair = 0; 2 * pair < blocks; ++pair) {
    const bool has_b = 2 * pair + 1 < blocks;
    if (warpgroup == 0) {
      if (pair > 0) barrier_arrive(4, kThreads);  // stage 1 released
      shared[thread] = value;                      // P of a
      barrier_sync(5, 128);
      value += shared[(thread + 1) % 128];
      barrier_arrive(2, kThreads);                 // a published
      if (has_b) {
        barrier_sync(3, kThreads);                 // b published
        value += shared[128 + thread];
      }
    } else {
      if (pair > 0) barrier_sync(4, kThreads);
      barrier_sync(2, kThreads);
      value += shared[thread - 128];
      if (has_b) {
        shared[thread] = value;                    // P of b
        barrier_sync(6, 128);
        value += shared[128 + (thread + 1) % 128];
        barrier_arrive(3, kThreads);
      }
    }
  }
  float* row_sums = shared + kRowSums;
  if (thread % 4 == 0) row_sums[thread] = value;
  barrier_sync(1, kThreads);
  shared[kStaged + thread] = row_sums[((thread + 128) % kThreads) & ~3];
  barrier_sync(1, kThreads);
  out[blockIdx.x * kThreads + thread] = shared[kStaged + (thread + 128) % kThreads];
  __syncthreads();
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(end));
  asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
  if (thread == 0) {
    record[3 * blockIdx.x] = sm;
    record[3 * blockIdx.x + 1] = start;
    record[3 * blockIdx.x + 2] = end;
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s CTAS BLOCKS\n", argv[0]);
    return 2;
  }
  const int ctas = atoi(argv[1]), blocks = atoi(argv[2]);
  cudaFuncSetAttribute(probe, cudaFuncAttributeMaxDynamicSharedMemorySize, kDynamicShared);
  float* out;
  unsigned long long* record;
  cudaMalloc(&out, sizeof(float) * ctas * kThreads);
  cudaMalloc(&record, sizeof(unsigned long long) * 3 * ctas);
  probe<<<ctas, kThreads, kDynamicShared>>>(out, record, blocks);
  printf("launch: %s\n", cudaGetErrorString(cudaDeviceSynchronize()));
  std::vector<unsigned long long> host(3 * ctas);
  cudaMemcpy(host.data(), record, sizeof(unsigned long long) * 3 * ctas, cudaMemcpyDeviceToHost);
  std::vector<int> per_sm(1024, 0);
  int most = 0, followed = 0;
  for (int i = 0; i < ctas; ++i) most = std::max(most, ++per_sm[host[3 * i] % 1024]);
  for (int i = 0; i < ctas; ++i) {
    for (int j = 0; j < ctas; ++j) followed += i != j && host[3 * j + 1] >= host[3 * i + 2];
  }
  printf("%d CTAs, %d blocks: at most %d CTAs on one SM; %d CTA pairs where one started after the other ended\n",
         ctas, blocks, most, followed);
  return 0;
}
