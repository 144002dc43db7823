// Dense paged MLA decode over the BF16 or FP8 latent cache on Hopper (sm_90a), and the combine of split partials.
// Dense decode of up to 16 query rows runs dense_decode_narrow.cu instead (run_decode's `narrow`); this kernel takes
// more rows, and sparse decode and sparse prefill.
//
// One CTA = 64 query rows (flattened (s_q, h_q) pairs of one sequence; all heads share the one latent KV head) x one
// split of the sequence's 64-token cache blocks (sparse: of the query's gathered blocks of 64 indexed rows). Dense
// decode over a BF16 cache and all sparse attention (BF16 and FP8) take the blocks in pairs, one warpgroup scoring
// each (attend_pairs, below). Dense decode over the FP8 cache shares each block between the two warpgroups
// (attend_piece):
//   S_w = Q K[w * 32 : w * 32 + 32]^T          (wgmma m64n32, K = 576: warpgroup w scores half the block's tokens)
//   m   = max(m, rowmax(S_0), rowmax(S_1))     (row maxima exchanged through shared memory)
//   P   = exp2(S - m) -> shared memory (bf16)  (the whole 64 x 64 probability tile)
//   O_w = O_w * exp2(m_old - m) + P V[:, w * 256 : w * 256 + 256]   (wgmma m64n256: warpgroup w owns half of d_v)
// Q (attend_pairs: one TMA where the CTA's rows form a box of q, stop 35: 2-11% faster than cp.async on its rows;
// else cp.async), two KV stages (TMA through a tensor map over the paged cache, one mbarrier per stage here and three
// in attend_pairs; for the FP8 cache only the RoPE columns come by TMA, and the latent is dequantised from registers
// that each thread loads one block ahead; sparse: cp.async gathers by the stage's own warpgroup, the FP8 latent
// gathered raw and widened in place) and P live in 128-byte-swizzled shared tiles (sm90.cuh). The loop keeps the
// tensor cores fed:
// Q K^T of block i + 1 and P V of block i are issued back to back, block i + 1's softmax scores are computed while P V
// runs, and the load of block i + 2 starts once block i's stage is free. Rows of the last block past the sequence's
// end are zeroed in shared memory before P V, so whatever the cache holds there never reaches the output.
// With several splits per sequence each CTA writes its normalised output (f16, scaled per row) and base-2 LSE, and
// `combine_kernel` merges them.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda.h>
#include <torch/extension.h>

#include <cmath>
#include <type_traits>

#include "decode_common.cuh"
#include "tensor_map.h"

namespace flashmla {
namespace {

using namespace sm90;
using namespace decode;

constexpr int kRowsPerCta = 64;               // query rows per CTA: one wgmma M
// An experiment, off unless built with FLASHMLA_EXTRA_CUDA_FLAGS=-DFLASHMLA_DENSE_FP8_PAIRS (stop 68, not yet run on a
// GPU): dense decode over the FP8 cache in attend_pairs, each warpgroup gathering and widening its own block as the
// sparse FP8 decode does (the sequence's rows as if listed by indices), instead of attend_piece, where both warpgroups
// widen each block between the products (the FP8 cache at 64-128 rows took up to 1.74x the BF16 time, stop 67).
#ifdef FLASHMLA_DENSE_FP8_PAIRS
constexpr bool kDenseFp8Pairs = true;
#else
constexpr bool kDenseFp8Pairs = false;
#endif
constexpr int kThreads = 256;                 // two warpgroups
constexpr int kTokensPerWarpgroup = kBlockN / 2;
constexpr int kValueColsPerWarpgroup = kLatentDim / 2;

// Shared memory, in bytes from a 1024-aligned base: Q, two KV stages, P (attend_pairs: the sparse FP8 stages' tile
// scales), the row max / sum exchange, the stages' mbarriers. BF16 cache: a stage is filled by TMA. Dense FP8 cache:
// its RoPE columns by TMA, its latent dequantised from registers (each thread's share of the block, loaded from the
// cache one block ahead).
constexpr int kParts = 3;  // attend_pairs fills a stage in three parts (thirds, or kEarly's halves and RoPE tile)
struct Layout {
  static constexpr int kQ = 0;
  static constexpr int kKv = kQ + kMatrixBytes;
  static constexpr int kP = kKv + 2 * kMatrixBytes;
  static constexpr int kRowMax = kP + kTileBytes;                  // float [2][64]
  static constexpr int kRowSum = kRowMax + 2 * kRowsPerCta * 4;    // float [2][64]
  static constexpr int kRowAmax = kRowSum + 2 * kRowsPerCta * 4;   // float [2][64]: store_output's partial rows
  static constexpr int kBarriers = kRowAmax + 2 * kRowsPerCta * 4;  // uint64_t [2 stages][kParts]
  static constexpr int kQBarrier = kBarriers + 2 * kParts * 8;     // uint64_t: attend_pairs' Q by TMA
  static constexpr int kTokenMasks = kQBarrier + 8;                // uint32_t [2 stages][2]: sparse, valid tokens
  static constexpr int kBytes = kTokenMasks + 2 * 8 + 1024;        // + slack to align the base to 1024
  static_assert(kBytes <= 227 * 1024, "shared memory");
};

// attend_piece's rows of the FP8 latent: thread t dequantises quarter t % 4 of row gather_row(t) (256 threads, a row
// each). A warp covers 8 rows, paired (r, r + 4) in each 8-lane phase so that their chunks of one swizzled 128-byte
// row land in different banks.
__device__ __forceinline__ int gather_row() {
  const int lane = threadIdx.x % 32;
  return 8 * (threadIdx.x / 32) + 4 * ((lane / 4) % 2) + lane / 8;
}

// The cache slot of row `row` of `block` (sparse: of query (batch, query)'s indices; dense: of sequence batch's
// pages), -1 past the length (not read).
template <bool kSparse>
__device__ __forceinline__ int load_row_slot(const DecodeParams& p, int batch, int query, int block, int length,
                                             int row) {
  const int position = block * kBlockN + row;
  if (position >= length) return -1;
  if constexpr (kSparse) {
    return __ldg(p.indices + batch * p.indices_batch_stride + query * p.indices_seq_stride + position);
  } else {
    return block_page(p, batch, block) * kBlockN + row;
  }
}

// Where this thread's row of KV block `block` lives (dense: its gather_row; sparse: cache slot `slot`), or nullptr
// (past the end; sparse: `slot` -1 or outside the cache).
template <bool kSparse>
__device__ __forceinline__ const uint8_t* gather_row_address(const DecodeParams& p, int batch, int block, int length,
                                                             int slot) {
  if constexpr (kSparse) {
    if (slot < 0 || slot >= p.kv_slots) return nullptr;
    return p.kv + (slot / kBlockN) * p.kv_block_bytes + (slot % kBlockN) * p.kv_row_bytes;
  } else {
    return cache_row_address(p, batch, block, gather_row(), length);
  }
}

// Loads 64 bf16 rows of 576 columns into a swizzled matrix (the Q tile); `row_source(r)` gives the address of row r
// or nullptr (zero fill).
template <typename RowSource>
__device__ __forceinline__ void load_rows_async(uint32_t dst, RowSource row_source, const void* any_valid_address) {
  static_assert(kRowsPerCta * kChunksPerRow % kThreads == 0, "the same number of copies in every thread");
#pragma unroll 2
  for (int k = 0; k < kRowsPerCta * kChunksPerRow / kThreads; ++k) {
    const int i = threadIdx.x + k * kThreads, row = i / kChunksPerRow, chunk = i % kChunksPerRow;
    const __nv_bfloat16* src = row_source(row);
    cp_async_16(dst + (chunk / 8) * kTileBytes + swizzled_offset(row, chunk % 8),
                src != nullptr ? static_cast<const void*>(src + chunk * 8) : any_valid_address, src != nullptr);
  }
}

// cp.async of the CTA's 64 query rows (flattened (query, head) rows from row_block * 64 on; zeros past p.rows) into
// the Q tile, committed.
__device__ __forceinline__ void load_q_async(const DecodeParams& p, uint32_t q_tile, int row_block, int batch,
                                             int first_query) {
  load_rows_async(
      q_tile,
      [&](int r) -> const __nv_bfloat16* {
        const int row = row_block * kRowsPerCta + r;
        if (row >= p.rows) return nullptr;
        return p.q + batch * p.q_batch_stride + (first_query + row / p.h_q) * p.q_seq_stride +
               (row % p.h_q) * p.q_head_stride;
      },
      p.q);
  cp_async_commit();
}

// The CTA's 64 query rows into the Q tile by one TMA of all nine tiles (p.q_by_tma; thread 0), completing on
// `barrier`: rows past the end (heads or queries beyond q's) come as zeros.
__device__ __forceinline__ void load_q_tma(const DecodeParams& p, uint32_t q_tile, uint32_t barrier, int row_block,
                                           int batch, int first_query) {
  const int row = row_block * kRowsPerCta;
  mbarrier_arrive_expect_bytes(barrier, kMatrixBytes);
  tma_load_5d(q_tile, &p.q_map, barrier, 0, row % p.h_q, first_query + row / p.h_q, 0, batch);
}

// O (this thread's fragment of a warpgroup's 64 x 256 half) times `factor[j]` on accumulator row j.
__device__ __forceinline__ void scale_rows(float (&out_acc)[kValueColsPerWarpgroup / 2], const float (&factor)[2]) {
#pragma unroll
  for (int i = 0; i < kValueColsPerWarpgroup / 8; ++i) {
    out_acc[4 * i + 0] *= factor[0];
    out_acc[4 * i + 1] *= factor[0];
    out_acc[4 * i + 2] *= factor[1];
    out_acc[4 * i + 3] *= factor[1];
  }
}

// S_w = Q K[w * 32 : w * 32 + 32]^T, issued and committed (not waited for).
__device__ __forceinline__ void issue_scores(float (&scores)[kTokensPerWarpgroup / 2], uint32_t q_tile,
                                             uint32_t kv_tile, int warpgroup) {
  const uint64_t q_desc = smem_descriptor(q_tile, 16, 1024);
  const uint64_t k_desc = smem_descriptor(kv_tile + warpgroup * kTokensPerWarpgroup * 128, 16, 1024);
  wgmma_fence();
#pragma unroll
  for (int k = 0; k < kHeadDimQK / 16; ++k) {
    const uint32_t column = (k / 4) * kTileBytes + (k % 4) * 32;
    wgmma_m64n32k16_ss(scores, descriptor_plus(q_desc, column), descriptor_plus(k_desc, column), k > 0);
  }
  wgmma_commit();
}

// O_w += P V[:, w * 256 : w * 256 + 256], issued and committed (not waited for).
__device__ __forceinline__ void issue_values(float (&out_acc)[kValueColsPerWarpgroup / 2], uint32_t p_tile,
                                             uint32_t kv_tile, int warpgroup) {
  const uint64_t p_desc = smem_descriptor(p_tile, 16, 1024);
  const uint64_t v_desc = smem_descriptor(kv_tile + warpgroup * 4 * kTileBytes, kTileBytes, 1024);
  wgmma_fence();
#pragma unroll
  for (int k = 0; k < kBlockN / 16; ++k) {
    wgmma_m64n256k16_ss_tb(out_acc, descriptor_plus(p_desc, k * 32), descriptor_plus(v_desc, k * 16 * 128), 1);
  }
  wgmma_commit();
}

// 2^e for an integer e in [-126, 127], exactly.
__device__ __forceinline__ float exp2_integer(int e) { return __uint_as_float(static_cast<uint32_t>(127 + e) << 23); }

// The e for which a partial row whose largest magnitude is `largest` times 2^-e lies in [2^14, 2^15): in f16 every
// value of the row down to 2^-29 of the largest keeps 11 significant bits (the bf16 output keeps 8), and none
// overflows. 0 for a row of zeros, NaN or infinities (stored as they are).
__device__ __forceinline__ int f16_row_exponent(float largest) {
  if (!(largest > 0.f) || !(largest <= 3.4e38f)) return 0;
  const int floor_log2 = static_cast<int>(__float_as_uint(largest) >> 23) - 127;  // -127 below the normal range
  return min(max(floor_log2 - 14, -110), 113);
}

// The end of a piece: each warpgroup's half of O (value columns 256 w ..), divided by the row sums of both halves
// (`row_sum`: this thread's partial sums of its two rows, scaled to `row_max`, the rows' final maximum), to out and
// lse (out_slot < 0; with p.attn_sink, by sink_denominator's sum) or to partial slot `out_slot`: the row in f16 times
// 2^-e (f16_row_exponent of the row's largest magnitude, from both halves), 2^e in scale_partial and the base-2 LSE.
// Half the bytes of float32 partials, which every CTA of a split stores at once at its end and the combine reads
// back. The rows go through shared memory (the Q tile, free once every product is done: the caller has waited for its
// own) and leave it in 16-byte stores, a warp's covering 512 contiguous bytes of a row: stop 35 timed the fragments'
// own 4- and 8-byte stores, 8 rows of 16 or 32 bytes a warp store, at 3-6 us a CTA. The CTA's last barrier lets the
// next piece's loads reuse it.
// kPartials: the launch may write partials (a split, or a balanced schedule); without it every piece goes to out, and
// the kernel carries no partial code (stop 38: with it, the unsplit sparse FP8 decode kernel took 255 instead of 252
// registers and ran 2% slower at s_q 2).
constexpr int kStagedStride = kLatentDim * 2 + 16;  // bytes per staged row: the padding spreads a warp's 8 rows
static_assert(kRowsPerCta * kStagedStride <= kMatrixBytes, "the staged rows fit the Q tile");
template <bool kPartials>
__device__ __forceinline__ void store_output(const DecodeParams& p, uint8_t* shared, int row_block, int batch,
                                             int first_query, int64_t out_slot,
                                             const float (&out_acc)[kValueColsPerWarpgroup / 2],
                                             const float (&row_max)[2], float (&row_sum)[2]) {
  float* row_sum_shared = reinterpret_cast<float*>(shared + Layout::kRowSum);
  float* row_amax_shared = reinterpret_cast<float*>(shared + Layout::kRowAmax);
  uint8_t* staged = shared + Layout::kQ;
  const int warpgroup = threadIdx.x / 128, warp = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32;
  const int row_of[2] = {warp * 16 + lane / 4, warp * 16 + lane / 4 + 8};
  const bool direct = !kPartials || out_slot < 0;
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    row_sum[j] += __shfl_xor_sync(0xffffffffu, row_sum[j], 1);
    row_sum[j] += __shfl_xor_sync(0xffffffffu, row_sum[j], 2);
    if (lane % 4 == 0) row_sum_shared[warpgroup * kRowsPerCta + row_of[j]] = row_sum[j];
    if (!direct) {
      float amax = 0.f;
#pragma unroll
      for (int i = 0; i < kValueColsPerWarpgroup / 8; ++i) {
        amax = fmaxf(amax, fmaxf(fabsf(out_acc[4 * i + 2 * j]), fabsf(out_acc[4 * i + 2 * j + 1])));
      }
      amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
      amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
      if (lane % 4 == 0) row_amax_shared[warpgroup * kRowsPerCta + row_of[j]] = amax;
    }
  }
  named_barrier_sync(1, kThreads);
  cta_mark(3);

  const int value_col = warpgroup * kValueColsPerWarpgroup + 2 * (lane % 4);
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int row = row_block * kRowsPerCta + row_of[j];
    const float total = row_sum_shared[row_of[j]] + row_sum_shared[kRowsPerCta + row_of[j]];
    // partials are normalised by their own sum (the combine adds the sink)
    const float inverse =
        total > 0.f ? 1.f / (direct ? sink_denominator(p.attn_sink, row % p.h_q, total, row_max[j]) : total) : 0.f;
    uint8_t* staged_row = staged + row_of[j] * kStagedStride + value_col * 2;
    int exponent = 0;
    if (direct) {
#pragma unroll
      for (int i = 0; i < kValueColsPerWarpgroup / 8; ++i) {
        *reinterpret_cast<__nv_bfloat162*>(staged_row + 16 * i) =
            __floats2bfloat162_rn(out_acc[4 * i + 2 * j] * inverse, out_acc[4 * i + 2 * j + 1] * inverse);
      }
    } else {
      exponent = f16_row_exponent(
          fmaxf(row_amax_shared[row_of[j]], row_amax_shared[kRowsPerCta + row_of[j]]) * inverse);
      const float down = exp2_integer(-exponent);  // exact: the f16 value is the float32 partial's, rounded once
#pragma unroll
      for (int i = 0; i < kValueColsPerWarpgroup / 8; ++i) {
        *reinterpret_cast<__half2*>(staged_row + 16 * i) = __floats2half2_rn(
            out_acc[4 * i + 2 * j] * inverse * down, out_acc[4 * i + 2 * j + 1] * inverse * down);
      }
    }
    if (row >= p.rows || warpgroup != 0 || lane % 4 != 0) continue;
    if (direct) {
      const int query = first_query + row / p.h_q, head = row % p.h_q;
      const int64_t stat = (static_cast<int64_t>(batch) * p.h_q + head) * p.s_q + query;
      p.lse[stat] = total > 0.f ? (row_max[j] + log2f(total)) * kLn2 : INFINITY;
      if (p.max_logits != nullptr) p.max_logits[stat] = total > 0.f ? row_max[j] * kLn2 : -INFINITY;
    } else {
      p.lse_partial[out_slot * p.rows + row] = total > 0.f ? row_max[j] + log2f(total) : -INFINITY;
      p.scale_partial[out_slot * p.rows + row] = exp2_integer(exponent);
    }
  }
  named_barrier_sync(1, kThreads);

  // Thread t copies 16-byte chunk t % kChunks of rows t / kChunks, t / kChunks + 256 / kChunks, ...: a warp's 32
  // chunks are 512 contiguous bytes of one row.
  constexpr int kChunks = kLatentDim * 2 / 16;
  const int c = threadIdx.x % kChunks;
#pragma unroll 4
  for (int r = threadIdx.x / kChunks; r < kRowsPerCta; r += kThreads / kChunks) {
    const int row = row_block * kRowsPerCta + r;
    if (row >= p.rows) break;
    const int query = first_query + row / p.h_q, head = row % p.h_q;
    void* row_start = direct ? static_cast<void*>(p.out + batch * p.out_batch_stride + query * p.out_seq_stride +
                                                   head * p.out_head_stride)
                             : static_cast<void*>(p.out_partial16 + (out_slot * p.rows + row) * kLatentDim);
    reinterpret_cast<uint4*>(row_start)[c] = *reinterpret_cast<const uint4*>(staged + r * kStagedStride + c * 16);
  }
  fence_async_shared();  // the staged rows are read before the next piece's loads (async proxy) overwrite them
  __syncthreads();
}

// One piece of work: blocks [begin, end) of sequence z for row tile `row_block`; the output goes straight to out /
// lse (out_slot < 0) or to partial slot `out_slot`. `fills` counts each stage's fills by earlier pieces (and
// attend_pairs' Q loads by TMA): the mbarrier phases carry on from them. Dense decode over the FP8 cache only: the
// rest is attend_pairs'.
template <bool kPartials>
__device__ __forceinline__ void attend_piece(const DecodeParams& p, uint8_t* shared, int row_block, int z, int begin,
                                             int end, int64_t out_slot, int (&fills)[3]) {
  using L = Layout;
  const uint32_t q_tile = smem_address(shared + L::kQ);
  const uint32_t p_tile = smem_address(shared + L::kP);
  float* row_max_shared = reinterpret_cast<float*>(shared + L::kRowMax);
  const auto kv_tile = [&](int stage) { return smem_address(shared + L::kKv + stage * kMatrixBytes); };
  // One mbarrier per stage (its part 0's): the TMA of its block (FP8: of its RoPE columns) completes on it.
  const auto barrier = [&](int stage) { return smem_address(shared + L::kBarriers + stage * kParts * 8); };

  const int batch = z / p.queries_per_z, first_query = z % p.queries_per_z;  // z and 0: queries_per_z is 1 here
  const int warpgroup = warp_uniform(threadIdx.x / 128), warp = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32;
  const int length = visible_length<false>(p, z);

  // This thread's two accumulator rows (wgmma D fragment: rows warp * 16 + lane / 4 and + 8).
  int row_of[2], visible[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    row_of[j] = warp * 16 + lane / 4 + 8 * j;
    const int row = row_block * kRowsPerCta + row_of[j];
    const int query = first_query + row / p.h_q;
    visible[j] = row >= p.rows ? 0 : (p.causal ? length - p.s_q + query + 1 : length);
  }

  // Fills stage `stage` with block `block`: its RoPE columns by TMA (thread 0), its latent from `share`.
  Fp8Share share;
  const auto next_row_address = [&](int block) { return gather_row_address<false>(p, batch, block, length, -1); };
  const auto fill_stage = [&](int stage, int block) {
    if (threadIdx.x == 0) load_rope_block(p, kv_tile(stage), barrier(stage), batch, block);
    store_fp8_share(share, shared + L::kKv + stage * kMatrixBytes, gather_row(), (gather_row() / 4) % 2);
  };
  // Waits until stage `stage`'s `index`-th fill (counting from 0) has landed.
  const auto wait_stage = [&](int stage, int index) {
    mbarrier_wait(barrier(stage), ((stage == 0 ? fills[0] : fills[1]) + index) & 1);
  };
  if (begin < end) {
    load_q_async(p, q_tile, row_block, batch, first_query);
    for (int stage = 0; stage < 2 && begin + stage < end; ++stage) {
      load_fp8_share(share, next_row_address(begin + stage));
      fill_stage(stage, begin + stage);
    }
    if (begin + 2 < end) load_fp8_share(share, next_row_address(begin + 2));
  }
  cp_async_wait<0>();
  fence_async_shared();
  __syncthreads();

  float out_acc[kValueColsPerWarpgroup / 2];
#pragma unroll
  for (int i = 0; i < kValueColsPerWarpgroup / 2; ++i) out_acc[i] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  float scores[kTokensPerWarpgroup / 2];

  // Softmax in two halves, so that the first can run while P V of the previous block is still on the tensor cores.
  // softmax_scores: scale and mask S of `block`, update the running max and sum, keep P (bf16) in registers and the
  // factor O must be rescaled by. publish_probs: rescale O (P V of the previous block done), write P to shared memory,
  // visible to both warpgroups' wgmma. (The FP8 path stores zeros in the value rows past the end itself; sparse rows
  // that are not there are gathered as zeros.)
  uint32_t probs[2][kTokensPerWarpgroup / 8];
  float rescale[2];
  const auto softmax_scores = [&](int block) {
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
        const __nv_bfloat162 pair = __floats2bfloat162_rn(p0, p1);
        probs[j][i] = *reinterpret_cast<const uint32_t*>(&pair);
      }
    }
  };
  const auto publish_probs = [&] {
    scale_rows(out_acc, rescale);
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int i = 0; i < kTokensPerWarpgroup / 8; ++i) {
        const int chunk = warpgroup * (kTokensPerWarpgroup / 8) + i;
        *reinterpret_cast<uint32_t*>(shared + L::kP + swizzled_offset(row_of[j], chunk) + 4 * (lane % 4)) =
            probs[j][i];
      }
    }
    fence_async_shared();
    named_barrier_sync(1, kThreads);
  };

  // Per block: Q K^T of the next block, then P V of this one, on the tensor cores back to back; the next block's
  // softmax scores while P V runs; then, P V done, this stage refills with block + 2 (FP8: from the registers loaded
  // one block earlier, which then load block + 3) and the next P is published.
  if (begin < end) {
    wait_stage(0, 0);
    issue_scores(scores, q_tile, kv_tile(0), warpgroup);
    wgmma_wait<0>();
    fence_registers(scores);
    softmax_scores(begin);
    publish_probs();
  }
  // Once both warpgroups are done with stage `stage` (block `block`) and with P: the stage takes block + 2 (FP8: from
  // the registers loaded one block earlier, which then load block + 3).
  const auto refill = [&](int stage, int block) {
    named_barrier_sync(1, kThreads);
    if (block + 2 < end) {
      fill_stage(stage, block + 2);
      if (block + 3 < end) load_fp8_share(share, next_row_address(block + 3));
    }
  };
  // Q K^T of the next block is issued before P V of this one, so that the next block's softmax overlaps P V (measured
  // faster for the FP8 cache on the H100).
  // PhaseClock phases: 1 wait for the next stage, 2 issue Q K^T and P V, wait for Q K^T, 3 softmax, 4 wait for P V,
  // 5 refill, 6 publish P, 7 the loop.
  PhaseClock clock;
  for (int block = begin; block + 1 < end; ++block) {
    const int stage = (block - begin) % 2, next_stage = 1 - stage;
    clock.mark(7);
    fence_registers(out_acc);
    wait_stage(next_stage, (block + 1 - begin) / 2);
    clock.mark(1);
    issue_scores(scores, q_tile, kv_tile(next_stage), warpgroup);
    issue_values(out_acc, p_tile, kv_tile(stage), warpgroup);
    wgmma_wait<1>();  // Q K^T of the next block is done; P V of this one may still run
    fence_registers(scores);
    clock.mark(2);
    softmax_scores(block + 1);
    clock.mark(3);
    wgmma_wait<0>();
    fence_registers(out_acc);
    clock.mark(4);
    refill(stage, block);
    clock.mark(5);
    publish_probs();  // its fence and barrier also publish the FP8 latent just stored
    clock.mark(6);
  }
  clock.report("wide fp8", end - begin);
  if (begin < end) {  // the last block's P V
    fence_registers(out_acc);
    issue_values(out_acc, p_tile, kv_tile((end - 1 - begin) % 2), warpgroup);
    wgmma_wait<0>();
    fence_registers(out_acc);
  }
  store_output<kPartials>(p, shared, row_block, batch, first_query, out_slot, out_acc, row_max, row_sum);
  const int filled = max(0, end - begin);
  fills[0] += (filled + 1) / 2;
  fills[1] += filled / 2;
}

// Dense decode over the BF16 cache, and sparse attention over either cache, in block pairs, for a CTA of 64 query
// rows: warpgroup 0 scores block a = begin + 2 pair (stage 0), warpgroup 1 block b = a + 1 (stage 1), each over the
// whole block (m64n64: Q read once per 64 tokens), and warpgroup w owns value columns 256 w .. 256 w + 255 of O for
// both blocks. The softmax is chained, with no row-max exchange: m_a = max(m, rowmax S_a), m_b = max(m_a, rowmax S_b).
//   warpgroup 0                                        warpgroup 1
//   S_a = Q K_a^T                                      S_b = Q K_b^T (as soon as stage 1 has landed)
//   P_a = exp2(S_a - m_a), P_a and m_a -> shared  -->  O_1 = O_1 exp2(m - m_a) + P_a V_a[:, 256:]
//   O_0 = O_0 exp2(m - m_a) + P_a V_a[:, :256]         P_b = exp2(S_b - m_b), P_b and m_b -> shared (under P V of a)
//                                                 <--  (P V of a done)
//   O_0 = O_0 exp2(m_a - m_b) + P_b V_b[:, :256]       O_1 = O_1 exp2(m_a - m_b) + P_b V_b[:, 256:]
// So the two Q K^T share the tensor cores and each softmax runs under a wgmma. P_a and P_b live in the RoPE tile of
// their block's stage (only the owner's Q K^T reads it; P V reads the 512 latent columns). Stage 0 refills with a + 2
// once both products of a are done (mid-pair); stage 1 with the next b at the next pair's start, where warpgroup 1
// waits for it. A stage fills in kParts TMAs of three tiles, each on its own mbarrier, and Q K^T waits for each third
// just before its wgmmas, so that it starts on the first third while the rest lands (stop 23: 1-3% faster than one
// 9-tile TMA on one mbarrier). With kEarly (sparse FP8 decode; split dense decode of at most two row tiles a
// sequence) the parts are the latent half only the owner's P V reads (stage w: tiles 4 w .. 4 w + 3), refilled as
// soon as that P V is done, then the other half and the RoPE tile once both products are (stop 45: sparse FP8 decode
// 1-4% faster, those dense shapes 2-5%; sparse prefill and s_q 2 h_q 128 5-8% slower, so they keep the thirds).
// Sparse: the owner gathers its stage by cp.async (gather_stage); over the FP8 cache
// it gathers the latent raw and widens it in place, half by half, before the wgmmas of each half (dequantise_stage).
// Named barriers (arrive on one side, sync on the other) carry the hand-offs;
// kOwnBarrier + w is warpgroup w's own. Stop 23 measured this order 13-14% faster than Q K^T of b after P_a (then
// each Q K^T ran alone on the tensor cores: the chain Q K^T a, softmax a, Q K^T b, softmax b,
// docs/bench/stop22_call6_pairs_phases.log).
constexpr int kPublishedA = 2;  // warpgroup 0 -> 1: P_a and m_a are in shared memory
constexpr int kPublishedB = 3;  // warpgroup 1 -> 0: P_b and m_b are, and warpgroup 1's P V of a is done
constexpr int kReleasedB = 4;   // warpgroup 0 -> 1: warpgroup 0's P V of the previous b is done
constexpr int kOwnBarrier = 5;

// S (64 x 64) = Q K^T over a whole block, issued and committed, in the order of the stage's fill: `wait_part(part)`
// before each part's wgmmas (16 columns each), so that they start as soon as the first part is there. Parts (see
// attend_pairs' kEarly): thirds of the block's tiles, in order, or (kHalves) the latent half kStage (tiles 4 kStage
// .. 4 kStage + 3), the other half, then the RoPE tile. The fence after each wait: without it ptxas inserts its own
// after the wait's loop and serializes every wgmma of the kernel (C7520).
template <int kStage, bool kHalves, typename WaitPart>
__device__ __forceinline__ void issue_block_scores(float (&scores)[kBlockN / 2], uint32_t q_tile, uint32_t kv_tile,
                                                   WaitPart wait_part) {
  const uint64_t q_desc = smem_descriptor(q_tile, 16, 1024), k_desc = smem_descriptor(kv_tile, 16, 1024);
  constexpr int kStepsPerPart = kHalves ? kLatentDim / 2 / 16 : kHeadDimQK / 16 / kParts;
#pragma unroll
  for (int k = 0; k < kHeadDimQK / 16; ++k) {
    if (k % kStepsPerPart == 0) {
      wait_part(k / kStepsPerPart);
      wgmma_fence();
    }
    const int tile = kHalves && k / 4 < kColumnTiles - 1 ? (k / 4) ^ (4 * kStage) : k / 4;
    const uint32_t column = tile * kTileBytes + (k % 4) * 32;
    wgmma_m64n64k16_ss(scores, descriptor_plus(q_desc, column), descriptor_plus(k_desc, column), k > 0);
  }
  wgmma_commit();
}

template <bool kSparse, bool kFp8, bool kPartials, bool kEarlyDense>
__device__ __forceinline__ void attend_pairs(const DecodeParams& p, uint8_t* shared, int row_block, int z, int begin,
                                             int end, int64_t out_slot, int (&fills)[3]) {
  static_assert(kSparse || !kFp8 || kDenseFp8Pairs, "the dense FP8 cache is attend_piece's");
  // kEarly: each stage's refill starts with the latent half that only its owner's P V reads, as soon as that P V is
  // done, while the other warpgroup still reads the other half and P (the RoPE tile); Q K^T then takes the halves in
  // that order (the owner of stage 1 tiles 4-7 first). Sparse FP8 decode (whose gathers come in halves anyway) and
  // dense decode where run_decode asks for it (kEarlyDense); sparse BF16 and other dense launches refill whole stages
  // in thirds, as below.
  constexpr bool kEarly = kFp8 || (!kSparse && kEarlyDense);
  // The warpgroups gather their own stages by cp.async (sparse; the FP8 cache, widened in place: dense FP8 only in the
  // FLASHMLA_DENSE_FP8_PAIRS experiment, its rows' slots from the block table) rather than thread 0 by TMA.
  constexpr bool kGather = kSparse || kFp8;
  using L = Layout;
  const uint32_t q_tile = smem_address(shared + L::kQ);
  float* row_max_shared = reinterpret_cast<float*>(shared + L::kRowMax);  // [0]: m_a, [1]: m_b
  const auto stage_bytes = [&](int stage) { return shared + L::kKv + stage * kMatrixBytes; };
  const auto kv_tile = [&](int stage) { return smem_address(stage_bytes(stage)); };
  const auto p_tile = [&](int stage) { return kv_tile(stage) + (kColumnTiles - 1) * kTileBytes; };
  const auto barrier = [&](int stage, int part) {
    return smem_address(shared + L::kBarriers + (stage * kParts + part) * 8);
  };

  const int batch = z / p.queries_per_z, first_query = z % p.queries_per_z;  // dense: 0; sparse: the query
  const int warpgroup = threadIdx.x / 128, thread = threadIdx.x % 128, warp = thread / 32, lane = threadIdx.x % 32;
  const int length = visible_length<kSparse>(p, z);
  uint8_t* token_masks = shared + L::kTokenMasks;  // sparse: [stage][64 bits], bit r for row r gathered
  // Dense: one thread fills part `part` of the stage with cache page `page`, on the part's mbarrier (the parts of
  // issue_block_scores): kEarly, part 0 the stage's early latent half (tiles 4 stage ..), part 1 the other half (four
  // tiles a TMA, kv_part_map), part 2 the RoPE tile (kv_map); else three tiles a part (kv_part_map).
  const auto fill_part = [&](int stage, int page, int part) {
    if constexpr (!kEarly) {  // thirds of the block's tiles, in order
      load_page_tiles(p.kv_part_map, kv_tile(stage) + 3 * part * kTileBytes, barrier(stage, part), page, 3 * part, 3);
    } else if (part < 2) {
      const int half = part == 0 ? stage : 1 - stage;
      load_page_tiles(p.kv_part_map, kv_tile(stage) + 4 * half * kTileBytes, barrier(stage, part), page, 4 * half, 4);
    } else {
      load_page_tiles(p.kv_map, kv_tile(stage) + (kColumnTiles - 1) * kTileBytes, barrier(stage, 2), page,
                      kColumnTiles - 1, 1);
    }
  };
  const auto fill_rest = [&](int stage, int page) {
    fill_part(stage, page, 1);
    fill_part(stage, page, 2);
  };
  const auto fill_stage = [&](int stage, int block) {
    const int page = block_page(p, batch, block);
    fill_part(stage, page, 0);
    fill_rest(stage, page);
  };
  // Sparse: the owner warpgroup gathers its stage's block by cp.async, warp w rows 16 w .. 16 w + 15, and writes the
  // stage's token mask (a row is there if its index is), with the index of each row in its warpgroup's next block
  // loaded one fill early (`ahead`), so that no gather waits on it.
  // - BF16 cache: thread (warp w, lane l) copies chunk l % 8 of each 128-byte tile line of rows 16 w + 4 i + l / 8
  //   (i < 4; their indices in ahead[i]), so that each cp.async of a warp covers whole lines (four rows' line of one
  //   tile), in kParts commit groups of three tiles (the parts Q K^T waits for one by one; gather_parts).
  // - FP8 cache: lane l holds row 16 w + l % 16 (its index in ahead[0]), and each cp.async of a warp covers contiguous
  //   bytes of one or two rows, the copying lanes taking the row's address from its lane (stop 31: 6% faster than the
  //   BF16 pattern here, 7-9% slower on BF16 sparse prefill, docs/bench/stop31_call2.log). The row's 512 latent bytes
  //   land raw in the stage, the 64 bytes of tile t's columns in logical chunks 4-7 of the row's line of tile t
  //   (dequantise_stage widens them in place), its RoPE columns (bf16) in the RoPE tile and its four scales in the
  //   stage's 1 KB of scales; in two commit groups: the scales and tiles 0-3, then tiles 4-7 and the RoPE columns.
  int ahead[4] = {-1, -1, -1, -1};
  const auto gather_row_of = [&](int i) { return kFp8 ? 16 * warp + lane % 16 : 16 * warp + 4 * i + lane / 8; };
  const auto load_ahead = [&](int block) {
#pragma unroll
    for (int i = 0; i < (kFp8 ? 1 : 4); ++i) {
      ahead[i] = load_row_slot<kSparse>(p, batch, first_query, block, length, gather_row_of(i));
    }
  };
  const auto fp8_scales = [&](int stage) { return shared + L::kP + stage * kBlockN * 16; };
  // Parts [first_part, last_part] of the stage's gathers, a commit group each (the parts Q K^T waits for one by one,
  // issue_block_scores): BF16, three tiles a part, in order; FP8 (kEarly), part 0 the stage's early latent half
  // (tiles 4 stage ..: the half its owner's P V frees first) with the scales, part 1 the other half with the RoPE
  // columns. Part 0 writes the stage's token mask.
  const auto gather_parts = [&](int stage, int block, int first_part, int last_part) {
    const uint8_t* row_bytes[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) row_bytes[i] = gather_row_address<true>(p, batch, block, length, ahead[i]);
    uint32_t word = 0;  // bit r of warp w's 16-bit word for row 16 w + r
    if constexpr (kFp8) {
      // Copies the 16 bytes at `offset` of warp row r's cache row to `dst` (zeros if the row is not there).
      const auto copy = [&](int r, uint32_t dst, int offset) {
        const auto source = reinterpret_cast<const uint8_t*>(
            __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(row_bytes[0]), r));
        cp_async_16(dst, source != nullptr ? static_cast<const void*>(source + offset) : p.kv, source != nullptr);
      };
#pragma unroll
      for (int part = 0; part < 2; ++part) {
        if (part < first_part || part > last_part) continue;
        const int half = part == 0 ? stage : 1 - stage;
        if (part == 0 && lane < 16) {
          cp_async_16(smem_address(fp8_scales(stage) + gather_row_of(0) * 16),
                      row_bytes[0] != nullptr ? static_cast<const void*>(row_bytes[0] + kScaleOffset) : p.kv,
                      row_bytes[0] != nullptr);
        }
#pragma unroll
        for (int r = 0; r < 16; r += 2) {  // latent chunk c of 32: tile c / 4, raw chunk c % 4; two rows a copy
          const int c = 16 * half + lane % 16, row = r + lane / 16;
          copy(row, kv_tile(stage) + (c / 4) * kTileBytes + swizzled_offset(16 * warp + row, 4 + c % 4), c * 16);
        }
        if (part == 1) {
#pragma unroll
          for (int i = 0; i < 4; ++i) {  // the RoPE columns: 8 chunks of each of four rows a copy
            const int r = 4 * i + lane / 8;
            copy(r, kv_tile(stage) + (kColumnTiles - 1) * kTileBytes + swizzled_offset(16 * warp + r, lane % 8),
                 kRopeOffset + (lane % 8) * 16);
          }
        }
        cp_async_commit();
      }
      word = __ballot_sync(0xffffffffu, row_bytes[0] != nullptr) & 0xffffu;
    } else {
      static_assert(!(kSparse && kEarly), "sparse BF16 gathers thirds of the block, in order");
      constexpr int kTilesPerPart = kColumnTiles / kParts;
#pragma unroll
      for (int part = 0; part < kParts; ++part) {
        if (part < first_part || part > last_part) continue;
#pragma unroll
        for (int t = part * kTilesPerPart; t < (part + 1) * kTilesPerPart; ++t) {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const bool valid = row_bytes[i] != nullptr;
            cp_async_16(kv_tile(stage) + t * kTileBytes + swizzled_offset(gather_row_of(i), lane % 8),
                        valid ? static_cast<const void*>(row_bytes[i] + (8 * t + lane % 8) * 16) : p.kv, valid);
          }
        }
        cp_async_commit();
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {  // row 16 w + 4 i + j from lane 8 j
        const uint32_t bits = __ballot_sync(0xffffffffu, row_bytes[i] != nullptr);
#pragma unroll
        for (int j = 0; j < 4; ++j) word |= ((bits >> (8 * j)) & 1u) << (4 * i + j);
      }
    }
    if (first_part == 0 && lane == 0) {
      reinterpret_cast<uint16_t*>(token_masks)[stage * 4 + warp] = static_cast<uint16_t>(word);
    }
    if (last_part == kParts - 1) load_ahead(block + 2);  // the indices of the warpgroup's next block
  };
  const auto gather_stage = [&](int stage, int block) { gather_parts(stage, block, 0, kParts - 1); };
  // kEarly: the stage's early half now, the rest (gather_rest) once the other warpgroup has freed it.
  const auto gather_early = [&](int stage, int block) { gather_parts(stage, block, 0, 0); };
  const auto gather_rest = [&](int stage, int block) { gather_parts(stage, block, 1, kParts - 1); };
  // FP8: widens half `g` of the stage's raw latent (tiles 4 g .. 4 g + 3) to bf16 in place, thread (warp w, lane l) the
  // lines of rows 16 w + l % 8 + 8 h (h < 2) of tile l / 8 + 4 g: each 16-byte load or store of a warp then meets every
  // bank four times.
  // (Rolled: unrolled, stop 26's whole-block version spilled 612 bytes and serialized the wgmmas, C7520.)
  const auto dequantise_stage = [&](int stage, int g) {
    const float* scales = reinterpret_cast<const float*>(fp8_scales(stage));
#pragma unroll 1
    for (int h = 0; h < 2; ++h) {
      const int row = 16 * warp + lane % 8 + 8 * h, tile = lane / 8 + 4 * g;
      uint8_t* line = stage_bytes(stage) + tile * kTileBytes;
      uint4 raw[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) raw[k] = *reinterpret_cast<const uint4*>(line + swizzled_offset(row, 4 + k));
      const __nv_bfloat162 scale = __float2bfloat162_rn(scales[row * kNumTiles + tile / 2]);
#pragma unroll
      for (int k = 0; k < 4; ++k) {  // raw chunk k (read above) becomes chunks 2 k and 2 k + 1
        uint32_t words[8];
        dequantise_fp8_chunk(raw[k], scale, words);
        *reinterpret_cast<uint4*>(line + swizzled_offset(row, 2 * k)) =
            make_uint4(words[0], words[1], words[2], words[3]);
        *reinterpret_cast<uint4*>(line + swizzled_offset(row, 2 * k + 1)) =
            make_uint4(words[4], words[5], words[6], words[7]);
      }
    }
  };

  // Sparse: the owner's wait for part `part` of its gathers (the cp.async groups after it may still be in flight),
  // then its barrier, so that every row of the part is there for the warpgroup's wgmma. FP8: parts 0 and 1 are the
  // two commit groups, each half of the latent widened before the second barrier (half 1 while the wgmmas of half 0
  // run); part 2 has nothing of its own.
  const auto gathers_landed = [&](int part) {
    if constexpr (kFp8) {
      if (part == 2) return;
      if (part == 0) cp_async_wait<1>();
      if (part == 1) cp_async_wait<0>();
      named_barrier_sync(kOwnBarrier + warpgroup, 128);
      dequantise_stage(warpgroup, part ^ warpgroup);  // the stage's early half first (kEarly)
      fence_async_shared();
      named_barrier_sync(kOwnBarrier + warpgroup, 128);
      return;
    }
    if (part == 0) cp_async_wait<kParts - 1>();
    if (part == 1) cp_async_wait<kParts - 2>();
    if (part == 2) cp_async_wait<0>();
    fence_async_shared();
    named_barrier_sync(kOwnBarrier + warpgroup, 128);
  };
  static_assert(kParts == 3, "gathers_landed waits for one of three commit groups");
  int row_of[2], visible[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    row_of[j] = warp * 16 + lane / 4 + 8 * j;
    const int row = row_block * kRowsPerCta + row_of[j];
    const int query = first_query + row / p.h_q;
    visible[j] = row >= p.rows ? 0 : (p.causal ? length - p.s_q + query + 1 : length);
  }

  const uint32_t q_barrier = smem_address(shared + L::kQBarrier);
  if (begin < end) {
    if (!p.q_by_tma) {
      load_q_async(p, q_tile, row_block, batch, first_query);
    } else if (threadIdx.x == 0) {
      load_q_tma(p, q_tile, q_barrier, row_block, batch, first_query);
    }
    if constexpr (kGather) {  // warpgroup w gathers block begin + w into stage w
      load_ahead(begin + warpgroup);
      if (begin + warpgroup < end) gather_stage(warpgroup, begin + warpgroup);
    } else if (threadIdx.x == 0) {
      fill_stage(0, begin);
      if (begin + 1 < end) fill_stage(1, begin + 1);
    }
  }
  // Every copy of this thread landed and visible to the wgmmas (Q by cp.async; dense stages come by TMA). Sparse
  // with Q by TMA skips it: the wait would also be for both stages' whole first gathers, where each warpgroup's first
  // Q K^T can start on the first part of its own while the rest lands, as in the loop (stop 39: 1.4% on sparse
  // decode b64 h64, 4-7% on sparse prefill with a few blocks a CTA).
  if (!kGather || !p.q_by_tma) {
    cp_async_wait<0>();
    fence_async_shared();
    __syncthreads();
  }
  if (p.q_by_tma && begin < end) mbarrier_wait(q_barrier, fills[2] & 1);  // fills[2]: the CTA's earlier Q loads
  cta_mark(0);

  float out_acc[kValueColsPerWarpgroup / 2];
#pragma unroll
  for (int i = 0; i < kValueColsPerWarpgroup / 2; ++i) out_acc[i] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  float scores[kBlockN / 2];

  // Q K^T of the block in `stage`, its parts waited for one by one (dense: fill `fill` of the stage, counting from 0;
  // sparse: this warpgroup's gathers).
  const auto score_stage = [&](auto stage_constant, int fill) {
    constexpr int stage = decltype(stage_constant)::value;
    issue_block_scores<stage, kEarly>(scores, q_tile, kv_tile(stage), [&](int part) {
      if constexpr (kGather) {
        gathers_landed(part);
      } else {
        mbarrier_wait(barrier(stage, part), fill & 1);
      }
    });
  };
  // Moves this thread's rows to the maximum `new_max`: row_max and row_sum now, O by `factor` (the caller's
  // scale_rows, once no product into O is in flight).
  const auto move_max = [&](const float (&new_max)[2], float (&factor)[2]) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      factor[j] = exp2f(row_max[j] - (new_max[j] == -INFINITY ? 0.f : new_max[j]));
      row_sum[j] *= factor[j];
      row_max[j] = new_max[j];
    }
  };
  // The owner's softmax of `block` (scores waited for): masks and scales S, moves to the chained maximum
  // max(row_max, rowmax S) (O's `factor` left to the caller) and stores it in row_max_shared[stage], writes P (bf16)
  // into the stage's RoPE tile and zeroes the value rows past the sequence's end, then makes all of it visible to its
  // own wgmma (fence and its own barrier); the caller's arrive publishes it to the other warpgroup. It works on a copy
  // of the scores: warpgroup 1 runs it with P V of a in flight, and writing the wgmma accumulator `scores` there made
  // ptxas serialize every wgmma of the kernel (C7515).
  const auto softmax_and_store = [&](int block, int stage, float (&factor)[2]) {
    float logits[kBlockN / 2];
#pragma unroll
    for (int i = 0; i < kBlockN / 2; ++i) logits[i] = scores[i];
    float block_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int i = 0; i < kBlockN / 8; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          float& s = logits[4 * i + 2 * j + c];
          const int token = 8 * i + 2 * (lane % 4) + c;
          bool valid;
          if constexpr (kSparse) {
            const uint32_t mask = reinterpret_cast<const uint32_t*>(token_masks)[stage * 2 + token / 32];
            valid = visible[j] > 0 && (mask >> (token % 32)) & 1u;
          } else {
            valid = block * kBlockN + token < visible[j];
          }
          s = valid ? s * p.scale_log2 : -INFINITY;
          block_max[j] = fmaxf(block_max[j], s);
        }
      }
    }
    float new_max[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      block_max[j] = fmaxf(block_max[j], __shfl_xor_sync(0xffffffffu, block_max[j], 1));
      block_max[j] = fmaxf(block_max[j], __shfl_xor_sync(0xffffffffu, block_max[j], 2));
      new_max[j] = fmaxf(row_max[j], block_max[j]);
      if (lane % 4 == 0) row_max_shared[stage * kRowsPerCta + row_of[j]] = new_max[j];
    }
    move_max(new_max, factor);
    uint8_t* probs = stage_bytes(stage) + (kColumnTiles - 1) * kTileBytes;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const float shift = row_max[j] == -INFINITY ? 0.f : row_max[j];
#pragma unroll
      for (int i = 0; i < kBlockN / 8; ++i) {
        const float p0 = exp2f(logits[4 * i + 2 * j] - shift), p1 = exp2f(logits[4 * i + 2 * j + 1] - shift);
        row_sum[j] += p0 + p1;
        const __nv_bfloat162 pair = __floats2bfloat162_rn(p0, p1);
        *reinterpret_cast<uint32_t*>(probs + swizzled_offset(row_of[j], i) + 4 * (lane % 4)) =
            *reinterpret_cast<const uint32_t*>(&pair);
      }
    }
    const int valid_rows = length - block * kBlockN;  // gathered stages: rows not there came as zeros
    if (!kGather && valid_rows < kBlockN) zero_value_rows(stage_bytes(stage), valid_rows, thread, 128);
    fence_async_shared();
    named_barrier_sync(kOwnBarrier + warpgroup, 128);
  };
  // The other warpgroup's maximum for the block in `stage`, from row_max_shared.
  const auto take_published_max = [&](int stage) {
    const float new_max[2] = {row_max_shared[stage * kRowsPerCta + row_of[0]],
                              row_max_shared[stage * kRowsPerCta + row_of[1]]};
    float factor[2];
    move_max(new_max, factor);
    scale_rows(out_acc, factor);
  };

  // PhaseClock phases, warpgroup 0: 0 wait for P V of the previous b, 1 release stage 1 and (sparse) gather a + 2
  // into stage 0 (at the previous pair's end), 2 wait for stage 0 and Q K^T of a, 3 softmax, publish, rescale O,
  // 4 issue P V of a, 5 wait for P_b, 6 wait for P V of a, refill (dense), issue P V of b, 7 the loop.
  // Warpgroup 1: 0 wait for P V of the previous b, 1 wait for warpgroup 0's release of stage 1, 4 refill it (dense:
  // thread 0's TMA; sparse: the gathers), 2 wait for stage 1, issue Q K^T of b and wait for P_a, 5 wait for Q K^T of
  // b, 3 rescale O and issue P V of a, 6 softmax, wait for P V of a, publish, rescale O, issue P V of b, 7 the loop.
  PhaseClock clock;
  for (int pair = 0; 2 * pair < end - begin; ++pair) {
    const int a = begin + 2 * pair, b = a + 1;
    const bool has_b = b < end;
    if (pair == 1) cta_mark(1);
    clock.mark(7);
    // P V of the previous b done (here for both warpgroups and every pair, so that no path the compiler sees reads O
    // with a product in flight: it would serialize every wgmma).
    wgmma_wait<0>();
    fence_registers(out_acc);
    clock.mark(0);
    if (warpgroup == 0) {
      if (pair > 0) named_barrier_arrive(kReleasedB, kThreads);  // stage 1 is free on this side
      clock.mark(1);
      score_stage(std::integral_constant<int, 0>{}, fills[0] + pair);
      wgmma_wait<0>();
      fence_registers(scores);
      clock.mark(2);
      float factor[2];
      softmax_and_store(a, 0, factor);
      named_barrier_arrive(kPublishedA, kThreads);
      scale_rows(out_acc, factor);
      clock.mark(3);
      fence_registers(out_acc);
      issue_values(out_acc, p_tile(0), kv_tile(0), 0);
      clock.mark(4);
      if (has_b) {
        int next_page = 0;
        if constexpr (kEarly) {
          // This warpgroup's P V of a done: stage 0's latent half 0 (which only it reads) takes a + 2's, while
          // warpgroup 1 still reads the other half and P.
          wgmma_wait<0>();
          fence_registers(out_acc);
          if (a + 2 < end) {
            if constexpr (kGather) {
              gather_early(0, a + 2);
            } else if (thread == 0) {
              next_page = block_page(p, batch, a + 2);
              fill_part(0, next_page, 0);
            }
          }
        }
        named_barrier_sync(kPublishedB, kThreads);
        clock.mark(5);
        if constexpr (!kEarly) {
          wgmma_wait<0>();  // both products of a done: stage 0 takes a + 2
          fence_registers(out_acc);
        }
        if (!kGather && thread == 0 && a + 2 < end) {
          if constexpr (kEarly) {
            fill_rest(0, next_page);
          } else {
            fill_stage(0, a + 2);
          }
        }
        take_published_max(1);
        fence_registers(out_acc);
        issue_values(out_acc, p_tile(1), kv_tile(1), 0);
        clock.mark(6);
        // Sparse: a + 2's gathers (the rest of them) go after P V of b is issued, so that they do not hold it up.
        if constexpr (kGather) {
          if (a + 2 < end) {
            if constexpr (kEarly) {
              gather_rest(0, a + 2);
            } else {
              gather_stage(0, a + 2);
            }
          }
        }
        clock.mark(1);
      }
    } else {
      if (pair > 0) {
        // kEarly: this warpgroup's P V of the previous b done (above), stage 1's latent half 1 (which only it reads)
        // takes b's while warpgroup 0 may still read the other half and P; the rest once warpgroup 0 releases it.
        int page = 0;
        if (kEarly && has_b) {
          if constexpr (kGather) {
            gather_early(1, b);
          } else if (thread == 0) {
            page = block_page(p, batch, b);
            fill_part(1, page, 0);
          }
        }
        named_barrier_sync(kReleasedB, kThreads);
        clock.mark(1);
        if (has_b) {
          if constexpr (kGather) {
            if constexpr (kEarly) {
              gather_rest(1, b);
            } else {
              gather_stage(1, b);
            }
          } else if (thread == 0) {
            if constexpr (kEarly) {
              fill_rest(1, page);
            } else {
              fill_stage(1, b);
            }
          }
        }
      }
      clock.mark(4);
      // Q K^T of b runs under warpgroup 0's softmax of a
      if (has_b) score_stage(std::integral_constant<int, 1>{}, fills[1] + pair);
      named_barrier_sync(kPublishedA, kThreads);
      clock.mark(2);
      wgmma_wait<0>();  // Q K^T of b (unconditional: O is rescaled next, and no product may be in flight)
      fence_registers(scores);
      clock.mark(5);
      take_published_max(0);
      fence_registers(out_acc);
      issue_values(out_acc, p_tile(0), kv_tile(0), 1);
      clock.mark(3);
      if (has_b) {
        float factor[2];
        softmax_and_store(b, 1, factor);
        wgmma_wait<0>();  // P V of a done: stage 0 is free on this side, and O moves to m_b
        fence_registers(out_acc);
        named_barrier_arrive(kPublishedB, kThreads);
        scale_rows(out_acc, factor);
        fence_registers(out_acc);
        issue_values(out_acc, p_tile(1), kv_tile(1), 1);
        clock.mark(6);
      }
    }
  }
  clock.report(kFp8      ? (kSparse ? "wide sparse fp8 pairs" : "wide dense fp8 pairs")
               : kSparse ? "wide sparse bf16 pairs"
                         : "wide bf16 pairs",
               end - begin);
  cta_mark(2);
  wgmma_wait<0>();
  fence_registers(out_acc);
  store_output<kPartials>(p, shared, row_block, batch, first_query, out_slot, out_acc, row_max, row_sum);
  const int filled = max(0, end - begin);
  fills[0] += (filled + 1) / 2;
  fills[1] += filled / 2;
  fills[2] += filled > 0;
}

template <bool kFp8, bool kSparse, bool kPartials, bool kEarlyDense>
__global__ void __launch_bounds__(kThreads, 1) dense_decode_kernel(const __grid_constant__ DecodeParams p) {
  extern __shared__ uint8_t raw_shared[];
  const CtaClock cta_clock;
  // kGeneric: measured faster here
  uint8_t* shared = prepare_shared</*kGeneric=*/true>(raw_shared, Layout::kBarriers, 2 * kParts + 1);  // + Q's
  int fills[3] = {0, 0, 0};  // stage 0's fills, stage 1's, attend_pairs' Q loads by TMA
  for_each_piece<kSparse>(p, [&](int z, int begin, int end, int64_t slot) {
    if constexpr (!kFp8 || kSparse || kDenseFp8Pairs) {
      attend_pairs<kSparse, kFp8, kPartials, kEarlyDense>(p, shared, blockIdx.x, z, begin, end, slot, fills);
    } else {
      attend_piece<kPartials>(p, shared, blockIdx.x, z, begin, end, slot, fills);
    }
  });
  cta_clock.report(kSparse ? "wide sparse" : kFp8 ? "wide fp8" : "wide bf16");
}

// The partial slots of decode grid z: `num_splits` of them from `first` on (uniform), or this sequence's own
// (balanced, `split_offsets`) cut to the launch's `partial_slots` and to kMaxSplits (the weights' shared memory), as
// for_each_piece cuts the slots it writes: a num_splits tensor that is not get_mla_metadata's gives a wrong output,
// never a read outside them (none left: out 0, lse +inf); false when the balanced schedule wrote its one slot
// straight to the output.
__device__ __forceinline__ bool combine_slots(int z, const int* __restrict__ split_offsets, int partial_slots,
                                              int& num_splits, int64_t& first) {
  first = static_cast<int64_t>(z) * num_splits;
  if (split_offsets != nullptr) {
    const int begin = split_offsets[z];
    const int count = slot_count(split_offsets, z);
    if (count == 1) return false;
    first = min(static_cast<unsigned>(begin), static_cast<unsigned>(partial_slots));  // a negative one: none left
    num_splits = min(max(count, 0), min(partial_slots - static_cast<int>(first), kMaxSplits));
  }
  return true;
}

// The combine's weights: weights[s] = 2^(lse_s - lse) times the slot's scale (scale_partial; 1 where it is nullptr)
// for the `num_splits` splits of query row `row` from slot `first` on (0 for a split that saw no token), with
// `max_lse` their largest base-2 LSE and `total` the sum of 2^(lse_s - max_lse) (0 when no split saw a token); with
// an attention sink (head `head`'s of `attn_sink`) the weights' sum is sink_denominator's share of it instead of 1.
// `stats` is two floats of shared memory; every thread of the CTA calls this.
__device__ __forceinline__ void combine_weights(const float* __restrict__ lse_partial,
                                                const float* __restrict__ scale_partial, int64_t first, int rows,
                                                int row, int num_splits, const float* __restrict__ attn_sink, int head,
                                                float* weights, float* stats, float& max_lse, float& total) {
  for (int s = threadIdx.x; s < num_splits; s += blockDim.x) weights[s] = lse_partial[(first + s) * rows + row];
  __syncthreads();
  if (threadIdx.x < 32) {
    float largest = -INFINITY;
    for (int s = threadIdx.x; s < num_splits; s += 32) largest = fmaxf(largest, weights[s]);
    for (int offset = 16; offset > 0; offset /= 2) {
      largest = fmaxf(largest, __shfl_xor_sync(0xffffffffu, largest, offset));
    }
    float sum = 0.f;
    for (int s = threadIdx.x; s < num_splits; s += 32) {
      sum += largest == -INFINITY ? 0.f : exp2f(weights[s] - largest);
    }
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (threadIdx.x == 0) {
      stats[0] = sum;
      stats[1] = largest;
    }
  }
  __syncthreads();
  total = stats[0];
  max_lse = stats[1];
  const float denominator = sink_denominator(attn_sink, head, total, max_lse);
  for (int s = threadIdx.x; s < num_splits; s += blockDim.x) {
    const float scale = scale_partial != nullptr ? scale_partial[(first + s) * rows + row] : 1.f;
    weights[s] = weights[s] == -INFINITY ? 0.f : exp2f(weights[s] - max_lse) / denominator * scale;
  }
  __syncthreads();
}

// Stores columns [4 group, 4 group + 4) of query row `row` of decode grid z's sequence (`value`, the merged output),
// and with `with_lse` the row's natural-log LSE (+inf when no split saw a token).
__device__ __forceinline__ void store_combined(__nv_bfloat16* out, int64_t out_batch_stride, int64_t out_seq_stride,
                                               int64_t out_head_stride, float* lse, int h_q, int s_q, int batch,
                                               int first_query, int row, int group, float4 value, bool with_lse,
                                               float max_lse, float total) {
  const int query = first_query + row / h_q, head = row % h_q;
  __nv_bfloat16* out_row = out + batch * out_batch_stride + query * out_seq_stride + head * out_head_stride;
  reinterpret_cast<__nv_bfloat162*>(out_row)[2 * group] = __floats2bfloat162_rn(value.x, value.y);
  reinterpret_cast<__nv_bfloat162*>(out_row)[2 * group + 1] = __floats2bfloat162_rn(value.z, value.w);
  if (with_lse) {
    lse[(static_cast<int64_t>(batch) * h_q + head) * s_q + query] =
        total > 0.f ? (max_lse + log2f(total)) * kLn2 : INFINITY;
  }
}

// acc += w * part, where a zero weight (a split that saw no token) selects its part away, never multiplies it: the
// part's slot is allocated but was not written, and may hold NaN.
__device__ __forceinline__ void add_weighted(float4& acc, float w, const float4& part) {
  acc.x += w != 0.f ? w * part.x : 0.f;
  acc.y += w != 0.f ? w * part.y : 0.f;
  acc.z += w != 0.f ? w * part.z : 0.f;
  acc.w += w != 0.f ? w * part.w : 0.f;
}

// Columns [4 group, 4 group + 4) of a partial row: float32 (the narrow kernel's) or f16 (the others', to be multiplied
// by their scale_partial, which the weights carry).
template <typename Partial>
__device__ __forceinline__ float4 load_partial(const Partial* __restrict__ partial_row, int group) {
  if constexpr (std::is_same_v<Partial, float>) {
    return reinterpret_cast<const float4*>(partial_row)[group];
  } else {
    const uint2 bits = reinterpret_cast<const uint2*>(partial_row)[group];
    const float2 low = __half22float2(*reinterpret_cast<const __half2*>(&bits.x));
    const float2 high = __half22float2(*reinterpret_cast<const __half2*>(&bits.y));
    return make_float4(low.x, low.y, high.x, high.y);
  }
}

// Where the partials' scales are: none for float32 rows.
template <typename Partial>
__device__ __forceinline__ const float* partial_scales(const float* scale_partial) {
  return std::is_same_v<Partial, float> ? nullptr : scale_partial;
}

// One query row per CTA: out = sum_s 2^(lse_s - lse) out_s, lse = log2 sum_s 2^lse_s (natural log on output). It
// serves balanced schedules (any number of splits per sequence) and uniform splits of 9 to 15 (kCombineFewSplits <
// splits < kCombineManySplits: the kernels below take the others).
// A split that saw no token (lse_s = -inf) has weight 0 and its (unwritten) output is selected away. Partials are
// indexed by the decode grid's z (batch * queries_per_z + first query) and the CTA rows of that z.
template <typename Partial>
__global__ void __launch_bounds__(128) combine_kernel(const Partial* __restrict__ out_partial,
                                                      const float* __restrict__ lse_partial,
                                                      const float* __restrict__ scale_partial, __nv_bfloat16* out,
                                                      int64_t out_batch_stride, int64_t out_seq_stride,
                                                      int64_t out_head_stride, float* lse, int h_q, int s_q, int rows,
                                                      int num_splits, int queries_per_z,
                                                      const int* __restrict__ split_offsets, int partial_slots,
                                                      const float* __restrict__ attn_sink) {
  __shared__ float weights[kMaxSplits], stats[2];
  const int row = blockIdx.x, z = blockIdx.y;
  const int batch = z / queries_per_z, first_query = z % queries_per_z;
  int64_t first;
  if (!combine_slots(z, split_offsets, partial_slots, num_splits, first)) return;
  float max_lse, total;
  combine_weights(lse_partial, partial_scales<Partial>(scale_partial), first, rows, row, num_splits, attn_sink,
                  row % h_q, weights, stats, max_lse, total);
  // Unrolled, with every load unconditional (each slot is allocated, written or not) so that several are in flight.
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8
  for (int s = 0; s < num_splits; ++s) {
    const float w = weights[s];
    add_weighted(acc, w, load_partial(out_partial + ((first + s) * rows + row) * kLatentDim, threadIdx.x));
  }
  store_combined(out, out_batch_stride, out_seq_stride, out_head_stride, lse, h_q, s_q, batch, first_query, row,
                 threadIdx.x, acc, threadIdx.x == 0, max_lse, total);
}

// The combine of a uniform split into at most kCombineFewSplits splits (sparse decode b64 h64 has two), one query
// row per warp, kFewSplitsRows rows per CTA: each lane loads the row's LSEs and its 16 columns (four float4, 512 bytes
// apart) of every split at once and works out the weights itself, so that the warp waits on one round of loads.
// combine_kernel waits on three in turn (the LSEs, their reduction through shared memory, then the partials): 8.3 us
// of sparse decode b64 h64's 86 (stop 36). Stop 36's version of this kernel (2-4% off the whole op at 2 and 4 splits,
// docs/bench/stop36_call4.log) took a row per CTA, a float4 per thread; a warp per row, four loads per split in flight
// per thread, took another 1-2 us off most shapes of 2 to 8 splits (stop 37, docs/bench/stop37_call4.log). Compiled
// for at most kSplits splits, so that a CTA holds only the registers its split count needs (float32 / f16 partials,
// 2: 64 / 66, 4: 96 / 102, 8: 168 / 174); 9 to 15 splits keep combine_kernel.
constexpr int kCombineFewSplits = 8;
constexpr int kFewSplitsRows = 4;                        // warps (query rows) per CTA
constexpr int kFewSplitsVectors = kLatentDim / 4 / 32;  // float4 per lane per split row
template <int kSplits, typename Partial>
__global__ void __launch_bounds__(32 * kFewSplitsRows) combine_few_splits_kernel(
    const Partial* __restrict__ out_partial, const float* __restrict__ lse_partial,
    const float* __restrict__ scale_partial, __nv_bfloat16* out,
    int64_t out_batch_stride, int64_t out_seq_stride, int64_t out_head_stride, float* lse, int h_q, int s_q, int rows,
    int num_splits, int queries_per_z, const float* __restrict__ attn_sink) {
  const int lane = threadIdx.x % 32, row = blockIdx.x * kFewSplitsRows + threadIdx.x / 32, z = blockIdx.y;
  if (row >= rows) return;
  const int batch = z / queries_per_z, first_query = z % queries_per_z;
  const int64_t first = static_cast<int64_t>(z) * num_splits;
  const float* scales = partial_scales<Partial>(scale_partial);
  float split_lse[kSplits], split_scale[kSplits];
  float4 part[kSplits][kFewSplitsVectors];
#pragma unroll
  for (int s = 0; s < kSplits; ++s) {  // every load issued before any is used
    if (s < num_splits) {
      split_lse[s] = lse_partial[(first + s) * rows + row];
      split_scale[s] = scales != nullptr ? scales[(first + s) * rows + row] : 1.f;
      const Partial* split_row = out_partial + ((first + s) * rows + row) * kLatentDim;
#pragma unroll
      for (int v = 0; v < kFewSplitsVectors; ++v) part[s][v] = load_partial(split_row, v * 32 + lane);
    }
  }
  float max_lse = -INFINITY, total = 0.f;
#pragma unroll
  for (int s = 0; s < kSplits; ++s) {
    if (s < num_splits) max_lse = fmaxf(max_lse, split_lse[s]);
  }
#pragma unroll
  for (int s = 0; s < kSplits; ++s) {  // split_lse[s] becomes 2^(lse_s - max), 0 for a split that saw no token
    if (s < num_splits) {
      split_lse[s] = split_lse[s] == -INFINITY ? 0.f : exp2f(split_lse[s] - max_lse);
      total += split_lse[s];
    }
  }
  const float denominator = sink_denominator(attn_sink, row % h_q, total, max_lse);
  float4 acc[kFewSplitsVectors];
#pragma unroll
  for (int v = 0; v < kFewSplitsVectors; ++v) acc[v] = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
  for (int s = 0; s < kSplits; ++s) {
    if (s < num_splits) {
      const float w = split_lse[s] == 0.f ? 0.f : split_lse[s] / denominator * split_scale[s];
#pragma unroll
      for (int v = 0; v < kFewSplitsVectors; ++v) add_weighted(acc[v], w, part[s][v]);
    }
  }
#pragma unroll
  for (int v = 0; v < kFewSplitsVectors; ++v) {  // float4 column group v * 32 + lane
    store_combined(out, out_batch_stride, out_seq_stride, out_head_stride, lse, h_q, s_q, batch, first_query, row,
                   v * 32 + lane, acc[v], v == 0 && lane == 0, max_lse, total);
  }
}

// The same combine for many splits per row (a small batch over a long context: b1 h128 32k has 66), which one CTA of
// 128 threads per row reads too slowly: it waits on each of its loads (8.7 us of a 44 us step on the H200). Each
// of the eight warps sums its own share of the splits (split s goes to warp s % 8) over the whole 512-wide row, a
// float4 per lane per 128 columns, four splits at a time: sixteen 16-byte loads in flight per thread (the launch
// bounds' minimum of one CTA per SM lets the compiler keep them all in registers: without it, it waits for each group
// of four at its first use). The warps' sums meet in shared memory. With few splits most warps would idle and the
// larger CTAs fit fewer per SM (sparse decode b64 h64, two splits: 114 against 94 us), so launch_combine takes this
// kernel from kCombineManySplits splits of a uniform split on, and of a balanced schedule from kCombineManySplits
// parts a sequence (stop 60, H100: b1 h128 32k with get_mla_metadata's schedule 34.7 against 37.2-38.4 us).
constexpr int kCombineManySplits = 16;
constexpr int kCombineThreads = 256;
constexpr int kCombineWarps = kCombineThreads / 32;
constexpr int kCombineUnroll = 4;                     // splits per warp whose loads are in flight together
constexpr int kCombineMaxParts = 8;                   // column parts of a row (kLatentDim / 8 = 64 columns each)

// kParts CTAs per query row, CTA part c summing columns [c * 512 / kParts, (c + 1) * 512 / kParts), as many parts as
// keep the CTAs within one per SM: with few rows (b1 h16 32k: 16 rows of 132 float32 splits) one CTA a row left
// most SMs idle, each of the 16 reading 270 KB (5.25 us in torch.profiler; in eight parts the op is 0.8-2.3 us
// faster at b1 h16 8k-128k, stop 40 call 2). Each part's lanes cover its float4 column groups as the whole row's do
// (a float4 per lane per 128 columns; at 64 columns lanes 16-31 idle), so every column is summed in the same order
// whatever kParts.
template <typename Partial, int kParts>
__global__ void __launch_bounds__(kCombineThreads, 1)
    combine_many_splits_kernel(const Partial* __restrict__ out_partial, const float* __restrict__ lse_partial,
                               const float* __restrict__ scale_partial, __nv_bfloat16* out, int64_t out_batch_stride,
                               int64_t out_seq_stride, int64_t out_head_stride, float* lse, int h_q, int s_q, int rows,
                               int num_splits, int queries_per_z, const int* __restrict__ split_offsets,
                               int partial_slots, const float* __restrict__ attn_sink) {
  constexpr int kGroups = kLatentDim / 4 / kParts;          // float4 column groups of this CTA's part
  constexpr int kVectors = kGroups >= 32 ? kGroups / 32 : 1;  // float4 per lane per split row
  constexpr int kLanes = kGroups >= 32 ? 32 : kGroups;        // lanes with columns
  __shared__ float weights[kMaxSplits], stats[2];
  __shared__ float4 warp_sums[kCombineWarps][kGroups];
  const int row = blockIdx.x / kParts, column_part = blockIdx.x % kParts, z = blockIdx.y;
  const int batch = z / queries_per_z, first_query = z % queries_per_z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int64_t first;
  if (!combine_slots(z, split_offsets, partial_slots, num_splits, first)) return;
  float max_lse, total;
  combine_weights(lse_partial, partial_scales<Partial>(scale_partial), first, rows, row, num_splits, attn_sink,
                  row % h_q, weights, stats, max_lse, total);
  float4 acc[kVectors];
  for (int v = 0; v < kVectors; ++v) acc[v] = make_float4(0.f, 0.f, 0.f, 0.f);
  const auto add_split = [&](int s, const float4 (&part)[kVectors]) {
    const float w = weights[s];
#pragma unroll
    for (int v = 0; v < kVectors; ++v) add_weighted(acc[v], w, part[v]);
  };
  const int first_group = column_part * kGroups;
  const auto load_split = [&](int s, float4 (&part)[kVectors]) {
    const Partial* partial_row = out_partial + ((first + s) * rows + row) * kLatentDim;
#pragma unroll
    for (int v = 0; v < kVectors; ++v) part[v] = load_partial(partial_row, first_group + v * 32 + lane);
  };
  // Lanes past kLanes (64-column parts) load and sum nothing, and meet the others at the barrier below.
  int s = lane < kLanes ? warp : num_splits;
  // Groups of kCombineUnroll splits: every load of a group is issued before any of them is summed.
  for (; s + (kCombineUnroll - 1) * kCombineWarps < num_splits; s += kCombineUnroll * kCombineWarps) {
    float4 parts[kCombineUnroll][kVectors];
#pragma unroll
    for (int u = 0; u < kCombineUnroll; ++u) load_split(s + u * kCombineWarps, parts[u]);
#pragma unroll
    for (int u = 0; u < kCombineUnroll; ++u) add_split(s + u * kCombineWarps, parts[u]);
  }
  for (; s < num_splits; s += kCombineWarps) {
    float4 part[kVectors];
    load_split(s, part);
    add_split(s, part);
  }
  if (lane < kLanes) {
    for (int v = 0; v < kVectors; ++v) warp_sums[warp][v * 32 + lane] = acc[v];
  }
  __syncthreads();
  if (threadIdx.x < kGroups) {  // float4 column group c of the part: the warps' sums, in warp order
    float4 sum = warp_sums[0][threadIdx.x];
    for (int k = 1; k < kCombineWarps; ++k) {
      const float4 part = warp_sums[k][threadIdx.x];
      sum.x += part.x;
      sum.y += part.y;
      sum.z += part.z;
      sum.w += part.w;
    }
    store_combined(out, out_batch_stride, out_seq_stride, out_head_stride, lse, h_q, s_q, batch, first_query, row,
                   first_group + threadIdx.x, sum, column_part == 0 && threadIdx.x == 0, max_lse, total);
  }
}

// A 4-d view of the paged cache as bf16, (64 columns, 64 rows, tiles, num_blocks) from byte `offset` of each row, with
// the cache's own row and block strides and 128 bytes between column tiles: one box is `box_tiles` of a block's
// 64-column tiles, each landing 128-byte-swizzled in the wgmma layout, back to back, in one TMA (the BF16 cache's
// nine tiles, or a third of them; the FP8 cache's one RoPE tile).
CUtensorMap cache_tensor_map(const torch::Tensor& kv_cache, int64_t offset, int tiles, int box_tiles) {
  const auto encode = tensor_map_encoder();
  const int64_t element = kv_cache.element_size();
  CUtensorMap map;
  const cuuint64_t dims[4] = {64, kBlockN, static_cast<cuuint64_t>(tiles),
                              static_cast<cuuint64_t>(std::max<int64_t>(kv_cache.size(0), 1))};
  const cuuint64_t strides[3] = {static_cast<cuuint64_t>(kv_cache.stride(1) * element), 128,
                                 static_cast<cuuint64_t>(kv_cache.stride(0) * element)};
  const cuuint32_t box[4] = {64, kBlockN, static_cast<cuuint32_t>(box_tiles), 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  const CUresult result = encode(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 4,
                                 static_cast<uint8_t*>(kv_cache.data_ptr()) + offset, dims, strides, box,
                                 element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                 CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(result == CUDA_SUCCESS, "dense_decode: cuTensorMapEncodeTiled failed with ", static_cast<int>(result));
  return map;
}

// attend_pairs' Q map (DecodeParams::q_map) over q (batch, s_q, h_q, 576), or false where a CTA's 64 rows are not one
// box: a box is 64 heads of one query (sparse, and dense with s_q 1: any h_q, heads past h_q are zeros), or, for
// dense s_q > 1, 64 heads of one query (h_q a multiple of 64) or 64 / h_q whole queries (h_q dividing 64).
bool q_tensor_map(const torch::Tensor& q, bool sparse, CUtensorMap& map) {
  const int64_t s_q = q.size(1), h_q = q.size(2);
  cuuint32_t box_heads = kRowsPerCta, box_queries = 1;
  if (!sparse && s_q > 1 && h_q % kRowsPerCta != 0) {
    if (kRowsPerCta % h_q != 0) return false;
    box_heads = static_cast<cuuint32_t>(h_q);
    box_queries = static_cast<cuuint32_t>(kRowsPerCta / h_q);
  }
  const auto encode = tensor_map_encoder();
  const cuuint64_t dims[5] = {64, static_cast<cuuint64_t>(h_q), static_cast<cuuint64_t>(s_q), kColumnTiles,
                              static_cast<cuuint64_t>(q.size(0))};
  const cuuint64_t strides[4] = {static_cast<cuuint64_t>(q.stride(2) * 2), static_cast<cuuint64_t>(q.stride(1) * 2),
                                 128, static_cast<cuuint64_t>(q.stride(0) * 2)};
  const cuuint32_t box[5] = {64, box_heads, box_queries, kColumnTiles, 1};
  const cuuint32_t element_strides[5] = {1, 1, 1, 1, 1};
  const CUresult result = encode(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 5, q.data_ptr(), dims, strides, box,
                                 element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                 CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(result == CUDA_SUCCESS, "decode: cuTensorMapEncodeTiled (q) failed with ", static_cast<int>(result));
  return true;
}

// early: attend_pairs' kEarlyDense (dense BF16 with partials only).
template <bool kFp8, bool kSparse>
void launch_decode(const DecodeParams& params, dim3 grid, cudaStream_t stream, bool early = false) {
  auto kernel = params.lse_partial != nullptr ? dense_decode_kernel<kFp8, kSparse, true, false>
                                              : dense_decode_kernel<kFp8, kSparse, false, false>;
  if constexpr (!kFp8 && !kSparse) {
    if (early && params.lse_partial != nullptr) kernel = dense_decode_kernel<false, false, true, true>;
  }
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Layout::kBytes));
  kernel<<<grid, kThreads, Layout::kBytes, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  print_phases(stream);
}

// q always; kv_cache when defined (a paged cache).
void check_inputs(const char* op, const torch::Tensor& q, const torch::Tensor& kv_cache, bool is_fp8) {
  TORCH_CHECK(q.is_cuda() && q.scalar_type() == at::kBFloat16 && q.dim() == 4 && q.size(3) == kHeadDimQK &&
                  q.stride(3) == 1,
              op, ": q must be CUDA bfloat16 (batch, s_q, h_q, 576) with a contiguous last dimension");
  TORCH_CHECK(q.stride(0) % 8 == 0 && q.stride(1) % 8 == 0 && q.stride(2) % 8 == 0 &&
                  reinterpret_cast<uintptr_t>(q.data_ptr()) % 16 == 0,
              op, ": q rows must be 16-byte aligned");
  if (!kv_cache.defined()) return;
  TORCH_CHECK(kv_cache.device() == q.device(), op, ": kv_cache must be on q's device");
  const int64_t element = kv_cache.element_size();
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.size(1) == kBlockN && kv_cache.stride(3) == 1 &&
                  (kv_cache.stride(0) * element) % 16 == 0 && (kv_cache.stride(1) * element) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(kv_cache.data_ptr()) % 16 == 0,
              op, ": kv_cache must be (num_blocks, 64, 1, row) with 16-byte aligned rows");
  TORCH_CHECK(is_fp8 ? (element == 1 && kv_cache.size(3) == kFp8RowBytes)
                     : (kv_cache.scalar_type() == at::kBFloat16 && kv_cache.size(3) == kHeadDimQK),
              op, ": kv_cache must be bfloat16 (..., 576) or, with is_fp8, 1-byte (..., 656)");
}

// The per-head attention sinks into params (none: nullptr), for the kernel that normalises each row.
void set_attn_sink(const char* op, DecodeParams& params, const c10::optional<torch::Tensor>& attn_sink,
                   const torch::Tensor& q, int64_t h_q) {
  if (!attn_sink.has_value()) return;
  TORCH_CHECK(attn_sink->scalar_type() == at::kFloat && attn_sink->dim() == 1 && attn_sink->size(0) == h_q &&
                  attn_sink->is_contiguous() && attn_sink->device() == q.device(),
              op, ": attn_sink must be a contiguous float32 (h_q,) tensor on q's device");
  params.attn_sink = attn_sink->data_ptr<float>();
}

// The combine of the split partials into out and lse: the few-splits kernel for a uniform split into at most
// kCombineFewSplits, the many-splits kernel from kCombineManySplits splits (balanced: parts a sequence),
// combine_kernel for the rest.
template <typename Partial>
void launch_combine(const DecodeParams& params, const Partial* out_partial, const torch::Tensor& out, int64_t rows,
                    int64_t zs, bool balanced, cudaStream_t stream) {
  const int num_splits = params.num_splits;
  if (!balanced && num_splits <= kCombineFewSplits) {
    const auto combine = num_splits <= 2   ? combine_few_splits_kernel<2, Partial>
                         : num_splits <= 4 ? combine_few_splits_kernel<4, Partial>
                                           : combine_few_splits_kernel<kCombineFewSplits, Partial>;
    combine<<<dim3((rows + kFewSplitsRows - 1) / kFewSplitsRows, zs), 32 * kFewSplitsRows, 0, stream>>>(
        out_partial, params.lse_partial, params.scale_partial, params.out, out.stride(0), out.stride(1),
        out.stride(2), params.lse, params.h_q, params.s_q, params.rows, num_splits, params.queries_per_z,
        params.attn_sink);
  } else {
    // Balanced: `num_splits` parts over `zs` sequences; from kCombineManySplits parts a sequence on average (batch 1
    // over a long context: every part a split of the one sequence) the many-splits kernel too.
    const bool many_splits = balanced ? num_splits >= kCombineManySplits * zs : num_splits >= kCombineManySplits;
    // The many-splits kernel: as many column parts a row as keep its CTAs within two per SM (two fit: 96 registers
    // a thread, 20 KB of shared memory at most).
    int parts = 1;
    if (many_splits) {
      int multiprocessors = 0;
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, out.get_device()));
      while (parts < kCombineMaxParts && rows * zs * parts * 2 <= 2 * multiprocessors) parts *= 2;
    }
    const auto combine = !many_splits ? combine_kernel<Partial>
                         : parts == 1 ? combine_many_splits_kernel<Partial, 1>
                         : parts == 2 ? combine_many_splits_kernel<Partial, 2>
                         : parts == 4 ? combine_many_splits_kernel<Partial, 4>
                                      : combine_many_splits_kernel<Partial, kCombineMaxParts>;
    combine<<<dim3(rows * parts, zs), many_splits ? kCombineThreads : 128, 0, stream>>>(
        out_partial, params.lse_partial, params.scale_partial, params.out, out.stride(0), out.stride(1),
        out.stride(2), params.lse, params.h_q, params.s_q, params.rows, num_splits, params.queries_per_z,
        params.split_offsets, params.partial_slots, params.attn_sink);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A paged cache (num_blocks, 64, 1, row) as the kernels read it: its own block and row strides.
void set_paged_cache(DecodeParams& params, const torch::Tensor& kv_cache) {
  const int64_t element = kv_cache.element_size();
  params.kv = static_cast<const uint8_t*>(kv_cache.data_ptr());
  params.kv_block_bytes = kv_cache.stride(0) * element;
  params.kv_row_bytes = kv_cache.stride(1) * element;
  params.kv_slots = kv_cache.size(0) * kBlockN;
}

// Sparse decode's extra cache: its own paged cache and indices in the same softmax. run_decode launches the kernel
// over it after the main cache's, its `num_splits` splits writing partial slots after the main launch's, and one
// combine merges both (with the sink): no second pass over the outputs.
struct ExtraCache {
  torch::Tensor kv_cache;
  const int* indices;
  int64_t indices_batch_stride, indices_seq_stride;
  const int* topk_length;
  int topk;
  int64_t num_splits;
};

// Outputs, partials, launch and combine for both ops; `params` comes with the op's own fields set. Dense: a CTA's
// rows are the (s_q, h_q) pairs of one sequence; sparse: the h_q heads of one query (its own indices).
std::vector<torch::Tensor> run_decode(const char* op, const torch::Tensor& q, const torch::Tensor& kv_cache,
                                      bool is_fp8, bool sparse, double softmax_scale, int64_t num_splits,
                                      DecodeParams& params, bool narrow = false, const ExtraCache* extra = nullptr) {
  const int64_t batch = q.size(0), s_q = q.size(1), h_q = q.size(2);
  const int64_t rows = sparse ? h_q : s_q * h_q, queries_per_z = sparse ? s_q : 1, zs = batch * queries_per_z;
  const int64_t extra_splits = extra != nullptr ? extra->num_splits : 0;
  TORCH_CHECK(num_splits >= 1 && (extra == nullptr || extra_splits >= 1) && num_splits + extra_splits <= kMaxSplits, op,
              ": num_splits (with the extra cache's) must be in [1, ", kMaxSplits, "], got ", num_splits, " + ",
              extra_splits);
  const int64_t row_blocks = (rows + kRowsPerCta - 1) / kRowsPerCta;
  TORCH_CHECK(zs <= 65535 && row_blocks <= 65535, op, ": too large a batch for one launch");
  const c10::cuda::CUDAGuard guard(q.device());
  auto out = torch::empty({batch, s_q, h_q, kLatentDim}, q.options());
  auto lse = torch::empty({batch, h_q, s_q}, q.options().dtype(at::kFloat));
  if (zs == 0 || rows == 0) return {out, lse};
  // Balanced: `num_splits` is the number of parts; sequence b's slots lie in [0, batch + parts).
  const bool balanced = params.metadata != nullptr;
  const bool partials = balanced || num_splits > 1 || extra != nullptr;
  // attend_pairs' early refills (kEarlyDense) for split dense BF16 decode of at most two row tiles a sequence: stop 45
  // measured them 2-5% faster there (b1 h128 32k 31.5 against 33.3 us) and 4-5% slower with s_q 2 at h_q 128 (four
  // row tiles reading each block, mostly from L2).
  const bool early_dense = !sparse && !is_fp8 && !narrow && partials && rows <= 2 * kRowsPerCta;
  const int64_t slots = balanced ? batch + num_splits : zs * (num_splits + extra_splits);
  // The narrow kernel's partial rows are float32; the others' f16 with a scale each (store_output).
  torch::Tensor out_partial, lse_partial;
  if (partials) {
    out_partial = torch::empty({slots, rows, kLatentDim}, q.options().dtype(narrow ? at::kFloat : at::kHalf));
    lse_partial = torch::empty({narrow ? 1 : 2, slots, rows}, q.options().dtype(at::kFloat));
  }
  // Only the map the chosen kernel reads: the FP8 cache's RoPE tile, the narrow kernel's whole BF16 page, or
  // attend_pairs' third of one.
  if (!sparse && is_fp8) {
    params.kv_map = cache_tensor_map(kv_cache, kRopeOffset, 1, 1);
  } else if (!sparse && narrow) {
    params.kv_map = cache_tensor_map(kv_cache, 0, kColumnTiles, kColumnTiles);
  } else if (!sparse) {
    // attend_pairs' parts: early_dense, its latent halves (kv_part_map) and RoPE tile (kv_map); else thirds of a page
    params.kv_part_map = cache_tensor_map(kv_cache, 0, kColumnTiles, early_dense ? 4 : kColumnTiles / kParts);
    params.kv_map = cache_tensor_map(kv_cache, 0, kColumnTiles, 1);
  }
  // attend_pairs (dense BF16 past the narrow kernel's rows, and sparse) loads Q by TMA where its rows form a box.
  params.q_by_tma = (sparse || (!narrow && (!is_fp8 || kDenseFp8Pairs))) && q_tensor_map(q, sparse, params.q_map);
  params.q = reinterpret_cast<const __nv_bfloat16*>(q.data_ptr());
  params.q_batch_stride = q.stride(0);
  params.q_seq_stride = q.stride(1);
  params.q_head_stride = q.stride(2);
  if (params.kv == nullptr) set_paged_cache(params, kv_cache);  // (sparse prefill sets a flat kv)
  params.out = reinterpret_cast<__nv_bfloat16*>(out.data_ptr());
  params.out_batch_stride = out.stride(0);
  params.out_seq_stride = out.stride(1);
  params.out_head_stride = out.stride(2);
  params.lse = lse.data_ptr<float>();
  params.out_partial = partials && narrow ? out_partial.data_ptr<float>() : nullptr;
  params.out_partial16 = partials && !narrow ? reinterpret_cast<__half*>(out_partial.data_ptr()) : nullptr;
  params.lse_partial = partials ? lse_partial.data_ptr<float>() : nullptr;
  params.scale_partial = partials && !narrow ? params.lse_partial + slots * rows : nullptr;
  params.h_q = static_cast<int>(h_q);
  params.s_q = static_cast<int>(s_q);
  params.rows = static_cast<int>(rows);
  params.num_splits = static_cast<int>(num_splits);
  params.slots_per_z = static_cast<int>(num_splits + extra_splits);
  params.first_slot = 0;
  params.queries_per_z = static_cast<int>(queries_per_z);
  params.scale_log2 = static_cast<float>(softmax_scale * M_LOG2E);
  auto stream = c10::cuda::getCurrentCUDAStream();
  params.batch = static_cast<int>(batch);
  params.partial_slots = static_cast<int>(slots);
  const dim3 grid(row_blocks, num_splits, balanced ? 1 : zs);
  if (sparse) {
    is_fp8 ? launch_decode<true, true>(params, grid, stream) : launch_decode<false, true>(params, grid, stream);
  } else if (narrow) {
    is_fp8 ? launch_narrow_decode<true>(params, grid, stream) : launch_narrow_decode<false>(params, grid, stream);
  } else {
    is_fp8 ? launch_decode<true, false>(params, grid, stream)
           : launch_decode<false, false>(params, grid, stream, early_dense);
  }
  if (extra != nullptr) {
    DecodeParams second = params;
    set_paged_cache(second, extra->kv_cache);
    second.indices = extra->indices;
    second.indices_batch_stride = extra->indices_batch_stride;
    second.indices_seq_stride = extra->indices_seq_stride;
    second.topk_length = extra->topk_length;
    second.topk = extra->topk;
    second.num_splits = static_cast<int>(extra_splits);
    second.first_slot = static_cast<int>(num_splits);
    const dim3 extra_grid(row_blocks, extra_splits, zs);
    is_fp8 ? launch_decode<true, true>(second, extra_grid, stream)
           : launch_decode<false, true>(second, extra_grid, stream);
    params.num_splits = params.slots_per_z;  // the combine merges both launches' splits
  }
  if (partials) {
    narrow ? launch_combine(params, params.out_partial, out, rows, zs, balanced, stream)
           : launch_combine(params, params.out_partial16, out, rows, zs, balanced, stream);
  }
  return {out, lse};
}

// Sparse decode's index rows (batch, s_q, topk) and lengths (batch,), checked against q.
void check_sparse_indices(const torch::Tensor& q, const torch::Tensor& indices,
                          const c10::optional<torch::Tensor>& topk_length, const char* indices_name,
                          const char* length_name) {
  TORCH_CHECK(indices.scalar_type() == at::kInt && indices.dim() == 3 && indices.stride(2) == 1 &&
                  indices.size(0) == q.size(0) && indices.size(1) == q.size(1) && indices.device() == q.device(),
              "sparse_decode: ", indices_name,
              " must be int32 (batch, s_q, topk) on q's device with a contiguous last dimension");
  TORCH_CHECK(!topk_length.has_value() ||
                  (topk_length->scalar_type() == at::kInt && topk_length->is_contiguous() &&
                   topk_length->numel() == q.size(0) && topk_length->device() == q.device()),
              "sparse_decode: ", length_name, " must be int32 (batch,) on q's device");
}

}  // namespace

std::vector<torch::Tensor> dense_decode(const torch::Tensor& q, const torch::Tensor& kv_cache,
                                        const torch::Tensor& block_table, const torch::Tensor& cache_seqlens,
                                        double softmax_scale, bool causal, bool is_fp8, int64_t num_splits,
                                        const c10::optional<torch::Tensor>& tile_scheduler_metadata,
                                        const c10::optional<torch::Tensor>& split_offsets, bool narrow,
                                        const c10::optional<torch::Tensor>& attn_sink) {
  check_inputs("dense_decode", q, kv_cache, is_fp8);
  TORCH_CHECK(!narrow || q.size(1) * q.size(2) <= kNarrowRows, "dense_decode: the narrow kernel takes at most ",
              kNarrowRows, " query rows (s_q * h_q), got ", q.size(1) * q.size(2));
  TORCH_CHECK(tile_scheduler_metadata.has_value() == split_offsets.has_value(),
              "dense_decode: tile_scheduler_metadata and split_offsets go together");
  TORCH_CHECK(block_table.scalar_type() == at::kInt && block_table.stride(1) == 1 &&
                  cache_seqlens.scalar_type() == at::kInt && cache_seqlens.is_contiguous(),
              "dense_decode: block_table and cache_seqlens must be int32 with contiguous rows");
  DecodeParams params{};
  set_attn_sink("dense_decode", params, attn_sink, q, q.size(2));
  params.block_table = block_table.data_ptr<int>();
  params.block_table_stride = block_table.stride(0);
  // Capped so that its capacity in tokens fits an int (the lengths are ints: a larger table cuts nothing).
  params.block_table_blocks = static_cast<int>(std::min<int64_t>(block_table.size(1), INT32_MAX / kBlockN));
  params.cache_seqlens = cache_seqlens.data_ptr<int>();
  params.causal = causal;
  if (tile_scheduler_metadata.has_value()) {  // balanced: one CTA per part and row tile
    TORCH_CHECK(tile_scheduler_metadata->scalar_type() == at::kInt && tile_scheduler_metadata->is_contiguous() &&
                    tile_scheduler_metadata->dim() == 2 && tile_scheduler_metadata->size(1) >= 5 &&
                    split_offsets->scalar_type() == at::kInt && split_offsets->is_contiguous() &&
                    split_offsets->numel() == q.size(0) + 1,
                "dense_decode: tile_scheduler_metadata must be int32 (parts, 8), num_splits int32 (batch + 1,)");
    TORCH_CHECK(tile_scheduler_metadata->device() == q.device() && split_offsets->device() == q.device(),
                "dense_decode: tile_scheduler_metadata and num_splits must be on q's device");
    params.metadata = tile_scheduler_metadata->data_ptr<int>();
    params.metadata_fields = static_cast<int>(tile_scheduler_metadata->size(1));
    params.split_offsets = split_offsets->data_ptr<int>();
    num_splits = tile_scheduler_metadata->size(0);
  }
  return run_decode("dense_decode", q, kv_cache, is_fp8, false, softmax_scale, num_splits, params, narrow);
}

std::vector<torch::Tensor> sparse_decode(const torch::Tensor& q, const torch::Tensor& kv_cache,
                                         const torch::Tensor& indices, const c10::optional<torch::Tensor>& topk_length,
                                         double softmax_scale, bool is_fp8, int64_t num_splits,
                                         const c10::optional<torch::Tensor>& attn_sink,
                                         const c10::optional<torch::Tensor>& extra_kv_cache,
                                         const c10::optional<torch::Tensor>& extra_indices,
                                         const c10::optional<torch::Tensor>& extra_topk_length,
                                         int64_t extra_num_splits) {
  check_inputs("sparse_decode", q, kv_cache, is_fp8);
  check_sparse_indices(q, indices, topk_length, "indices", "topk_length");
  DecodeParams params{};
  set_attn_sink("sparse_decode", params, attn_sink, q, q.size(2));
  params.indices = indices.data_ptr<int>();
  params.indices_batch_stride = indices.stride(0);
  params.indices_seq_stride = indices.stride(1);
  params.topk_length = topk_length.has_value() ? topk_length->data_ptr<int>() : nullptr;
  params.topk = static_cast<int>(indices.size(2));
  if (!extra_kv_cache.has_value()) {
    TORCH_CHECK(!extra_indices.has_value() && !extra_topk_length.has_value(),
                "sparse_decode: extra_indices and extra_topk_length need extra_kv_cache");
    return run_decode("sparse_decode", q, kv_cache, is_fp8, true, softmax_scale, num_splits, params);
  }
  TORCH_CHECK(extra_indices.has_value(), "sparse_decode: extra_kv_cache needs extra_indices");
  check_inputs("sparse_decode", q, *extra_kv_cache, is_fp8);
  check_sparse_indices(q, *extra_indices, extra_topk_length, "extra_indices", "extra_topk_length");
  const ExtraCache extra{*extra_kv_cache,
                         extra_indices->data_ptr<int>(),
                         extra_indices->stride(0),
                         extra_indices->stride(1),
                         extra_topk_length.has_value() ? extra_topk_length->data_ptr<int>() : nullptr,
                         static_cast<int>(extra_indices->size(2)),
                         extra_num_splits};
  return run_decode("sparse_decode", q, kv_cache, is_fp8, true, softmax_scale, num_splits, params, false, &extra);
}

// Sparse prefill on the sparse decode kernel: each query token is a z of the grid (s_q = 1) with its own indices
// into the flat kv, read as 64-row blocks. One split per query (max_logits is written by the CTA itself).
std::vector<torch::Tensor> sparse_prefill(const torch::Tensor& q, const torch::Tensor& kv, const torch::Tensor& indices,
                                          const c10::optional<torch::Tensor>& topk_length, double softmax_scale,
                                          const c10::optional<torch::Tensor>& attn_sink) {
  TORCH_CHECK(q.is_cuda() && q.scalar_type() == at::kBFloat16 && q.dim() == 3 && q.size(2) == kHeadDimQK,
              "sparse_prefill: q must be CUDA bfloat16 (s_q, h_q, 576)");
  TORCH_CHECK(kv.scalar_type() == at::kBFloat16 && kv.dim() == 3 && kv.size(1) == 1 && kv.size(2) == kHeadDimQK &&
                  kv.stride(2) == 1 && kv.stride(0) % 8 == 0 && reinterpret_cast<uintptr_t>(kv.data_ptr()) % 16 == 0,
              "sparse_prefill: kv must be bfloat16 (s_kv, 1, 576) with 16-byte aligned rows");
  TORCH_CHECK(indices.scalar_type() == at::kInt && indices.dim() == 3 && indices.size(0) == q.size(0) &&
                  indices.size(1) == 1 && indices.stride(2) == 1,
              "sparse_prefill: indices must be int32 (s_q, 1, topk) with a contiguous last dimension");
  TORCH_CHECK(!topk_length.has_value() ||
                  (topk_length->scalar_type() == at::kInt && topk_length->is_contiguous() &&
                   topk_length->numel() == q.size(0)),
              "sparse_prefill: topk_length must be int32 (s_q,)");
  const torch::Tensor queries = q.unsqueeze(1);  // (s_q, 1, h_q, 576): one z per query token
  check_inputs("sparse_prefill", queries, torch::Tensor(), false);
  const int64_t s_q = q.size(0), h_q = q.size(1);
  auto max_logits = torch::empty({s_q, h_q}, q.options().dtype(at::kFloat));
  DecodeParams params{};
  set_attn_sink("sparse_prefill", params, attn_sink, q, h_q);
  params.indices = indices.data_ptr<int>();
  params.indices_batch_stride = indices.stride(0);
  params.indices_seq_stride = 0;
  params.topk_length = topk_length.has_value() ? topk_length->data_ptr<int>() : nullptr;
  params.topk = static_cast<int>(indices.size(2));
  params.kv = static_cast<const uint8_t*>(kv.data_ptr());
  params.kv_row_bytes = kv.stride(0) * kv.element_size();
  params.kv_block_bytes = kBlockN * params.kv_row_bytes;
  params.kv_slots = kv.size(0);
  params.max_logits = max_logits.data_ptr<float>();
  auto outputs = run_decode("sparse_prefill", queries, kv, false, true, softmax_scale, 1, params);
  return {outputs[0].squeeze(1), max_logits, outputs[1].view({s_q, h_q})};
}

}  // namespace flashmla
