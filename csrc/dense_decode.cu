// Dense paged MLA decode over the BF16 or FP8 latent cache on Hopper (sm_90a), and the combine of split partials.
//
// One CTA = 64 query rows (flattened (s_q, h_q) pairs of one sequence; all heads share the one latent KV head) x one
// split of the sequence's 64-token cache blocks. Two warpgroups share each block:
//   S_w = Q K[w * 32 : w * 32 + 32]^T          (wgmma m64n32, K = 576: warpgroup w scores half the block's tokens)
//   m   = max(m, rowmax(S_0), rowmax(S_1))     (row maxima exchanged through shared memory)
//   P   = exp2(S - m) -> shared memory (bf16)  (the whole 64 x 64 probability tile)
//   O_w = O_w * exp2(m_old - m) + P V[:, w * 256 : w * 256 + 256]   (wgmma m64n256: warpgroup w owns half of d_v)
// Q (cp.async), two KV stages (TMA through a tensor map over the paged cache, one mbarrier per stage) and P live in
// 128-byte-swizzled shared tiles (sm90.cuh). The loop keeps the tensor cores fed: P V of block i and Q K^T of block
// i + 1 are issued back to back, the load of block i + 2 starts once block i's stage is free, and the softmax of
// block i + 1 follows. Rows of the last block past the sequence's end are zeroed in shared memory before P V, so
// whatever the cache holds there never reaches the output.
// With several splits per sequence each CTA writes its normalised float32 output and base-2 LSE, and
// `combine_kernel` merges them.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda.h>
#include <cudaTypedefs.h>
#include <torch/extension.h>

#include <cmath>

#include "fp8_layout.cuh"
#include "sm90.cuh"

namespace flashmla {
namespace {

using namespace sm90;

constexpr int kBlockN = 64;                   // tokens per cache block (page_block_size) and per KV tile
constexpr int kRowsPerCta = 64;               // query rows per CTA: one wgmma M
constexpr int kThreads = 256;                 // two warpgroups
constexpr int kTokensPerWarpgroup = kBlockN / 2;
constexpr int kValueColsPerWarpgroup = kLatentDim / 2;
constexpr int kColumnTiles = kHeadDimQK / 64;  // 9 swizzled 64-column tiles per 576-wide row
constexpr int kChunksPerRow = kHeadDimQK / 8;  // 72 16-byte chunks
constexpr int kTileBytes = 64 * 128;          // one 64-row swizzled column tile
constexpr int kMatrixBytes = kColumnTiles * kTileBytes;
constexpr int kMaxSplits = 1024;
constexpr float kLn2 = 0.69314718055994530942f;
constexpr int kRawRowBytes = kLatentDim + kNumTiles * 4;  // an FP8 row's e4m3 latent and scales (528 bytes)
constexpr int kRawParts = 3;
constexpr int kRawPartBytes = kRawRowBytes / kRawParts;  // 176: a TMA box row, a multiple of 16 bytes
constexpr int kRawBlockBytes = kBlockN * kRawRowBytes;

// Shared memory, in bytes from a 1024-aligned base. BF16 cache: Q, two KV stages (TMA), P. FP8 cache: Q, one BF16 KV
// tile (the latent dequantised into it, the RoPE columns loaded into it by TMA), two raw FP8 stages (TMA), P.
template <bool kFp8>
struct Layout {
  static constexpr int kKvStages = kFp8 ? 1 : 2;
  static constexpr int kRawStages = kFp8 ? 2 : 0;
  static constexpr int kQ = 0;
  static constexpr int kKv = kQ + kMatrixBytes;
  static constexpr int kRaw = kKv + kKvStages * kMatrixBytes;
  static constexpr int kP = kRaw + kRawStages * kRawBlockBytes;
  static constexpr int kRowMax = kP + kTileBytes;            // float [2][64]
  static constexpr int kRowSum = kRowMax + 2 * kRowsPerCta * 4;  // float [2][64]
  static constexpr int kBarriers = kRowSum + 2 * kRowsPerCta * 4;  // uint64_t: KV (or raw) stages, then RoPE
  static constexpr int kBytes = kBarriers + 3 * 8 + 1024;    // + slack to align the base to 1024
  static_assert(kBytes <= 227 * 1024, "shared memory");
  static_assert(kRaw % 1024 == 0 && kP % 1024 == 0, "swizzled tiles need 1024-byte alignment");
};

struct DecodeParams {
  // BF16 cache: (576 columns, 64 rows, num_blocks); FP8 cache: its RoPE columns, (64, 64, num_blocks). 64 x 64
  // boxes, 128-byte swizzle.
  CUtensorMap kv_map;
  // FP8 cache: bytes 0..527 of each row (e4m3 latent and scales) as (528, 64, num_blocks) uint8, in three 176-byte
  // boxes: a raw stage holds three (64 rows x 176 bytes) parts.
  CUtensorMap raw_map;
  const __nv_bfloat16* q;
  int64_t q_batch_stride, q_seq_stride, q_head_stride;
  const uint8_t* kv;
  int64_t kv_block_bytes, kv_row_bytes;
  const int* block_table;
  int64_t block_table_stride;
  const int* cache_seqlens;
  __nv_bfloat16* out;
  int64_t out_batch_stride, out_seq_stride, out_head_stride;
  float* lse;          // (batch, h_q, s_q)
  float* out_partial;  // (batch * num_splits, rows, 512) when num_splits > 1
  float* lse_partial;  // (batch * num_splits, rows), base 2
  int h_q, s_q, rows, num_splits;
  float scale_log2;
  bool causal;
};

// Loads 64 rows of 576 bf16 into a swizzled matrix; `row_source(r)` gives row r's address or nullptr (zero fill).
template <typename RowSource>
__device__ __forceinline__ void load_rows_async(uint32_t dst, RowSource row_source, const void* any_valid_address) {
#pragma unroll 2
  for (int i = threadIdx.x; i < kRowsPerCta * kChunksPerRow; i += kThreads) {
    const int row = i / kChunksPerRow, chunk = i % kChunksPerRow;
    const __nv_bfloat16* src = row_source(row);
    cp_async_16(dst + (chunk / 8) * kTileBytes + swizzled_offset(row, chunk % 8),
                src != nullptr ? static_cast<const void*>(src + chunk * 8) : any_valid_address, src != nullptr);
  }
}

// One thread: `boxes` boxes of `map` for cache block `block` of sequence `batch`, box i from column i * column_step
// into dst + i * dst_step, all completing on `barrier`. The BF16 cache's nine 64-column tiles, the FP8 cache's three
// 176-byte raw parts, or its one RoPE tile.
__device__ __forceinline__ void load_block_boxes(const DecodeParams& p, const CUtensorMap* map, uint32_t dst,
                                                 uint32_t barrier, int batch, int block, int boxes, int column_step,
                                                 int dst_step) {
  const int page = p.block_table[batch * p.block_table_stride + block];
  mbarrier_arrive_expect_bytes(barrier, boxes * dst_step);
  for (int box = 0; box < boxes; ++box) {
    tma_load_3d(dst + box * dst_step, map, barrier, box * column_step, 0, page);
  }
}

__device__ __forceinline__ void load_kv_block(const DecodeParams& p, uint32_t dst, uint32_t barrier, int batch,
                                              int block) {
  load_block_boxes(p, &p.kv_map, dst, barrier, batch, block, kColumnTiles, 64, kTileBytes);
}

__device__ __forceinline__ void load_raw_block(const DecodeParams& p, uint32_t dst, uint32_t barrier, int batch,
                                               int block) {
  load_block_boxes(p, &p.raw_map, dst, barrier, batch, block, kRawParts, kRawPartBytes, kBlockN * kRawPartBytes);
}

__device__ __forceinline__ void load_rope_block(const DecodeParams& p, uint32_t dst, uint32_t barrier, int batch,
                                                int block) {
  load_block_boxes(p, &p.kv_map, dst + (kColumnTiles - 1) * kTileBytes, barrier, batch, block, 1, 0, kTileBytes);
}

// All threads, FP8 cache: latent = e4m3 * tile scale (exact in bf16: the scales are powers of two) from a raw stage
// into the KV tile's first 512 columns; rows past the sequence's end become zeros.
__device__ __forceinline__ void dequantize_block(const uint8_t* raw, uint8_t* kv_tile, int valid_rows) {
  constexpr int kUnitsPerRow = kLatentDim / 16;  // 16 e4m3 values -> two 16-byte bf16 chunks
#pragma unroll 4
  for (int unit = threadIdx.x; unit < kBlockN * kUnitsPerRow; unit += kThreads) {
    const int row = unit / kUnitsPerRow, column16 = unit % kUnitsPerRow;
    uint4 halves[2] = {make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0)};
    if (row < valid_rows) {
      const auto raw_byte = [&](int offset) {  // byte `offset` of the row, in its part
        return raw + (offset / kRawPartBytes) * kBlockN * kRawPartBytes + row * kRawPartBytes + offset % kRawPartBytes;
      };
      const uint4 packed = *reinterpret_cast<const uint4*>(raw_byte(column16 * 16));
      const float scale = *reinterpret_cast<const float*>(raw_byte(kLatentDim + (column16 * 16 / kFp8Tile) * 4));
      const uint32_t words[4] = {packed.x, packed.y, packed.z, packed.w};
      uint32_t* out_words = reinterpret_cast<uint32_t*>(halves);
#pragma unroll
      for (int w = 0; w < 4; ++w) {
#pragma unroll
        for (int pair = 0; pair < 2; ++pair) {
          const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(
              static_cast<__nv_fp8x2_storage_t>(words[w] >> (16 * pair)), __NV_E4M3);
          const float2 values = __half22float2(__half2(h));
          const __nv_bfloat162 scaled = __floats2bfloat162_rn(values.x * scale, values.y * scale);
          out_words[2 * w + pair] = *reinterpret_cast<const uint32_t*>(&scaled);
        }
      }
    }
    const int column = column16 * 16, tile = column / 64, chunk = (column % 64) / 8;
    *reinterpret_cast<uint4*>(kv_tile + tile * kTileBytes + swizzled_offset(row, chunk)) = halves[0];
    *reinterpret_cast<uint4*>(kv_tile + tile * kTileBytes + swizzled_offset(row, chunk + 1)) = halves[1];
  }
}

// S_w = Q K[w * 32 : w * 32 + 32]^T, issued and committed (not waited for).
__device__ __forceinline__ void issue_scores(float (&scores)[kTokensPerWarpgroup / 2], uint32_t q_tile,
                                             uint32_t kv_tile, int warpgroup) {
  wgmma_fence();
#pragma unroll
  for (int k = 0; k < kHeadDimQK / 16; ++k) {
    const uint32_t column = (k / 4) * kTileBytes + (k % 4) * 32;
    wgmma_m64n32k16_ss(scores, smem_descriptor(q_tile + column, 16, 1024),
                       smem_descriptor(kv_tile + column + warpgroup * kTokensPerWarpgroup * 128, 16, 1024), k > 0);
  }
  wgmma_commit();
}

// O_w += P V[:, w * 256 : w * 256 + 256], issued and committed (not waited for).
__device__ __forceinline__ void issue_values(float (&out_acc)[kValueColsPerWarpgroup / 2], uint32_t p_tile,
                                             uint32_t kv_tile, int warpgroup) {
  wgmma_fence();
  fence_registers(out_acc);
#pragma unroll
  for (int k = 0; k < kBlockN / 16; ++k) {
    wgmma_m64n256k16_ss_tb(out_acc, smem_descriptor(p_tile + k * 32, 16, 1024),
                           smem_descriptor(kv_tile + warpgroup * 4 * kTileBytes + k * 16 * 128, kTileBytes, 1024), 1);
  }
  wgmma_commit();
}

template <bool kFp8>
__global__ void __launch_bounds__(kThreads, 1) dense_decode_kernel(const __grid_constant__ DecodeParams p) {
  using L = Layout<kFp8>;
  extern __shared__ uint8_t raw_shared[];
  uint8_t* shared = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(raw_shared) + 1023) & ~uintptr_t(1023));
  const uint32_t q_tile = smem_address(shared + L::kQ);
  const uint32_t p_tile = smem_address(shared + L::kP);
  float* row_max_shared = reinterpret_cast<float*>(shared + L::kRowMax);
  float* row_sum_shared = reinterpret_cast<float*>(shared + L::kRowSum);
  const auto kv_tile = [&](int stage) { return smem_address(shared + L::kKv + stage * kMatrixBytes); };
  const auto raw_stage = [&](int stage) { return shared + L::kRaw + stage * kRawBlockBytes; };
  // BF16: one barrier per KV stage; FP8: one per raw stage, then the RoPE barrier.
  const auto barrier = [&](int index) { return smem_address(shared + L::kBarriers + index * 8); };
  const uint32_t rope_barrier = barrier(2);

  const int row_block = blockIdx.x, split = blockIdx.y, batch = blockIdx.z;
  const int warpgroup = threadIdx.x / 128, warp = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32;
  const int length = p.cache_seqlens[batch];
  const int num_blocks = (length + kBlockN - 1) / kBlockN;
  const int blocks_per_split = (num_blocks + p.num_splits - 1) / p.num_splits;
  const int begin = split * blocks_per_split;
  const int end = min(begin + blocks_per_split, num_blocks);

  // This thread's two accumulator rows (wgmma D fragment: rows warp * 16 + lane / 4 and + 8).
  int row_of[2], visible[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    row_of[j] = warp * 16 + lane / 4 + 8 * j;
    const int row = row_block * kRowsPerCta + row_of[j];
    const int query = row / p.h_q;
    visible[j] = row >= p.rows ? 0 : (p.causal ? length - p.s_q + query + 1 : length);
  }

  if (threadIdx.x == 0) {
    for (int index = 0; index < 3; ++index) mbarrier_init(barrier(index), 1);
    fence_barrier_init();
  }
  __syncthreads();
  if (begin < end) {
    load_rows_async(
        q_tile,
        [&](int r) -> const __nv_bfloat16* {
          const int row = row_block * kRowsPerCta + r;
          if (row >= p.rows) return nullptr;
          return p.q + batch * p.q_batch_stride + (row / p.h_q) * p.q_seq_stride + (row % p.h_q) * p.q_head_stride;
        },
        p.q);
    cp_async_commit();
    if (threadIdx.x == 0) {
      for (int stage = 0; stage < 2 && begin + stage < end; ++stage) {
        if constexpr (kFp8) {
          load_raw_block(p, smem_address(raw_stage(stage)), barrier(stage), batch, begin + stage);
        } else {
          load_kv_block(p, kv_tile(stage), barrier(stage), batch, begin + stage);
        }
      }
      if constexpr (kFp8) load_rope_block(p, kv_tile(0), rope_barrier, batch, begin);
    }
  }
  cp_async_wait<0>();
  fence_async_shared();
  __syncthreads();

  float out_acc[kValueColsPerWarpgroup / 2];
#pragma unroll
  for (int i = 0; i < kValueColsPerWarpgroup / 2; ++i) out_acc[i] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  float scores[kTokensPerWarpgroup / 2];

  // Scale and mask S of `block`, update the running max and sum, write P (bf16) and rescale O; ends with P (and, for
  // the BF16 cache, the zeroed tail of the last block) visible to both warpgroups' wgmma.
  const auto softmax = [&](int block, int stage) {
    const int first_token = block * kBlockN + warpgroup * kTokensPerWarpgroup;
    float block_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int i = 0; i < kTokensPerWarpgroup / 8; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int token = first_token + 8 * i + 2 * (lane % 4) + c;
          float& s = scores[4 * i + 2 * j + c];
          s = token < visible[j] ? s * p.scale_log2 : -INFINITY;
          block_max[j] = fmaxf(block_max[j], s);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      block_max[j] = fmaxf(block_max[j], __shfl_xor_sync(0xffffffffu, block_max[j], 1));
      block_max[j] = fmaxf(block_max[j], __shfl_xor_sync(0xffffffffu, block_max[j], 2));
      if (lane % 4 == 0) row_max_shared[warpgroup * kRowsPerCta + row_of[j]] = block_max[j];
    }
    named_barrier_sync(1, kThreads);

    float rescale[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const float new_max =
          fmaxf(row_max[j], fmaxf(row_max_shared[row_of[j]], row_max_shared[kRowsPerCta + row_of[j]]));
      const float shift = new_max == -INFINITY ? 0.f : new_max;
      rescale[j] = exp2f(row_max[j] - shift);
      row_max[j] = new_max;
      row_sum[j] *= rescale[j];
#pragma unroll
      for (int i = 0; i < kTokensPerWarpgroup / 8; ++i) {
        const float p0 = exp2f(scores[4 * i + 2 * j] - shift), p1 = exp2f(scores[4 * i + 2 * j + 1] - shift);
        row_sum[j] += p0 + p1;
        const int chunk = warpgroup * (kTokensPerWarpgroup / 8) + i;
        *reinterpret_cast<__nv_bfloat162*>(shared + L::kP + swizzled_offset(row_of[j], chunk) + 4 * (lane % 4)) =
            __floats2bfloat162_rn(p0, p1);
      }
    }
#pragma unroll
    for (int i = 0; i < kValueColsPerWarpgroup / 8; ++i) {
      out_acc[4 * i + 0] *= rescale[0];
      out_acc[4 * i + 1] *= rescale[0];
      out_acc[4 * i + 2] *= rescale[1];
      out_acc[4 * i + 3] *= rescale[1];
    }
    const int valid_rows = length - block * kBlockN;
    if (!kFp8 && valid_rows < kBlockN) {  // the last block: zero the value rows past the end (P is 0 there; 0 * NaN
                                          // is not). The FP8 path's dequantisation writes those zeros itself.
      uint8_t* stage_tiles = shared + L::kKv + stage * kMatrixBytes;
      const int chunks = (kBlockN - valid_rows) * (kLatentDim / 8);
      for (int i = threadIdx.x; i < chunks; i += kThreads) {
        const int row = valid_rows + i / (kLatentDim / 8), chunk = i % (kLatentDim / 8);
        *reinterpret_cast<uint4*>(stage_tiles + (chunk / 8) * kTileBytes + swizzled_offset(row, chunk % 8)) =
            make_uint4(0, 0, 0, 0);
      }
    }
    fence_async_shared();
    named_barrier_sync(1, kThreads);
  };

  if constexpr (kFp8) {
    // One BF16 KV tile: per block, dequantise, Q K^T, softmax, P V in turn, while the raw FP8 rows of the next two
    // blocks load, and the next block's RoPE columns load as soon as Q K^T has read this block's.
    for (int block = begin; block < end; ++block) {
      const int index = block - begin, stage = index % 2;
      mbarrier_wait(barrier(stage), (index / 2) & 1);
      dequantize_block(raw_stage(stage), shared + L::kKv, length - block * kBlockN);
      fence_async_shared();
      named_barrier_sync(1, kThreads);  // the raw stage is consumed, the latent is in the KV tile
      if (threadIdx.x == 0 && block + 2 < end) {
        load_raw_block(p, smem_address(raw_stage(stage)), barrier(stage), batch, block + 2);
      }
      mbarrier_wait(rope_barrier, index & 1);
      issue_scores(scores, q_tile, kv_tile(0), warpgroup);
      wgmma_wait<0>();
      fence_registers(scores);
      softmax(block, 0);  // its barriers also mean both warpgroups are done reading the RoPE columns
      if (threadIdx.x == 0 && block + 1 < end) load_rope_block(p, kv_tile(0), rope_barrier, batch, block + 1);
      issue_values(out_acc, p_tile, kv_tile(0), warpgroup);
      wgmma_wait<0>();
      fence_registers(out_acc);
      named_barrier_sync(1, kThreads);  // the KV tile's latent and P are free
    }
  } else {
    if (begin < end) {
      mbarrier_wait(barrier(0), 0);
      issue_scores(scores, q_tile, kv_tile(0), warpgroup);
      wgmma_wait<0>();
      fence_registers(scores);
      softmax(begin, 0);
    }
    for (int block = begin; block < end; ++block) {
      const int stage = (block - begin) % 2;
      issue_values(out_acc, p_tile, kv_tile(stage), warpgroup);
      const bool has_next = block + 1 < end;
      if (has_next) {
        const int next = block + 1 - begin;
        mbarrier_wait(barrier(next % 2), (next / 2) & 1);
        issue_scores(scores, q_tile, kv_tile(next % 2), warpgroup);
        wgmma_wait<1>();  // P V of this block is done; Q K^T of the next may still run
      } else {
        wgmma_wait<0>();
      }
      fence_registers(out_acc);
      named_barrier_sync(1, kThreads);  // both warpgroups are done with this stage and with P
      if (threadIdx.x == 0 && block + 2 < end) {
        load_kv_block(p, kv_tile(stage), barrier(stage), batch, block + 2);
      }
      if (has_next) {
        wgmma_wait<0>();
        fence_registers(scores);
        softmax(block + 1, (block + 1 - begin) % 2);
      }
    }
  }

#pragma unroll
  for (int j = 0; j < 2; ++j) {
    row_sum[j] += __shfl_xor_sync(0xffffffffu, row_sum[j], 1);
    row_sum[j] += __shfl_xor_sync(0xffffffffu, row_sum[j], 2);
    if (lane % 4 == 0) row_sum_shared[warpgroup * kRowsPerCta + row_of[j]] = row_sum[j];
  }
  named_barrier_sync(1, kThreads);

  const bool direct = p.num_splits == 1;
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int row = row_block * kRowsPerCta + row_of[j];
    if (row >= p.rows) continue;
    const float total = row_sum_shared[row_of[j]] + row_sum_shared[kRowsPerCta + row_of[j]];
    const float inverse = total > 0.f ? 1.f / total : 0.f;
    const int query = row / p.h_q, head = row % p.h_q;
    const int value_col = warpgroup * kValueColsPerWarpgroup + 2 * (lane % 4);
    if (direct) {
      __nv_bfloat16* out_row =
          p.out + batch * p.out_batch_stride + query * p.out_seq_stride + head * p.out_head_stride + value_col;
#pragma unroll
      for (int i = 0; i < kValueColsPerWarpgroup / 8; ++i) {
        *reinterpret_cast<__nv_bfloat162*>(out_row + 8 * i) =
            __floats2bfloat162_rn(out_acc[4 * i + 2 * j] * inverse, out_acc[4 * i + 2 * j + 1] * inverse);
      }
      if (warpgroup == 0 && lane % 4 == 0) {
        p.lse[(static_cast<int64_t>(batch) * p.h_q + head) * p.s_q + query] =
            total > 0.f ? (row_max[j] + log2f(total)) * kLn2 : INFINITY;
      }
    } else {
      const int64_t partial_row = (static_cast<int64_t>(batch) * p.num_splits + split) * p.rows + row;
      float* out_row = p.out_partial + partial_row * kLatentDim + value_col;
#pragma unroll
      for (int i = 0; i < kValueColsPerWarpgroup / 8; ++i) {
        *reinterpret_cast<float2*>(out_row + 8 * i) =
            make_float2(out_acc[4 * i + 2 * j] * inverse, out_acc[4 * i + 2 * j + 1] * inverse);
      }
      if (warpgroup == 0 && lane % 4 == 0) {
        p.lse_partial[partial_row] = total > 0.f ? row_max[j] + log2f(total) : -INFINITY;
      }
    }
  }
}

// One query row per CTA: out = sum_s 2^(lse_s - lse) out_s, lse = log2 sum_s 2^lse_s (natural log on output).
// A split that saw no token (lse_s = -inf) is skipped without reading its (unwritten) output.
__global__ void __launch_bounds__(128) combine_kernel(const float* __restrict__ out_partial,
                                                      const float* __restrict__ lse_partial, __nv_bfloat16* out,
                                                      int64_t out_batch_stride, int64_t out_seq_stride,
                                                      int64_t out_head_stride, float* lse, int h_q, int s_q, int rows,
                                                      int num_splits) {
  __shared__ float weights[kMaxSplits];
  __shared__ float total_shared, max_shared;
  const int row = blockIdx.x, batch = blockIdx.y;
  const int64_t first = static_cast<int64_t>(batch) * num_splits;
  for (int s = threadIdx.x; s < num_splits; s += blockDim.x) weights[s] = lse_partial[(first + s) * rows + row];
  __syncthreads();
  if (threadIdx.x < 32) {
    float max_lse = -INFINITY;
    for (int s = threadIdx.x; s < num_splits; s += 32) max_lse = fmaxf(max_lse, weights[s]);
    for (int offset = 16; offset > 0; offset /= 2) max_lse = fmaxf(max_lse, __shfl_xor_sync(0xffffffffu, max_lse, offset));
    float total = 0.f;
    for (int s = threadIdx.x; s < num_splits; s += 32) total += max_lse == -INFINITY ? 0.f : exp2f(weights[s] - max_lse);
    for (int offset = 16; offset > 0; offset /= 2) total += __shfl_xor_sync(0xffffffffu, total, offset);
    if (threadIdx.x == 0) {
      total_shared = total;
      max_shared = max_lse;
    }
  }
  __syncthreads();
  const float total = total_shared, max_lse = max_shared;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int s = 0; s < num_splits; ++s) {
    const float lse_s = weights[s];
    if (lse_s == -INFINITY) continue;
    const float w = exp2f(lse_s - max_lse) / total;
    const float4 part = reinterpret_cast<const float4*>(out_partial + ((first + s) * rows + row) * kLatentDim)[threadIdx.x];
    acc.x += w * part.x;
    acc.y += w * part.y;
    acc.z += w * part.z;
    acc.w += w * part.w;
  }
  const int query = row / h_q, head = row % h_q;
  __nv_bfloat16* out_row = out + batch * out_batch_stride + query * out_seq_stride + head * out_head_stride;
  reinterpret_cast<__nv_bfloat162*>(out_row)[2 * threadIdx.x] = __floats2bfloat162_rn(acc.x, acc.y);
  reinterpret_cast<__nv_bfloat162*>(out_row)[2 * threadIdx.x + 1] = __floats2bfloat162_rn(acc.z, acc.w);
  if (threadIdx.x == 0) {
    lse[(static_cast<int64_t>(batch) * h_q + head) * s_q + query] =
        total > 0.f ? (max_lse + log2f(total)) * kLn2 : INFINITY;
  }
}

// A 3-d view of the paged cache, (columns, 64 rows, num_blocks) from byte `offset` of each row with the cache's own
// row and block strides, read in (box_columns x 64) boxes. 128-byte swizzle lands bf16 boxes of 64 columns in the
// wgmma layout; without swizzle a box lands as dense rows.
CUtensorMap cache_tensor_map(const torch::Tensor& kv_cache, int64_t offset, int64_t columns, int box_columns,
                             CUtensorMapDataType type, CUtensorMapSwizzle swizzle) {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* function = nullptr;
    cudaDriverEntryPointQueryResult status;
    C10_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &function, 12000, cudaEnableDefault,
                                                    &status));
    TORCH_CHECK(status == cudaDriverEntryPointSuccess && function != nullptr,
                "dense_decode: the CUDA driver has no cuTensorMapEncodeTiled");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(function);
  }();
  const int64_t element = kv_cache.element_size();
  CUtensorMap map;
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(columns), kBlockN,
                              static_cast<cuuint64_t>(std::max<int64_t>(kv_cache.size(0), 1))};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(kv_cache.stride(1) * element),
                                 static_cast<cuuint64_t>(kv_cache.stride(0) * element)};
  const cuuint32_t box[3] = {static_cast<cuuint32_t>(box_columns), kBlockN, 1};
  const cuuint32_t element_strides[3] = {1, 1, 1};
  const CUresult result = encode(&map, type, 3, static_cast<uint8_t*>(kv_cache.data_ptr()) + offset, dims, strides,
                                 box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
                                 CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(result == CUDA_SUCCESS, "dense_decode: cuTensorMapEncodeTiled failed with ", static_cast<int>(result));
  return map;
}

template <bool kFp8>
void launch_decode(const DecodeParams& params, dim3 grid, cudaStream_t stream) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(dense_decode_kernel<kFp8>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      Layout<kFp8>::kBytes));
  dense_decode_kernel<kFp8><<<grid, kThreads, Layout<kFp8>::kBytes, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::vector<torch::Tensor> dense_decode(const torch::Tensor& q, const torch::Tensor& kv_cache,
                                        const torch::Tensor& block_table, const torch::Tensor& cache_seqlens,
                                        double softmax_scale, bool causal, bool is_fp8, int64_t num_splits) {
  TORCH_CHECK(q.is_cuda() && q.scalar_type() == at::kBFloat16 && q.dim() == 4 && q.size(3) == kHeadDimQK &&
                  q.stride(3) == 1,
              "dense_decode: q must be CUDA bfloat16 (batch, s_q, h_q, 576) with a contiguous last dimension");
  const int64_t element = kv_cache.element_size();
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.size(1) == kBlockN && kv_cache.stride(3) == 1 &&
                  (kv_cache.stride(0) * element) % 16 == 0 && (kv_cache.stride(1) * element) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(kv_cache.data_ptr()) % 16 == 0,
              "dense_decode: kv_cache must be (num_blocks, 64, 1, row) with 16-byte aligned rows");
  TORCH_CHECK(is_fp8 ? (element == 1 && kv_cache.size(3) == kFp8RowBytes)
                     : (kv_cache.scalar_type() == at::kBFloat16 && kv_cache.size(3) == kHeadDimQK),
              "dense_decode: kv_cache must be bfloat16 (..., 576) or, with is_fp8, 1-byte (..., 656)");
  TORCH_CHECK(q.stride(0) % 8 == 0 && q.stride(1) % 8 == 0 && q.stride(2) % 8 == 0 &&
                  reinterpret_cast<uintptr_t>(q.data_ptr()) % 16 == 0,
              "dense_decode: q rows must be 16-byte aligned");
  TORCH_CHECK(block_table.scalar_type() == at::kInt && block_table.stride(1) == 1 &&
                  cache_seqlens.scalar_type() == at::kInt && cache_seqlens.is_contiguous(),
              "dense_decode: block_table and cache_seqlens must be int32 with contiguous rows");
  const int64_t batch = q.size(0), s_q = q.size(1), h_q = q.size(2), rows = s_q * h_q;
  TORCH_CHECK(num_splits >= 1 && num_splits <= kMaxSplits, "dense_decode: num_splits must be in [1, ", kMaxSplits,
              "], got ", num_splits);
  const int64_t row_blocks = (rows + kRowsPerCta - 1) / kRowsPerCta;
  TORCH_CHECK(batch <= 65535 && row_blocks <= 65535, "dense_decode: batch and s_q * h_q / 64 must be <= 65535");
  const c10::cuda::CUDAGuard guard(q.device());
  auto out = torch::empty({batch, s_q, h_q, kLatentDim}, q.options());
  auto lse = torch::empty({batch, h_q, s_q}, q.options().dtype(at::kFloat));
  if (batch == 0 || rows == 0) return {out, lse};
  torch::Tensor out_partial, lse_partial;
  if (num_splits > 1) {
    out_partial = torch::empty({batch * num_splits, rows, kLatentDim}, q.options().dtype(at::kFloat));
    lse_partial = torch::empty({batch * num_splits, rows}, q.options().dtype(at::kFloat));
  }
  DecodeParams params{};
  if (is_fp8) {
    params.kv_map = cache_tensor_map(kv_cache, kRopeOffset, kRopeDim, 64, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
                                     CU_TENSOR_MAP_SWIZZLE_128B);
    params.raw_map = cache_tensor_map(kv_cache, 0, kRawRowBytes, kRawPartBytes, CU_TENSOR_MAP_DATA_TYPE_UINT8,
                                      CU_TENSOR_MAP_SWIZZLE_NONE);
  } else {
    params.kv_map = cache_tensor_map(kv_cache, 0, kHeadDimQK, 64, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
                                     CU_TENSOR_MAP_SWIZZLE_128B);
  }
  params.q = reinterpret_cast<const __nv_bfloat16*>(q.data_ptr());
  params.q_batch_stride = q.stride(0);
  params.q_seq_stride = q.stride(1);
  params.q_head_stride = q.stride(2);
  params.kv = static_cast<const uint8_t*>(kv_cache.data_ptr());
  params.kv_block_bytes = kv_cache.stride(0) * element;
  params.kv_row_bytes = kv_cache.stride(1) * element;
  params.block_table = block_table.data_ptr<int>();
  params.block_table_stride = block_table.stride(0);
  params.cache_seqlens = cache_seqlens.data_ptr<int>();
  params.out = reinterpret_cast<__nv_bfloat16*>(out.data_ptr());
  params.out_batch_stride = out.stride(0);
  params.out_seq_stride = out.stride(1);
  params.out_head_stride = out.stride(2);
  params.lse = lse.data_ptr<float>();
  params.out_partial = num_splits > 1 ? out_partial.data_ptr<float>() : nullptr;
  params.lse_partial = num_splits > 1 ? lse_partial.data_ptr<float>() : nullptr;
  params.h_q = static_cast<int>(h_q);
  params.s_q = static_cast<int>(s_q);
  params.rows = static_cast<int>(rows);
  params.num_splits = static_cast<int>(num_splits);
  params.scale_log2 = static_cast<float>(softmax_scale * M_LOG2E);
  params.causal = causal;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(row_blocks, num_splits, batch);
  is_fp8 ? launch_decode<true>(params, grid, stream) : launch_decode<false>(params, grid, stream);
  if (num_splits > 1) {
    combine_kernel<<<dim3(rows, batch), 128, 0, stream>>>(
        out_partial.data_ptr<float>(), lse_partial.data_ptr<float>(), params.out, out.stride(0), out.stride(1),
        out.stride(2), params.lse, params.h_q, params.s_q, params.rows, params.num_splits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {out, lse};
}

}  // namespace flashmla
