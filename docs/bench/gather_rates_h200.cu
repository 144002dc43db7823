// Stop 44: how fast can one SM fill a 72 KB stage with 64 gathered 1152-byte rows (a sparse attention block) in the
// 128-byte-swizzled tile layout the wgmma reads? No compute: each warpgroup fills its own stage with its blocks, one
// fill in flight each (two a CTA), as attend_pairs' owners do. Modes:
//   0 cp.async: 128 threads, 16 bytes each, whole 128-byte lines (attend_pairs' BF16 pattern)
//   1 TMA per (row, tile): a 128-byte box of a 3-d map, one lane of warp 0 per two rows (18 TMAs a lane)
//   2 TMA per (row, tile), issued by all 128 threads of the warpgroup (4-5 TMAs a thread)
//   3 TMA of 64 consecutive rows (three boxes of three tiles: the dense decode's fill), for reference
//   4 mode 2 in a cluster of two CTAs that gather the same rows: each issues half the rows' TMAs, multicast to both
// and cp_async_fills: cp.async fills by 2, 4 or 8 warps each, one or two fills in flight a CTA.
#include <cuda.h>
#include <cudaTypedefs.h>
#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>

#include "../../csrc/sm90.cuh"

using namespace flashmla::sm90;

// Thread block clusters (a launch with a cluster dimension): this CTA's rank in its cluster, the address in CTA
// `rank`'s shared memory of the variable at `address` in this CTA's, and the cluster-wide barrier (every thread of
// every CTA of the cluster; release / acquire, so shared-memory writes before it are visible to the whole cluster).
__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(rank));
  return rank;
}
__device__ __forceinline__ uint32_t cluster_address(uint32_t address, uint32_t rank) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(address), "r"(rank));
  return remote;
}
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
// One arrival on an mbarrier of another CTA of the cluster (`remote_barrier` from cluster_address), releasing this
// thread's earlier memory operations to the cluster.
__device__ __forceinline__ void mbarrier_arrive_remote(uint32_t remote_barrier) {
  asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];\n" ::"r"(remote_barrier) : "memory");
}
// mbarrier_wait whose arrivals came from other CTAs of the cluster (acquire at cluster scope).
__device__ __forceinline__ void mbarrier_wait_cluster(uint32_t barrier, uint32_t phase) {
  asm volatile(
      "{\n.reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n}\n" ::"r"(barrier),
      "r"(phase)
      : "memory");
}

constexpr int kTileBytes = 64 * 128, kTiles = 9, kStageBytes = kTiles * kTileBytes, kRowBytes = 1152;

// One box of a 3-d tensor map (columns, rows, tiles) into shared memory: a 128-byte line (line_map) or 64 rows of
// three tiles (box_map).
__device__ __forceinline__ void tma_line(uint32_t dst, const CUtensorMap* map, uint32_t barrier, int row, int tile) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], "
      "[%2];\n" ::"r"(dst),
      "l"(map), "r"(barrier), "r"(0), "r"(row), "r"(tile)
      : "memory");
}
__device__ __forceinline__ void tma_line_multicast(uint32_t dst, const CUtensorMap* map, uint32_t barrier, int row,
                                                   int tile, uint16_t mask) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.multicast::cluster [%0], "
      "[%1, {%3, %4, %5}], [%2], %6;\n" ::"r"(dst),
      "l"(map), "r"(barrier), "r"(0), "r"(row), "r"(tile), "h"(mask)
      : "memory");
}
template <int kMode>
__global__ void __launch_bounds__(256, 1)
    gather_kernel(const __grid_constant__ CUtensorMap line_map, const __grid_constant__ CUtensorMap box_map,
                  const uint8_t* __restrict__ kv, const int* __restrict__ indices, int blocks, uint8_t* dump) {
  extern __shared__ uint8_t raw[];
  uint8_t* shared = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(raw) + 1023) & ~uintptr_t(1023));
  const uint32_t base = smem_address(shared);
  const uint32_t barriers = base + 2 * kStageBytes, free_barriers = barriers + 16;
  const int warpgroup = threadIdx.x / 128, thread = threadIdx.x % 128, lane = threadIdx.x % 32, warp = thread / 32;
  constexpr bool kCluster = kMode == 4;
  const int rank = kCluster ? static_cast<int>(cluster_rank()) : 0;
  const int cta = kCluster ? blockIdx.x / 2 : blockIdx.x;  // the CTAs of a cluster gather the same rows
  if (threadIdx.x == 0) {
    for (int i = 0; i < 4; ++i) mbarrier_init(barriers + 8 * i, 1);
    fence_barrier_init();
  }
  __syncthreads();
  if constexpr (kCluster) cluster_sync();
  const uint32_t stage = base + warpgroup * kStageBytes, barrier = barriers + 8 * warpgroup;
  const uint32_t free_barrier = free_barriers + 8 * warpgroup;
  int fill = 0;
  for (int block = warpgroup; block < blocks; block += 2, ++fill) {
    const int* rows = indices + (static_cast<int64_t>(cta) * blocks + block) * 64;
    if constexpr (kMode == 0) {
      int row_of[4];
      for (int i = 0; i < 4; ++i) row_of[i] = rows[16 * warp + 4 * i + lane / 8];
#pragma unroll
      for (int t = 0; t < kTiles; ++t) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          cp_async_16(stage + t * kTileBytes + swizzled_offset(16 * warp + 4 * i + lane / 8, lane % 8),
                      kv + static_cast<int64_t>(row_of[i]) * kRowBytes + (8 * t + lane % 8) * 16, true);
        }
      }
      cp_async_commit();
      cp_async_wait<0>();
      named_barrier_sync(1 + warpgroup, 128);
    } else if constexpr (kMode == 1) {
      if (thread == 0) mbarrier_arrive_expect_bytes(barrier, kStageBytes);
      named_barrier_sync(1 + warpgroup, 128);
      if (warp == 0) {
        for (int r = lane; r < 64; r += 32) {
          const int row = rows[r];
#pragma unroll
          for (int t = 0; t < kTiles; ++t) tma_line(stage + t * kTileBytes + r * 128, &line_map, barrier, row, t);
        }
      }
      mbarrier_wait(barrier, fill & 1);
    } else if constexpr (kMode == 2 || kMode == 4) {
      if constexpr (kCluster) {
        // the peer's stage is free (it waited for its previous fill): arrive on its barrier, wait for it on ours
        if (thread == 0 && fill > 0) mbarrier_arrive_remote(cluster_address(free_barrier, 1 - rank));
        if (fill > 0) mbarrier_wait_cluster(free_barrier, (fill - 1) & 1);
      }
      if (thread == 0) mbarrier_arrive_expect_bytes(barrier, kStageBytes);
      named_barrier_sync(1 + warpgroup, 128);
      if constexpr (kCluster) {
        // rows 32 rank .. 32 rank + 31, each thread a quarter row's tiles (2-3), to both CTAs
        const int r = 32 * rank + thread / 4, row = rows[r];
        for (int t = thread % 4; t < kTiles; t += 4) {
          tma_line_multicast(stage + t * kTileBytes + r * 128, &line_map, barrier, row, t, 3);
        }
      } else {
        const int r = thread / 2, row = rows[r];
        for (int t = (thread % 2) * 5; t < ((thread % 2) ? kTiles : 5); ++t) {
          tma_line(stage + t * kTileBytes + r * 128, &line_map, barrier, row, t);
        }
      }
      mbarrier_wait(barrier, fill & 1);
    } else {
      if (thread == 0) {
        mbarrier_arrive_expect_bytes(barrier, kStageBytes);
        const int row = rows[0] / 64 * 64;
        for (int part = 0; part < 3; ++part) tma_line(stage + 3 * part * kTileBytes, &box_map, barrier, row, 3 * part);
      }
      mbarrier_wait(barrier, fill & 1);
    }
    if (dump != nullptr && cta == 0 && rank == 0 && block >= blocks - 2) {  // the last two blocks, for the layout check
      for (int i = thread; i < kStageBytes / 16; i += 128) {
        reinterpret_cast<uint4*>(dump + static_cast<int64_t>(block % 2) * kStageBytes)[i] =
            reinterpret_cast<const uint4*>(shared + warpgroup * kStageBytes)[i];
      }
    }
    named_barrier_sync(1 + warpgroup, 128);
  }
  if constexpr (kCluster) {
    // the last fills' remote halves have landed (each CTA waited for its own); keep both alive until then
    cluster_sync();
  }
}

static CUtensorMap make_map(const torch::Tensor& kv, int box_rows, int box_tiles) {
  void* function = nullptr;
  cudaDriverEntryPointQueryResult status;
  TORCH_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &function, 12000, cudaEnableDefault,
                                               &status) == cudaSuccess);
  auto encode = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(function);
  CUtensorMap map;
  const cuuint64_t dims[3] = {64, static_cast<cuuint64_t>(kv.size(0)), kTiles};
  const cuuint64_t strides[2] = {kRowBytes, 128};
  const cuuint32_t box[3] = {64, static_cast<cuuint32_t>(box_rows), static_cast<cuuint32_t>(box_tiles)};
  const cuuint32_t element_strides[3] = {1, 1, 1};
  const CUresult result = encode(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, kv.data_ptr(), dims, strides, box,
                                 element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                 CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(result == CUDA_SUCCESS, "encode ", static_cast<int>(result));
  return map;
}

template <int kMode>
void launch(const CUtensorMap& line_map, const CUtensorMap& box_map, const torch::Tensor& kv,
            const torch::Tensor& indices, int ctas, int blocks, uint8_t* dump) {
  const int bytes = 2 * kStageBytes + 1024 + 64;
  auto kernel = gather_kernel<kMode>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(kMode == 4 ? 2 * ctas : ctas);
  config.blockDim = dim3(256);
  config.dynamicSmemBytes = bytes;
  config.stream = c10::cuda::getCurrentCUDAStream();
  cudaLaunchAttribute cluster{};
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = kMode == 4 ? 2 : 1;
  cluster.val.clusterDim.y = 1;
  cluster.val.clusterDim.z = 1;
  config.attrs = &cluster;
  config.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, line_map, box_map, kv.data_ptr<uint8_t>(),
                                    indices.data_ptr<int>(), blocks, dump));
}

// indices (ctas, blocks, 64) int32 rows of kv (rows, 1152) uint8; dump: (2, stage bytes) uint8 or empty.
void gather(int64_t mode, const torch::Tensor& kv, const torch::Tensor& indices, const torch::Tensor& dump) {
  const CUtensorMap line_map = make_map(kv, 1, 1), box_map = make_map(kv, 64, 3);
  const int ctas = indices.size(0), blocks = indices.size(1);
  uint8_t* d = dump.numel() > 0 ? dump.data_ptr<uint8_t>() : nullptr;
  switch (mode) {
    case 0: launch<0>(line_map, box_map, kv, indices, ctas, blocks, d); break;
    case 1: launch<1>(line_map, box_map, kv, indices, ctas, blocks, d); break;
    case 2: launch<2>(line_map, box_map, kv, indices, ctas, blocks, d); break;
    case 3: launch<3>(line_map, box_map, kv, indices, ctas, blocks, d); break;
    case 4: launch<4>(line_map, box_map, kv, indices, ctas, blocks, d); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// cp.async fills by kWarps warps each (64 / kWarps rows a warp, whole 128-byte lines as mode 0), kStreams independent
// streams of fills (each its own stage; one fill in flight a stream); the CTA's other warps idle.
template <int kWarps, int kStreams>
__global__ void __launch_bounds__(256, 1)
    cp_async_kernel(const uint8_t* __restrict__ kv, const int* __restrict__ indices, int blocks) {
  extern __shared__ uint8_t raw[];
  uint8_t* shared = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(raw) + 1023) & ~uintptr_t(1023));
  constexpr int kRowsPerWarp = 64 / kWarps, kLinesPerLane = kRowsPerWarp / 4;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, stream = warp / kWarps, w = warp % kWarps;
  if (stream >= kStreams) return;
  const uint32_t stage = smem_address(shared) + stream * kStageBytes;
  for (int block = stream; block < blocks; block += kStreams) {
    const int* rows = indices + (static_cast<int64_t>(blockIdx.x) * blocks + block) * 64;
    int row_of[kLinesPerLane];
#pragma unroll
    for (int i = 0; i < kLinesPerLane; ++i) row_of[i] = rows[kRowsPerWarp * w + 4 * i + lane / 8];
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
#pragma unroll
      for (int i = 0; i < kLinesPerLane; ++i) {
        cp_async_16(stage + t * kTileBytes + swizzled_offset(kRowsPerWarp * w + 4 * i + lane / 8, lane % 8),
                    kv + static_cast<int64_t>(row_of[i]) * kRowBytes + (8 * t + lane % 8) * 16, true);
      }
    }
    cp_async_commit();
    cp_async_wait<0>();
    named_barrier_sync(1 + stream, 32 * kWarps);
  }
}

template <int kWarps, int kStreams>
void launch_cp_async(const torch::Tensor& kv, const torch::Tensor& indices) {
  const int bytes = 2 * kStageBytes + 1024;
  auto kernel = cp_async_kernel<kWarps, kStreams>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  kernel<<<indices.size(0), 256, bytes, c10::cuda::getCurrentCUDAStream()>>>(kv.data_ptr<uint8_t>(),
                                                                             indices.data_ptr<int>(), indices.size(1));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// warps a fill (2, 4, 8) and streams (1, 2; 8 warps: 1).
void cp_async_fills(int64_t warps, int64_t streams, const torch::Tensor& kv, const torch::Tensor& indices) {
  if (warps == 2 && streams == 1) launch_cp_async<2, 1>(kv, indices);
  if (warps == 2 && streams == 2) launch_cp_async<2, 2>(kv, indices);
  if (warps == 4 && streams == 1) launch_cp_async<4, 1>(kv, indices);
  if (warps == 4 && streams == 2) launch_cp_async<4, 2>(kv, indices);
  if (warps == 8 && streams == 1) launch_cp_async<8, 1>(kv, indices);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gather", &gather);
  m.def("cp_async_fills", &cp_async_fills);
}
