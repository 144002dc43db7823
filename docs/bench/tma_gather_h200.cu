// Microbenchmark (stop 29): gathering a block of 64 indexed cache rows (576 bf16, 1152 bytes each) into a stage of
// nine 128-byte-swizzled tiles (csrc/sm90.cuh's layout), as the sparse kernels do, in several ways:
//   mode 0: cp.async, 16 bytes a thread, 128 threads (the shipped gathers' instruction count: 36 a thread a block);
//   mode 1: TMA, a 2-d tensor map over the table with a box of 64 columns x 1 row and SWIZZLE_128B, one copy per
//           (row, tile) to tile + 128 row: 576 a block, issued by every thread in turn;
//   mode 2: cp.async in the shipped gathers' pattern (a warp copies one tile line of each of four rows);
//   mode 3: 16-byte loads into registers (12 in flight a thread), then stores;
//   mode 4: both at once, the last kTma tiles of each row by TMA and the others by cp.async (as mode 0);
//   own_stage_kernel: the sparse kernels' arrangement, each of two warpgroups gathering its own stage, in both
//   patterns (written after the last device call of stop 29: compiled, not yet run; its two lines are the last).
// After the runs in docs/bench/tma_gather_h200.log the shared pieces (place_chunk, count_wrong, time_gather) were
// factored out of the kernels and runners; the modes are unchanged.
// Each CTA (one per SM) walks `blocks` blocks of its own random indices through kStages stages: wait for a stage,
// then refill it with the block kStages ahead (no compute in between: the gather rate alone). The first version
// (stop 29 call 4, the log's first table) issued the TMA copies from 32 lanes, one thread or 128 threads. A check
// launch compares every 16-byte chunk of every landed block with the table at the swizzled position, which tells
// whether a one-row TMA box lands in the swizzle of its row (the swizzle taken from the shared-memory address) or of
// row 0 of a box.
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -I csrc docs/bench/tma_gather_h200.cu -o tma_gather
//   ./tma_gather
#include <cuda.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include <cstdio>
#include <random>
#include <vector>

#include "sm90.cuh"

using namespace flashmla::sm90;

constexpr int kRowBytes = 1152, kTiles = 9, kTileBytes = 8192, kRows = 64, kStageBytes = kTiles * kTileBytes;
constexpr int kChunksPerRow = kRowBytes / 16;

#define CHECK(call)                                                                       \
  do {                                                                                    \
    cudaError_t error = (call);                                                           \
    if (error != cudaSuccess) {                                                           \
      printf("%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(error));     \
      return 1;                                                                           \
    }                                                                                     \
  } while (0)

// Chunk c of a block (0 .. 4607) as (row, 16-byte chunk of the row): kContiguous gives a warp 32 consecutive chunks
// of a row (512 contiguous bytes), else one 128-byte tile line of each of four rows (the shipped sparse gathers').
template <bool kContiguous>
__device__ __forceinline__ void place_chunk(int c, int& row, int& chunk) {
  if constexpr (kContiguous) {
    row = c / kChunksPerRow;
    chunk = c % kChunksPerRow;
  } else {
    const int q = c / 32, lane = c % 32, tile = q % kTiles;
    row = (q / kTiles) * 4 + lane / 8;
    chunk = tile * 8 + lane % 8;
  }
}

// Adds to `mismatches` the 16-byte chunks of a landed block (stage at `tile_base`, rows `index`) that differ from the
// table's at their swizzled place; thread `thread` of `threads` checks every threads-th chunk.
__device__ void count_wrong(const uint8_t* tile_base, const uint8_t* table, const int* index, int thread, int threads,
                            int* mismatches) {
  int wrong = 0;
  for (int c = thread; c < kRows * kChunksPerRow; c += threads) {
    const int row = c / kChunksPerRow, chunk = c % kChunksPerRow;
    const uint4 got =
        *reinterpret_cast<const uint4*>(tile_base + (chunk / 8) * kTileBytes + swizzled_offset(row, chunk % 8));
    const uint4 want =
        *reinterpret_cast<const uint4*>(table + static_cast<size_t>(index[row]) * kRowBytes + chunk * 16);
    wrong += got.x != want.x || got.y != want.y || got.z != want.z || got.w != want.w;
  }
  if (wrong) atomicAdd(mismatches, wrong);
}

template <int kMode, int kStages, int kThreadsT, int kTma = 0>
__global__ void __launch_bounds__(kThreadsT, 1)
    gather_kernel(const __grid_constant__ CUtensorMap map, const uint8_t* table, const int* indices, int blocks,
                  unsigned long long* cycles, int* mismatches, int check) {
  extern __shared__ uint8_t raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(raw) + 1023) & ~uintptr_t(1023));
  const uint32_t base = smem_address(smem), barriers = base + kStages * kStageBytes;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) mbarrier_init(barriers + 8 * s, 1);
    fence_barrier_init();
  }
  __syncthreads();
  const int* mine = indices + static_cast<size_t>(blockIdx.x) * blocks * kRows;
  const auto place = [&](int c, int& row, int& chunk) { place_chunk<kMode == 0>(c, row, chunk); };
  const auto issue = [&](int block, int stage) {
    const int* index = mine + block * kRows;
    const uint32_t dst = base + stage * kStageBytes;
    if constexpr (kMode == 4) {  // tiles < kTiles - kTma by cp.async (mode 0's pattern), the rest by TMA
      constexpr int kCpChunks = 8 * (kTiles - kTma);
      const uint32_t barrier = barriers + stage * 8;
      if (threadIdx.x == 0) mbarrier_arrive_expect_bytes(barrier, kRows * kTma * 128);
      for (int j = threadIdx.x; j < kRows * kTma; j += kThreadsT) {
        const int row = j / kTma, tile = kTiles - kTma + j % kTma;
        tma_load_2d(dst + tile * kTileBytes + row * 128, &map, barrier, tile * 64, index[row]);
      }
      for (int c = threadIdx.x; c < kRows * kCpChunks; c += kThreadsT) {
        const int row = c / kCpChunks, chunk = c % kCpChunks;
        cp_async_16(dst + (chunk / 8) * kTileBytes + swizzled_offset(row, chunk % 8),
                    table + static_cast<size_t>(index[row]) * kRowBytes + chunk * 16, true);
      }
      cp_async_commit();
    } else if constexpr (kMode == 0 || kMode == 2) {
      for (int c = threadIdx.x; c < kRows * kChunksPerRow; c += kThreadsT) {
        int row, chunk;
        place(c, row, chunk);
        cp_async_16(dst + (chunk / 8) * kTileBytes + swizzled_offset(row, chunk % 8),
                    table + static_cast<size_t>(index[row]) * kRowBytes + chunk * 16, true);
      }
      cp_async_commit();
    } else if constexpr (kMode == 3) {  // through registers, 12 loads in flight a thread
      constexpr int kBatch = 12;
      for (int first = threadIdx.x; first < kRows * kChunksPerRow; first += kBatch * kThreadsT) {
        uint4 values[kBatch];
#pragma unroll
        for (int i = 0; i < kBatch; ++i) {
          const int c = first + i * kThreadsT;
          int row, chunk;
          place(c < kRows * kChunksPerRow ? c : 0, row, chunk);
          values[i] = __ldg(reinterpret_cast<const uint4*>(table + static_cast<size_t>(index[row]) * kRowBytes +
                                                           chunk * 16));
        }
#pragma unroll
        for (int i = 0; i < kBatch; ++i) {
          const int c = first + i * kThreadsT;
          if (c >= kRows * kChunksPerRow) break;
          int row, chunk;
          place(c, row, chunk);
          *reinterpret_cast<uint4*>(smem + stage * kStageBytes + (chunk / 8) * kTileBytes +
                                    swizzled_offset(row, chunk % 8)) = values[i];
        }
      }
    } else {
      const uint32_t barrier = barriers + stage * 8;
      if (threadIdx.x == 0) mbarrier_arrive_expect_bytes(barrier, kRows * kRowBytes);
      for (int j = threadIdx.x; j < kRows * kTiles; j += kThreadsT) {
        const int row = j / kTiles, tile = j % kTiles;
        tma_load_2d(dst + tile * kTileBytes + row * 128, &map, barrier, tile * 64, index[row]);
      }
    }
  };
  const auto land = [&](int block, int stage, int pending_after) {
    if constexpr (kMode == 4) mbarrier_wait(barriers + stage * 8, (block / kStages) & 1);
    if constexpr (kMode == 0 || kMode == 2 || kMode == 4) {
      if (pending_after >= 2) {
        cp_async_wait<2>();
      } else if (pending_after == 1) {
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
    } else if constexpr (kMode == 3) {
      __syncthreads();
    } else {
      mbarrier_wait(barriers + stage * 8, (block / kStages) & 1);
    }
  };
  const unsigned long long start = clock64();
  for (int s = 0; s < kStages && s < blocks; ++s) issue(s, s);
  for (int block = 0; block < blocks; ++block) {
    const int stage = block % kStages;
    land(block, stage, min(kStages - 1, blocks - 1 - block));
    if (check) count_wrong(smem + stage * kStageBytes, table, mine + block * kRows, threadIdx.x, kThreadsT, mismatches);
    __syncthreads();          // every thread is done with the stage
    fence_async_shared();     // generic reads before the async proxy's writes
    if (block + kStages < blocks) issue(block + kStages, stage);
  }
  if (threadIdx.x == 0) cycles[blockIdx.x] = clock64() - start;
}

// Checks one launch (`launch(1)`), then times five (`launch(0)`, the best kept) and prints the gather rate.
template <typename Launch>
int time_gather(const char* name, Launch launch, int ctas, int blocks, unsigned long long* cycles, int* mismatches,
                const char* table_name) {
  CHECK(cudaMemset(mismatches, 0, sizeof(int)));
  launch(1);
  CHECK(cudaDeviceSynchronize());
  int wrong = 0;
  CHECK(cudaMemcpy(&wrong, mismatches, sizeof(int), cudaMemcpyDeviceToHost));
  cudaEvent_t begin, end;
  CHECK(cudaEventCreate(&begin));
  CHECK(cudaEventCreate(&end));
  float best = 1e30f;
  for (int repeat = 0; repeat < 5; ++repeat) {
    CHECK(cudaEventRecord(begin));
    launch(0);
    CHECK(cudaEventRecord(end));
    CHECK(cudaEventSynchronize(end));
    float ms = 0.f;
    CHECK(cudaEventElapsedTime(&ms, begin, end));
    best = ms < best ? ms : best;
  }
  std::vector<unsigned long long> host(ctas);
  CHECK(cudaMemcpy(host.data(), cycles, ctas * sizeof(unsigned long long), cudaMemcpyDeviceToHost));
  double mean = 0;
  for (auto c : host) mean += static_cast<double>(c) / ctas;
  const double bytes = static_cast<double>(ctas) * blocks * kRows * kRowBytes;
  printf("%-44s %-19s check: %5d wrong chunks | %7.1f us, %5.0f GB/s, %6.0f cycles a block, %5.1f B/cycle/SM\n",
         name, table_name, wrong, best * 1e3, bytes / best / 1e6, mean / blocks, bytes / ctas / mean);
  return 0;
}

template <int kMode, int kStages, int kThreadsT, int kTma = 0>
int run(const char* name, const CUtensorMap& map, const uint8_t* table, const int* indices, int ctas, int blocks,
        unsigned long long* cycles, int* mismatches, const char* table_name) {
  const int smem = kStages * kStageBytes + 1024 + 64;
  auto kernel = gather_kernel<kMode, kStages, kThreadsT, kTma>;
  CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const auto launch = [&](int check) {
    kernel<<<ctas, kThreadsT, smem>>>(map, table, indices, blocks, cycles, mismatches, check);
  };
  return time_gather(name, launch, ctas, blocks, cycles, mismatches, table_name);
}

// The sparse kernels' arrangement: two warpgroups, each gathering its own stage (one block in flight per warpgroup,
// warpgroup w taking blocks w, w + 2, ...), waiting for it, then refilling it; kContiguous picks the chunk pattern
// (mode 0's or mode 2's, within the warpgroup's 128 threads).
template <bool kContiguous>
__global__ void __launch_bounds__(256, 1)
    own_stage_kernel(const uint8_t* table, const int* indices, int blocks, unsigned long long* cycles,
                     int* mismatches, int check) {
  extern __shared__ uint8_t raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(raw) + 1023) & ~uintptr_t(1023));
  const int group = threadIdx.x / 128, thread = threadIdx.x % 128;
  const uint32_t dst = smem_address(smem) + group * kStageBytes;
  const int* mine = indices + static_cast<size_t>(blockIdx.x) * blocks * kRows;
  const auto place = [&](int c, int& row, int& chunk) { place_chunk<kContiguous>(c, row, chunk); };
  const auto issue = [&](int block) {
    const int* index = mine + block * kRows;
    for (int c = thread; c < kRows * kChunksPerRow; c += 128) {
      int row, chunk;
      place(c, row, chunk);
      cp_async_16(dst + (chunk / 8) * kTileBytes + swizzled_offset(row, chunk % 8),
                  table + static_cast<size_t>(index[row]) * kRowBytes + chunk * 16, true);
    }
    cp_async_commit();
  };
  const unsigned long long start = clock64();
  if (group < blocks) issue(group);
  for (int block = group; block < blocks; block += 2) {
    cp_async_wait<0>();
    asm volatile("bar.sync %0, 128;\n" ::"r"(1 + group) : "memory");
    if (check) count_wrong(smem + group * kStageBytes, table, mine + block * kRows, thread, 128, mismatches);
    asm volatile("bar.sync %0, 128;\n" ::"r"(1 + group) : "memory");
    if (block + 2 < blocks) issue(block + 2);
  }
  __syncthreads();
  if (threadIdx.x == 0) cycles[blockIdx.x] = clock64() - start;
}

template <bool kContiguous>
int run_own(const char* name, const uint8_t* table, const int* indices, int ctas, int blocks,
            unsigned long long* cycles, int* mismatches, const char* table_name) {
  const int smem = 2 * kStageBytes + 1024;
  auto kernel = own_stage_kernel<kContiguous>;
  CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const auto launch = [&](int check) {
    kernel<<<ctas, 256, smem>>>(table, indices, blocks, cycles, mismatches, check);
  };
  return time_gather(name, launch, ctas, blocks, cycles, mismatches, table_name);
}

int main() {
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  void* function = nullptr;
  cudaDriverEntryPointQueryResult status;
  CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &function, 12000, cudaEnableDefault, &status));
  const auto encode = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(function);
  const int blocks = 64;
  for (const long long table_rows : {32768LL, 1LL << 20}) {
    uint8_t* table = nullptr;
    CHECK(cudaMalloc(&table, table_rows * kRowBytes));
    std::vector<uint16_t> fill(table_rows * kRowBytes / 2);
    std::mt19937 generator(1);
    for (auto& value : fill) value = static_cast<uint16_t>(generator());
    CHECK(cudaMemcpy(table, fill.data(), fill.size() * 2, cudaMemcpyHostToDevice));
    std::vector<int> host_indices(static_cast<size_t>(sms) * blocks * kRows);
    std::uniform_int_distribution<int> pick(0, static_cast<int>(table_rows) - 1);
    for (auto& index : host_indices) index = pick(generator);
    int* indices = nullptr;
    CHECK(cudaMalloc(&indices, host_indices.size() * sizeof(int)));
    CHECK(cudaMemcpy(indices, host_indices.data(), host_indices.size() * sizeof(int), cudaMemcpyHostToDevice));
    unsigned long long* cycles = nullptr;
    int* mismatches = nullptr;
    CHECK(cudaMalloc(&cycles, sms * sizeof(unsigned long long)));
    CHECK(cudaMalloc(&mismatches, sizeof(int)));

    CUtensorMap map;
    const cuuint64_t dims[2] = {576, static_cast<cuuint64_t>(table_rows)};
    const cuuint64_t strides[1] = {kRowBytes};
    const cuuint32_t box[2] = {64, 1}, element_strides[2] = {1, 1};
    const CUresult result = encode(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, table, dims, strides, box,
                                   element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                   CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (result != CUDA_SUCCESS) {
      printf("cuTensorMapEncodeTiled failed: %d\n", static_cast<int>(result));
      return 1;
    }
    char table_name[64];
    snprintf(table_name, sizeof(table_name), "%lld rows (%.0f MB)", table_rows, table_rows * kRowBytes / 1e6);
    if (run<0, 2, 128>("cp.async, 512 B of a row a warp, 2 st, 128 thr", map, table, indices, sms, blocks, cycles,
                       mismatches, table_name) ||
        run<2, 2, 128>("cp.async, 4 rows' lines a warp, 2 st, 128 thr", map, table, indices, sms, blocks, cycles,
                       mismatches, table_name) ||
        run<2, 3, 128>("cp.async, 4 rows' lines a warp, 3 st, 128 thr", map, table, indices, sms, blocks, cycles,
                       mismatches, table_name) ||
        run<2, 2, 256>("cp.async, 4 rows' lines a warp, 2 st, 256 thr", map, table, indices, sms, blocks, cycles,
                       mismatches, table_name) ||
        run<2, 3, 256>("cp.async, 4 rows' lines a warp, 3 st, 256 thr", map, table, indices, sms, blocks, cycles,
                       mismatches, table_name) ||
        run<2, 3, 384>("cp.async, 4 rows' lines a warp, 3 st, 384 thr", map, table, indices, sms, blocks, cycles,
                       mismatches, table_name) ||
        run<3, 2, 256>("ld.global + st.shared, 12 in flight, 2 st, 256", map, table, indices, sms, blocks, cycles,
                       mismatches, table_name) ||
        run<1, 2, 128>("TMA row x tile, 2 st, 128 issuing threads", map, table, indices, sms, blocks, cycles,
                       mismatches, table_name) ||
        run<4, 2, 128, 1>("cp.async 8 tiles + TMA 1, 2 st, 128 thr", map, table, indices, sms, blocks, cycles,
                          mismatches, table_name) ||
        run<4, 2, 128, 2>("cp.async 7 tiles + TMA 2, 2 st, 128 thr", map, table, indices, sms, blocks, cycles,
                          mismatches, table_name) ||
        run<4, 2, 128, 3>("cp.async 6 tiles + TMA 3, 2 st, 128 thr", map, table, indices, sms, blocks, cycles,
                          mismatches, table_name) ||
        run<4, 2, 256, 2>("cp.async 7 tiles + TMA 2, 2 st, 256 thr", map, table, indices, sms, blocks, cycles,
                          mismatches, table_name) ||
        run<4, 2, 256, 3>("cp.async 6 tiles + TMA 3, 2 st, 256 thr", map, table, indices, sms, blocks, cycles,
                          mismatches, table_name) ||
        run_own<false>("own stage per warpgroup, 4 rows' lines a warp", table, indices, sms, blocks, cycles,
                       mismatches, table_name) ||
        run_own<true>("own stage per warpgroup, 512 B of a row a warp", table, indices, sms, blocks, cycles,
                      mismatches, table_name)) {
      return 1;
    }
    CHECK(cudaFree(table));
    CHECK(cudaFree(indices));
    CHECK(cudaFree(cycles));
    CHECK(cudaFree(mismatches));
  }
  return 0;
}
