// Dense paged MLA decode for few query rows (s_q * h_q <= 16: DeepSeek-V2-Lite's 16 heads, V3's 128 heads over 8
// GPUs) over the BF16 or FP8 latent cache on Hopper (sm_90a).
//
// dense_decode.cu puts the query rows on the wgmma M side, 64 of them: with 16 rows three quarters of its tensor
// work and of its Q reads are padding. Here the 64 tokens of a cache block are the M side and the query rows the N
// side (16), so nothing is padded:
//   S^T  = K Q^T                    (m64n16, K = 576: A = the block in shared memory, B = Q; FP8: see below)
//   m    = max(m, colmax(S^T))      (per query row: a maximum over the block's 64 tokens, four warps)
//   P^T  = exp2(S^T - m) -> shared  (bf16, the B operand of the next product)
//   O^T  = O^T * exp2(m_old - m) + V^T P^T   (m64n16 x 8 value tiles, K = 64 tokens: A = the block, transposed)
// The two warpgroups take alternate blocks of a piece, each with its own stage, softmax state and O^T, and merge
// them at the end of the piece: inside the loop neither waits for the other, so one's softmax and dequantisation run
// while the other's wgmma keeps the tensor cores busy. A stage is filled by TMA (BF16: the whole block, once P V is
// done; FP8: its RoPE columns, once Q K^T is done, and the latent dequantised from registers that each thread loads
// one own block ahead). FP8 Q K^T takes the latent's 32 k-steps with A from those registers: a thread's quarter of
// its two fragment rows, dequantised, is its A fragment once Q's columns are permuted to match, and the same words go
// to the stage for P V; only the RoPE columns' 4 k-steps read the stage. FP8 P V of a block runs under the
// dequantisation of the warpgroup's next own block, a value tile at a time, each tile of the stage rewritten once its
// P V has read it. The page of each block is read from the block table one own block before its loads are issued, so
// that no load waits on it. Value rows of the last block past the sequence's end are zeroed (BF16) or stored as zeros
// (FP8) before P V.
//
// FP8 runs on f16 operands: e4m3 widens to f16 in one conversion (to bf16 it takes five instructions, and widening
// was the loop's longest phase). A token's latent goes to the stage relative to its largest tile scale 2^e
// (widen_fp8_unit), so Q K^T over the latent gives its score / 2^e; Q is stored times 2^-q per query row (q from the
// row's largest value) so that it fits f16 too, and the RoPE columns stay bf16 in their own accumulator:
//   S    = (S_latent * 2^e * 2^q + S_rope) * scale * log2(e)
// The 2^e of a token is its weight's in P V: the softmax keeps its maximum m over S + e, not S, and
//   P^T  = exp2(S + e - m) -> shared (f16: <= 1, and the block's largest products exact whatever the scales)
//   l    = l * exp2(m_old - m) + sum exp2(S - m),   O^T = O^T * exp2(m_old - m) + V^T P^T
// so that O^T / l is the softmax's output and m + log2(l) its LSE, as with the BF16 cache.
#include <c10/cuda/CUDAException.h>

#include "decode_common.cuh"

namespace flashmla::decode {
namespace {

using namespace sm90;

constexpr int kRows = kNarrowRows;             // wgmma N: query rows per CTA
constexpr int kThreads = 256;                  // two warpgroups
constexpr int kGroupThreads = 128;
constexpr int kQTileBytes = kRows * 128;       // one 64-column swizzled tile of kRows rows (Q, P^T)
constexpr int kValueTiles = kLatentDim / 64;   // O^T: 8 tiles of 64 value columns
constexpr int kAcc = kRows / 2;                // float32 registers of one m64 x kRows accumulator
constexpr int kMine = kRows / 4;               // query rows (accumulator columns) a thread holds
static_assert(kRows == 16, "the wgmma wrappers are m64n16");

// Shared memory, in bytes from a 1024-aligned base: one KV stage per warpgroup, Q, one P^T per warpgroup, the
// per-warp column maxima and sums, the warpgroups' final maxima, Q's row scales (FP8), the stages' mbarriers.
struct Layout {
  static constexpr int kKv = 0;
  static constexpr int kQ = kKv + 2 * kMatrixBytes;
  static constexpr int kP = kQ + kColumnTiles * kQTileBytes;
  static constexpr int kWarpMax = kP + 2 * kQTileBytes;         // float [2 warpgroups][4 warps][kRows]
  static constexpr int kWarpSum = kWarpMax + 2 * 4 * kRows * 4;  // float [2][4][kRows]
  static constexpr int kGroupMax = kWarpSum + 2 * 4 * kRows * 4;  // float [2][kRows]
  static constexpr int kQScale = kGroupMax + 2 * kRows * 4;      // float [kRows]: FP8, 2^q of each query row
  static constexpr int kBarriers = kQScale + kRows * 4;          // uint64_t [2]
  static constexpr int kBytes = kBarriers + 2 * 8 + 1024;        // + slack to align the base to 1024
  static_assert(kBytes <= 227 * 1024, "shared memory");
};
// At the end of a piece the stages carry the O^T halves the warpgroups exchange, then the output rows staged for
// 16-byte stores (float32 partials or bf16 out; the padding spreads a warp's four rows over the banks).
constexpr int kExchangeBytes = 2 * 4 * (kAcc / 4) * kGroupThreads * 16;
constexpr int kStagedStride = kLatentDim * 4 + 16;
static_assert(kExchangeBytes + kRows * kStagedStride <= 2 * kMatrixBytes, "the exchange and staged rows fit");

// Blocks [begin, end) of sequence `batch`: warpgroup w takes blocks begin + w, begin + w + 2, ... `fills` counts the
// fills of this warpgroup's stage by earlier pieces (the mbarrier phase carries on from them).
template <bool kFp8>
__device__ __forceinline__ void attend_piece(const DecodeParams& p, uint8_t* shared, int batch, int begin, int end,
                                             int64_t out_slot, int& fills) {
  const int warpgroup = warp_uniform(threadIdx.x / kGroupThreads), thread = threadIdx.x % kGroupThreads;
  const int warp = thread / 32, lane = threadIdx.x % 32;
  const int group_barrier = 2 + warpgroup;  // named barrier of this warpgroup's 128 threads
  uint8_t* stage_bytes = shared + Layout::kKv + warpgroup * kMatrixBytes;
  uint8_t* probs_bytes = shared + Layout::kP + warpgroup * kQTileBytes;
  const uint32_t stage = smem_address(stage_bytes), probs = smem_address(probs_bytes);
  const uint32_t q_tile = smem_address(shared + Layout::kQ);
  const uint32_t barrier = smem_address(shared + Layout::kBarriers + warpgroup * 8);
  // wgmma descriptors: the stage as K (K-major) and as V^T (MN-major, tiles kTileBytes apart), Q, P^T
  const uint64_t stage_desc = smem_descriptor(stage, 16, 1024);
  const uint64_t stage_desc_mn = smem_descriptor(stage, kTileBytes, 1024);
  const uint64_t q_desc = smem_descriptor(q_tile, 16, 1024), probs_desc = smem_descriptor(probs, 16, 1024);
  float* warp_max = reinterpret_cast<float*>(shared + Layout::kWarpMax) + warpgroup * 4 * kRows;
  float* warp_sum = reinterpret_cast<float*>(shared + Layout::kWarpSum);
  float* group_max = reinterpret_cast<float*>(shared + Layout::kGroupMax);
  const int length = visible_length<false>(p, batch);  // cut at the table's capacity

  // This thread's accumulator columns: query rows n = 8 i + 2 (lane % 4) + c, kept as index 2 i + c; its rows: tokens
  // (S^T) or value columns (O^T) 16 warp + lane / 4 + 8 h of each 64-row tile.
  const auto column = [&](int index) { return 8 * (index / 2) + 2 * (lane % 4) + index % 2; };
  int visible[kMine];
#pragma unroll
  for (int index = 0; index < kMine; ++index) {
    const int n = column(index), query = n / p.h_q;
    visible[index] = n >= p.rows ? 0 : (p.causal ? length - p.s_q + query + 1 : length);
  }

  // FP8: this thread dequantises quarter lane % 4 (units lane % 4 + 4 k, see load_fp8_share) of block rows share_row
  // and share_row + 8, its rows of the wgmma A fragment, from registers loaded one own block (two blocks) ahead. An
  // 8-lane phase holds rows r and r + 1 (r even): their stage stores do not share a bank.
  const int share_row = 16 * warp + lane / 4;
  Fp8Share share[2];
  const auto load_share = [&](int block, int page) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      load_fp8_share(share[half], page_row_address(p, page, block, share_row + 8 * half, length));
    }
  };
  const auto fill_stage = [&](int page) {  // one thread
    if constexpr (kFp8) {
      load_rope_page(p, stage, barrier, page);
    } else {
      load_kv_page(p, stage, barrier, page);
    }
  };
  // The pages of this warpgroup's blocks are read an own block before they are needed: `next_page` is the page of
  // block + 2 (the block whose loads this iteration issues), read during the previous iteration.
  const auto page_of = [&](int block) { return block < end ? block_page(p, batch, block) : 0; };

  const int first_block = begin + warpgroup;
  if (first_block < end) {
    const int page = page_of(first_block);
    if (thread == 0) fill_stage(page);
    if constexpr (kFp8) load_share(first_block, page);
  }
  int next_page = page_of(first_block + 2);
  if (begin < end) {
    const auto q_row = [&](int n) {
      return p.q + batch * p.q_batch_stride + (n / p.h_q) * p.q_seq_stride + (n % p.h_q) * p.q_head_stride;
    };
    // FP8: Q's latent columns permuted within each 64-column tile to match the register A fragments of Q K^T (below):
    // column 16 t + 4 s + 2 h + e (t, s < 4; h, e < 2) goes to position 16 s + 2 t + 8 h + e, where k-step s of the
    // tile reads it at the fragment's k 2 t + 8 h + e. The sum over columns is the same in any order.
    // Its latent columns in f16, divided by the row's query_row_scale 2^q.
    constexpr int kFirstChunk = kFp8 ? kLatentDim / 8 : 0;
    if constexpr (kFp8) {
      float* q_scale = reinterpret_cast<float*>(shared + Layout::kQScale);
      for (int n = threadIdx.x / 32; n < kRows; n += kThreads / 32) {
        float largest = 0.f;
        if (n < p.rows) {
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const uint4 chunk = *reinterpret_cast<const uint4*>(q_row(n) + 8 * (lane + 32 * half));
            const uint32_t words[4] = {chunk.x, chunk.y, chunk.z, chunk.w};
#pragma unroll
            for (int w = 0; w < 4; ++w) {
              const float2 values = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&words[w]));
              largest = fmaxf(largest, fmaxf(fabsf(values.x), fabsf(values.y)));
            }
          }
        }
#pragma unroll
        for (int offset = 1; offset < 32; offset *= 2) {
          largest = fmaxf(largest, __shfl_xor_sync(0xffffffffu, largest, offset));
        }
        if (lane == 0) q_scale[n] = query_row_scale(largest);
      }
      __syncthreads();
      for (int i = threadIdx.x; i < kRows * kLatentDim / 2; i += kThreads) {
        const int n = i / (kLatentDim / 2), column = 2 * (i % (kLatentDim / 2)), c = column % 64;
        const int position = 16 * ((c % 16) / 4) + 2 * (c / 16) + 8 * ((c % 4) / 2);
        const uint32_t pair = n < p.rows ? *reinterpret_cast<const uint32_t*>(q_row(n) + column) : 0u;
        const float2 values = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&pair));
        const float inverse = 1.f / q_scale[n];  // a power of two: exact
        const __half2 scaled = __floats2half2_rn(values.x * inverse, values.y * inverse);
        *reinterpret_cast<__half2*>(shared + Layout::kQ + (column / 64) * kQTileBytes +
                                    swizzled_offset(n, position / 8) + 2 * (position % 8)) = scaled;
      }
    }
    for (int i = threadIdx.x; i < kRows * (kChunksPerRow - kFirstChunk); i += kThreads) {
      const int n = i / (kChunksPerRow - kFirstChunk), chunk = kFirstChunk + i % (kChunksPerRow - kFirstChunk);
      const bool valid = n < p.rows;  // rows past p.rows: zeros, and no address formed
      cp_async_16(q_tile + (chunk / 8) * kQTileBytes + swizzled_offset(n, chunk % 8),
                  valid ? q_row(n) + chunk * 8 : p.q, valid);
    }
    cp_async_commit();
  }
  cp_async_wait<0>();
  fence_async_shared();
  __syncthreads();
  cta_mark(0);

  float out_acc[kValueTiles][kAcc];
#pragma unroll
  for (int t = 0; t < kValueTiles; ++t) {
#pragma unroll
    for (int i = 0; i < kAcc; ++i) out_acc[t][i] = 0.f;
  }
  float query_max[kMine], query_sum[kMine];  // query_sum: this thread's tokens only, reduced at the end
#pragma unroll
  for (int index = 0; index < kMine; ++index) {
    query_max[index] = -INFINITY;
    query_sum[index] = 0.f;
  }
  float scores[kAcc];
  // FP8: the RoPE columns' scores, the 2^q of this thread's query rows (times scale * log2(e)), and the 2^e of its
  // two token rows in the block
  float rope_scores[kAcc], query_factor[kMine];
  Fp8RowExponent token_exponent[2];
  if constexpr (kFp8) {
#pragma unroll
    for (int index = 0; index < kMine; ++index) {
      query_factor[index] = reinterpret_cast<const float*>(shared + Layout::kQScale)[column(index)] * p.scale_log2;
    }
  }

  // O^T += V^T P^T over value tile t (64 of the 512 columns): issued, not committed. FP8: a block's P V runs under the
  // dequantisation of the warpgroup's next own block, a tile at a time, or after the loop for its last.
  const auto issue_value_tile = [&](int t) {
#pragma unroll
    for (int k = 0; k < kBlockN / 16; ++k) {
      wgmma_m64n16k16_ss<1, kFp8 ? Operands::kF16 : Operands::kBf16>(
          out_acc[t], descriptor_plus(stage_desc_mn, t * kTileBytes + k * 16 * 128), descriptor_plus(probs_desc, k * 32),
          1);
    }
  };
  // O^T += V^T P^T over every value tile, waited for.
  const auto run_value_tiles = [&] {
    wgmma_fence();
#pragma unroll
    for (int t = 0; t < kValueTiles; ++t) issue_value_tile(t);
    wgmma_commit();
    wgmma_wait<0>();
  };

  int own = 0;
  // PhaseClock phases: 0 FP8 dequantisation and the next own block's loads, 1 wait for the stage (FP8: its RoPE
  // tile), 2 BF16 tail zeroing and barrier (FP8: the wgmma issue of Q K^T over the latent and of the previous own
  // block's P V), 3 Q K^T from the stage (FP8: over the RoPE columns), 4 column maxima, 5 P^T and the O^T rescale,
  // 6 BF16 O^T += V^T P^T (FP8: the barrier before a unit's stores), 7 BF16 barrier and next TMA, loop (FP8: and the
  // stage stores), 8 FP8 the unit loop's wgmma waits (and before unit 0 the row exponents and the pending P V's
  // first two tiles).
  PhaseClock clock;
  // One own block; `pending_constant` (FP8), a std::bool_constant: whether this warpgroup's previous block's P V is
  // still to run. The first block is peeled off so that no wgmma is in flight where two code paths join (ptxas
  // serialises the wgmmas otherwise, C7514).
  const auto iteration = [&](int block, auto pending_constant) {
    constexpr bool pending = decltype(pending_constant)::value;
    clock.mark(7);
    const int page_after = kFp8 || thread == 0 ? page_of(block + 4) : 0;  // BF16: only thread 0 issues loads
    if constexpr (kFp8) {
      // S^T = K Q^T over the latent, a unit (4 k-steps, 64 columns) at a time: the thread's two rows of the unit,
      // dequantised, are its A fragments (against Q's permuted columns) and go to the stage for P V. The words of
      // unit k stay untouched until its wgmmas are done: two buffers, and a wait for unit k - 2's before reuse. With
      // the previous own block's P V pending (tiles 0 and 1 issued first), the wgmma groups go P V tile k + 2, Q K^T
      // unit k: the wait before unit k's words are rewritten (for Q K^T unit k - 2, and so for P V tile k, issued
      // before it; unit 0: for tile 0, unit 7: for Q K^T unit 5) and a barrier of the warpgroup (the other warps'
      // part of that P V) come before unit k's stores into tile k.
      uint32_t unit_words[2][2][8];
#pragma unroll
      for (int half = 0; half < 2; ++half) token_exponent[half] = fp8_row_exponent(share[half].scales);
      if constexpr (pending) {  // P V tiles 0 and 1, a group each
        wgmma_fence();
        issue_value_tile(0);
        wgmma_commit();
        issue_value_tile(1);
        wgmma_commit();
      }
#pragma unroll
      for (int k = 0; k < kFp8UnitsPerQuarter; ++k) {
        uint32_t(&words)[2][8] = unit_words[k % 2];
        if constexpr (pending) {
          if (k == 0 || k == kFp8UnitsPerQuarter - 1) {
            wgmma_wait<1>();
          } else {
            wgmma_wait<2>();
          }
        } else if (k >= 2) {
          wgmma_wait<1>();
        }
        clock.mark(8);
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          fence_registers(words[half]);  // rewritten only after the wait
          widen_fp8_unit(share[half], k, token_exponent[half].inverse, words[half]);
        }
        clock.mark(0);
        if constexpr (pending) named_barrier_sync(group_barrier, kGroupThreads);
        clock.mark(6);
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          store_fp8_unit(words[half], stage_bytes, k, share_row + 8 * half, false);
        }
        clock.mark(7);
        wgmma_fence();
        if (pending && k + 2 < kValueTiles) {
          issue_value_tile(k + 2);
          wgmma_commit();
        }
#pragma unroll
        for (int step = 0; step < 4; ++step) {
          const uint32_t a[4] = {words[0][2 * step], words[1][2 * step], words[0][2 * step + 1],
                                 words[1][2 * step + 1]};
          wgmma_m64n16k16_rs<Operands::kF16>(scores, a, descriptor_plus(q_desc, k * kQTileBytes + step * 32),
                                             k + step > 0);
        }
        wgmma_commit();
        clock.mark(2);
      }
      if (block + 2 < end) load_share(block + 2, next_page);
    }
    clock.mark(0);
    mbarrier_wait(barrier, (fills + own) & 1);
    clock.mark(1);
    if constexpr (!kFp8) {
      const int valid_rows = length - block * kBlockN;
      if (valid_rows < kBlockN) zero_value_rows(stage_bytes, valid_rows, thread, kGroupThreads);
      fence_async_shared();
      named_barrier_sync(group_barrier, kGroupThreads);
    }
    clock.mark(2);

    // S^T = K Q^T from the stage: all 576 columns (BF16), the RoPE columns (FP8). The FP8 stage's latent rows, stored
    // above, are published to P V's wgmma by the fence and barrier before P V.
    wgmma_fence();
    constexpr int kFirstStep = kFp8 ? kLatentDim / 16 : 0;
#pragma unroll
    for (int k = kFirstStep; k < kHeadDimQK / 16; ++k) {
      wgmma_m64n16k16_ss<0>(kFp8 ? rope_scores : scores,
                            descriptor_plus(stage_desc, (k / 4) * kTileBytes + (k % 4) * 32),
                            descriptor_plus(q_desc, (k / 4) * kQTileBytes + (k % 4) * 32), k > kFirstStep);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_registers(scores);
    if constexpr (kFp8) {
      fence_registers(rope_scores);
#pragma unroll
      for (int t = 0; t < kValueTiles; ++t) fence_registers(out_acc[t]);  // the previous own block's P V is done
    }
    clock.mark(3);

    // Column softmax: scale and mask, the block's maximum per query row (FP8: of S + e) over the warp's 16 tokens
    // (lanes of one lane % 4), then over the four warps.
    float block_max[kMine];
#pragma unroll
    for (int index = 0; index < kMine; ++index) block_max[index] = -INFINITY;
#pragma unroll
    for (int i = 0; i < kAcc; ++i) {
      const int index = 2 * (i / 4) + i % 2, half = (i / 2) % 2;
      const int token = block * kBlockN + 16 * warp + lane / 4 + 8 * half;
      if constexpr (kFp8) {
        scores[i] = token < visible[index]
                        ? fmaf(scores[i] * token_exponent[half].scale, query_factor[index],
                               rope_scores[i] * p.scale_log2)
                        : -INFINITY;
        block_max[index] = fmaxf(block_max[index], scores[i] + token_exponent[half].exponent);
      } else {
        scores[i] = token < visible[index] ? scores[i] * p.scale_log2 : -INFINITY;
        block_max[index] = fmaxf(block_max[index], scores[i]);
      }
    }
#pragma unroll
    for (int index = 0; index < kMine; ++index) {
#pragma unroll
      for (int offset = 4; offset < 32; offset *= 2) {
        block_max[index] = fmaxf(block_max[index], __shfl_xor_sync(0xffffffffu, block_max[index], offset));
      }
      if (lane < 4) warp_max[warp * kRows + column(index)] = block_max[index];
    }
    named_barrier_sync(group_barrier, kGroupThreads);
    clock.mark(4);
    // FP8: only Q K^T reads the stage's RoPE tile, and every warp's Q K^T is done: it takes the next own block's.
    if (kFp8 && thread == 0 && block + 2 < end) fill_stage(next_page);
    float shift[kMine], rescale[kMine];
#pragma unroll
    for (int index = 0; index < kMine; ++index) {
      float new_max = query_max[index];
#pragma unroll
      for (int w = 0; w < 4; ++w) new_max = fmaxf(new_max, warp_max[w * kRows + column(index)]);
      shift[index] = new_max == -INFINITY ? 0.f : new_max;
      rescale[index] = exp2f(query_max[index] - shift[index]);
      query_max[index] = new_max;
      query_sum[index] *= rescale[index];
    }
#pragma unroll
    for (int i = 0; i < kAcc; ++i) {
      const int index = 2 * (i / 4) + i % 2, half = (i / 2) % 2, token = 16 * warp + lane / 4 + 8 * half;
      uint8_t* probability_at = probs_bytes + swizzled_offset(column(index), token / 8) + 2 * (token % 8);
      const float probability = exp2f(scores[i] - shift[index]);
      query_sum[index] += probability;
      if constexpr (kFp8) {
        *reinterpret_cast<__half*>(probability_at) =
            __float2half_rn(exp2f(scores[i] + token_exponent[half].exponent - shift[index]));
      } else {
        *reinterpret_cast<__nv_bfloat16*>(probability_at) = __float2bfloat16_rn(probability);
      }
    }
#pragma unroll
    for (int t = 0; t < kValueTiles; ++t) {
#pragma unroll
      for (int i = 0; i < kAcc; ++i) out_acc[t][i] *= rescale[2 * (i / 4) + i % 2];
    }
    fence_async_shared();
    named_barrier_sync(group_barrier, kGroupThreads);
    clock.mark(5);

    // O^T += V^T P^T (FP8: under the next own block's dequantisation, or after the loop)
    if constexpr (!kFp8) {
      run_value_tiles();
#pragma unroll
      for (int t = 0; t < kValueTiles; ++t) fence_registers(out_acc[t]);
      clock.mark(6);
      // Every warp's wgmma has read the stage and P^T: the stage takes this warpgroup's next block.
      named_barrier_sync(group_barrier, kGroupThreads);
      if (thread == 0 && block + 2 < end) fill_stage(next_page);
    }
    next_page = page_after;
  };
  int block = first_block;
  if (kFp8 && block < end) {
    iteration(block, std::false_type{});
    block += 2;
    ++own;
    cta_mark(1);
  }
  for (; block < end; block += 2, ++own) {
    iteration(block, std::bool_constant<kFp8>{});
    if (!kFp8 && own == 0) cta_mark(1);
  }
  if constexpr (kFp8) {  // the rest of the last own block's P V
    if (own > 0) run_value_tiles();
#pragma unroll
    for (int t = 0; t < kValueTiles; ++t) fence_registers(out_acc[t]);
  }
  clock.mark(7);
  clock.report(kFp8 ? "narrow fp8" : "narrow bf16", own);
  cta_mark(2);
  fills += own;

  // Merge the warpgroups: each finishes half of the value columns (warpgroup 0 tiles 0..3, 1 tiles 4..7) from its own
  // O^T and the other's, weighted by exp2(m_w - m).
#pragma unroll
  for (int index = 0; index < kMine; ++index) {
#pragma unroll
    for (int offset = 4; offset < 32; offset *= 2) {
      query_sum[index] += __shfl_xor_sync(0xffffffffu, query_sum[index], offset);
    }
    if (lane < 4) warp_sum[(warpgroup * 4 + warp) * kRows + column(index)] = query_sum[index];
    if (warp == 0 && lane < 4) group_max[warpgroup * kRows + column(index)] = query_max[index];
  }
  __syncthreads();  // both warpgroups are done with their stages: the exchange may use them
  float4* exchange = reinterpret_cast<float4*>(shared + Layout::kKv);  // [to warpgroup][tile][float4][thread]
  const auto exchange_at = [&](int to, int t, int quad) {
    return exchange + ((to * 4 + t) * (kAcc / 4) + quad) * kGroupThreads + thread;
  };
#pragma unroll
  for (int t = 0; t < 4; ++t) {
#pragma unroll
    for (int quad = 0; quad < kAcc / 4; ++quad) {
      float sent[4];  // selected element by element: the accumulators stay in registers
#pragma unroll
      for (int e = 0; e < 4; ++e) sent[e] = warpgroup == 0 ? out_acc[4 + t][4 * quad + e] : out_acc[t][4 * quad + e];
      *exchange_at(1 - warpgroup, t, quad) = make_float4(sent[0], sent[1], sent[2], sent[3]);
    }
  }
  __syncthreads();
  const bool direct = out_slot < 0;
  float mine_weight[kMine], other_weight[kMine], inverse[kMine], total_max[kMine], total_sum[kMine];
#pragma unroll
  for (int index = 0; index < kMine; ++index) {
    const int n = column(index);
    const float mine_max = query_max[index], other_max = group_max[(1 - warpgroup) * kRows + n];
    total_max[index] = fmaxf(mine_max, other_max);
    mine_weight[index] = total_max[index] == -INFINITY ? 0.f : exp2f(mine_max - total_max[index]);
    other_weight[index] = total_max[index] == -INFINITY ? 0.f : exp2f(other_max - total_max[index]);
    float mine_sum = 0.f, other_sum = 0.f;
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      mine_sum += warp_sum[(warpgroup * 4 + w) * kRows + n];
      other_sum += warp_sum[((1 - warpgroup) * 4 + w) * kRows + n];
    }
    total_sum[index] = mine_sum * mine_weight[index] + other_sum * other_weight[index];
    // partials are normalised by their own sum (the combine adds the sink)
    const float denominator =
        direct ? sink_denominator(p.attn_sink, n % p.h_q, total_sum[index], total_max[index]) : total_sum[index];
    inverse[index] = total_sum[index] > 0.f ? 1.f / denominator : 0.f;
  }
  cta_mark(3);
  // The merged rows go to shared memory (after the exchange), then out in 16-byte chunks: a warp's stores are 512
  // contiguous bytes of one row, where a thread's own elements were 4-byte (2-byte) stores of four rows.
  uint8_t* staged = shared + Layout::kKv + kExchangeBytes;
#pragma unroll
  for (int t = 0; t < 4; ++t) {
#pragma unroll
    for (int quad = 0; quad < kAcc / 4; ++quad) {
      const float4 received = *exchange_at(warpgroup, t, quad);
      const float other[4] = {received.x, received.y, received.z, received.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = 4 * quad + e, index = 2 * (i / 4) + i % 2, n = column(index);
        const int value_col = 64 * (4 * warpgroup + t) + 16 * warp + lane / 4 + 8 * ((i / 2) % 2);
        const float kept = warpgroup == 0 ? out_acc[t][i] : out_acc[4 + t][i];
        const float value = (kept * mine_weight[index] + other[e] * other_weight[index]) * inverse[index];
        if (direct) {
          *reinterpret_cast<__nv_bfloat16*>(staged + n * kStagedStride + value_col * 2) = __float2bfloat16_rn(value);
        } else {
          *reinterpret_cast<float*>(staged + n * kStagedStride + value_col * 4) = value;
        }
      }
    }
  }
  __syncthreads();
  const int chunks = direct ? kLatentDim * 2 / 16 : kLatentDim * 4 / 16;  // 16-byte chunks of a row
  for (int c = threadIdx.x; c < p.rows * chunks && c < kRows * chunks; c += kThreads) {
    const int n = c / chunks, chunk = c % chunks;
    void* row_start = direct ? static_cast<void*>(p.out + batch * p.out_batch_stride + (n / p.h_q) * p.out_seq_stride +
                                                   (n % p.h_q) * p.out_head_stride)
                             : static_cast<void*>(p.out_partial + (out_slot * p.rows + n) * kLatentDim);
    reinterpret_cast<uint4*>(row_start)[chunk] =
        *reinterpret_cast<const uint4*>(staged + n * kStagedStride + chunk * 16);
  }
  if (warpgroup == 0 && warp == 0 && lane < 4) {
#pragma unroll
    for (int index = 0; index < kMine; ++index) {
      const int n = column(index);
      if (n >= p.rows) continue;
      const bool seen = total_sum[index] > 0.f;
      if (direct) {
        p.lse[(static_cast<int64_t>(batch) * p.h_q + n % p.h_q) * p.s_q + n / p.h_q] =
            seen ? (total_max[index] + log2f(total_sum[index])) * kLn2 : INFINITY;
      } else {
        p.lse_partial[out_slot * p.rows + n] = seen ? total_max[index] + log2f(total_sum[index]) : -INFINITY;
      }
    }
  }
  cta_mark(4);
  // The exchange and the staged rows are read; their generic writes are ordered before the next piece's TMA into the
  // stages.
  fence_async_shared();
  __syncthreads();
  cta_mark(5);
}

template <bool kFp8>
__global__ void __launch_bounds__(kThreads, 1) narrow_decode_kernel(const __grid_constant__ DecodeParams p) {
  extern __shared__ uint8_t raw_shared[];
  const CtaClock cta_clock;
  uint8_t* shared = prepare_shared(raw_shared, Layout::kBarriers);
  int fills = 0;
  for_each_piece<false>(p, [&](int z, int begin, int end, int64_t slot) {
    attend_piece<kFp8>(p, shared, z, begin, end, slot, fills);
  });
  cta_clock.report(kFp8 ? "narrow fp8" : "narrow bf16");
}

}  // namespace

template <bool kFp8>
void launch_narrow_decode(const DecodeParams& params, dim3 grid, cudaStream_t stream) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(narrow_decode_kernel<kFp8>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      Layout::kBytes));
  narrow_decode_kernel<kFp8><<<grid, kThreads, Layout::kBytes, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  print_phases(stream);
}

template void launch_narrow_decode<false>(const DecodeParams&, dim3, cudaStream_t);
template void launch_narrow_decode<true>(const DecodeParams&, dim3, cudaStream_t);

}  // namespace flashmla::decode
