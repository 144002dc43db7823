// What the two paged decode kernels share: the launch parameters, the cache-block loaders (TMA boxes, the FP8 latent
// through registers), how a CTA's grid coordinates map to pieces of work, and the launcher of the few-rows kernel.
//   dense_decode.cu        64 query rows per CTA (the rows are the wgmma M side): h_q * s_q > 16, sparse, prefill
//   dense_decode_narrow.cu up to 16 query rows per CTA (the cache block is the wgmma M side)
#pragma once
#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "fp8_layout.cuh"
#include "sm90.cuh"

namespace flashmla::decode {

constexpr int kBlockN = 64;                    // tokens per cache block (page_block_size) and per KV tile
constexpr int kColumnTiles = kHeadDimQK / 64;  // 9 swizzled 64-column tiles per 576-wide row
constexpr int kChunksPerRow = kHeadDimQK / 8;  // 72 16-byte chunks
constexpr int kTileBytes = 64 * 128;           // one 64-row swizzled column tile
constexpr int kMatrixBytes = kColumnTiles * kTileBytes;
constexpr int kMaxSplits = 1024;
constexpr int kNarrowRows = 16;  // query rows (s_q * h_q) up to which dense decode runs dense_decode_narrow.cu
                                 // (flashmla_ops/decode.py's CUDA_NARROW_ROWS, the same number)
constexpr float kLn2 = 0.69314718055994530942f;
constexpr float kLog2e = 1.44269504088896340736f;

struct DecodeParams {
  // (64 columns, 64 rows, tiles, num_blocks) as bf16, 128 bytes between tiles: BF16 cache nine tiles, FP8 cache
  // its RoPE tile; a box is a whole block's tiles, 128-byte swizzle.
  CUtensorMap kv_map;
  // BF16 cache: the same view, a box a third of a block's tiles (attend_pairs fills a stage in three parts).
  CUtensorMap kv_part_map;
  // attend_pairs' Q tile in one TMA (when q_by_tma): q as (64 columns, h_q, s_q, 9 tiles, batch), 128 bytes between
  // tiles; a box is the tile's 64 rows, (query, head) pairs as the CTA's rows are, of all nine tiles, heads and
  // queries past the end zero.
  CUtensorMap q_map;
  bool q_by_tma;
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
  float* max_logits;   // sparse prefill: (batch, h_q, s_q), the largest scaled logit (natural units); else nullptr
  // Split partials (num_splits > 1, a balanced schedule, or sparse decode's extra cache): slot s of query row r at
  // [s * rows + r]. The narrow kernel writes float32 rows (out_partial); dense_decode.cu's kernels f16 rows
  // (out_partial16) scaled into f16's range by the power of two scale_partial holds (f16_row_exponent).
  float* out_partial;     // (slots, rows, 512)
  __half* out_partial16;  // (slots, rows, 512)
  float* lse_partial;     // (slots, rows), base 2
  float* scale_partial;   // (slots, rows): out_partial16's row times this is the partial
  int h_q, s_q, rows, num_splits;
  int queries_per_z;   // dense: 1 (a CTA's rows are (s_q, h_q) pairs); sparse: s_q (grid z = batch * s_q + query)
  float scale_log2;
  bool causal;
  // Sparse decode: query (b, i) attends to cache slots indices[b, i, :length], length = min(topk_length[b], topk)
  // (flat block * 64 + row; -1 or >= kv_slots = none). Sparse prefill: the same over a flat kv (blocks of 64 rows).
  const int* indices;
  int64_t kv_slots;
  int64_t indices_batch_stride, indices_seq_stride;
  const int* topk_length;  // nullptr: topk
  int topk;
  // Balanced schedule (dense): grid y = parts of get_mla_metadata; part p covers blocks [begin_block of begin_batch,
  // end_block of end_batch) and sequence b's partials are slots split_offsets[b] .. split_offsets[b + 1] - 1 (one
  // slot: written straight to the output), of the partial_slots (batch + parts, from the shapes) the launch holds.
  // nullptr: the uniform split over grid y.
  const int* metadata;
  const int* split_offsets;
  int metadata_fields, batch, partial_slots;
  // Dense: the block table's columns; lengths are cut at their capacity (see block_page).
  int block_table_blocks;
  // (h_q,) float32 per-head sinks, or nullptr: out scaled by exp(lse) / (exp(lse) + exp(sink)), lse unchanged
  // (sink_denominator). Applied where a row is normalised for out: a piece's direct store, or the combine.
  const float* attn_sink;
  // Uniform split partials: split y of grid row z writes slot z * slots_per_z + first_slot + y (sparse decode with an
  // extra cache: the second launch's splits follow the first's, and one combine merges both).
  int slots_per_z, first_slot;
};

// The denominator that normalises a row whose softmax sums to `total` relative to the base-2 maximum `row_max`, with
// head `head`'s attention sink (natural units) as one more logit that contributes no value: total + 2^(sink log2 e -
// row_max). `total` where there is no sink, or where the row saw no token (its output 0 whatever the sink, as the
// reference's; an infinite sink would make it NaN).
__device__ __forceinline__ float sink_denominator(const float* attn_sink, int head, float total, float row_max) {
  return attn_sink == nullptr || !(total > 0.f) ? total : total + exp2f(fmaf(attn_sink[head], kLog2e, -row_max));
}

// Tokens a query of grid row z sees (dense: its sequence's length; sparse: its index count).
template <bool kSparse>
__device__ __forceinline__ int visible_length(const DecodeParams& p, int z) {
  const int batch = z / p.queries_per_z;
  return kSparse ? (p.topk_length != nullptr ? min(p.topk_length[batch], p.topk) : p.topk)
                 : min(p.cache_seqlens[batch], p.block_table_blocks * kBlockN);
}

// Sequence z's partial slots in a balanced schedule, split_offsets[z + 1] - split_offsets[z] in int32, wrapping
// (whatever the tensor holds): for_each_piece and combine_slots both take it here, so they agree on which sequences
// have one slot (written straight to the output, not combined).
__device__ __forceinline__ int slot_count(const int* split_offsets, int z) {
  return static_cast<int>(static_cast<unsigned>(split_offsets[z + 1]) - split_offsets[z]);
}

// This CTA's pieces of work: `attend(z, begin, end, slot)` for blocks [begin, end) of grid row z, the output going
// straight to out / lse (slot < 0) or to partial slot `slot`. Balanced: the part's run of blocks over
// sequences first..last; uniform: one piece, grid z's share blockIdx.y. A sequence's last piece runs to its end
// whatever end_block says: a schedule made for other lengths of the same batch (reused after a write to
// cache_seqlens that its version counter missed; values are checked only on the CPU or with FLASHMLA_CHECK=1) then
// still covers every block, where it left the blocks past its old length unread; pieces past a shorter length are
// empty. Whatever the two tensors hold (made by hand, halves of two calls), a piece stays within the batch, its
// sequence's blocks and the launch's partial slots: sequences cut to [0, batch), blocks to [0, num_blocks), slots to
// [0, partial_slots) (as combine_slots cuts them), so wrong metadata gives a wrong output, never an access outside
// them, and a part takes at most batch pieces.
template <bool kSparse, typename Attend>
__device__ __forceinline__ void for_each_piece(const DecodeParams& p, Attend attend) {
  const bool balanced = !kSparse && p.metadata != nullptr;
  const int* meta = balanced ? p.metadata + blockIdx.y * p.metadata_fields : nullptr;
  const int first = balanced ? max(meta[0], 0) : blockIdx.z;
  const int last = balanced ? min(meta[2], p.batch - 1) : blockIdx.z;
  for (int z = first; z <= last; ++z) {  // one call site: the piece's code is inlined once
    const int num_blocks = (visible_length<kSparse>(p, z) + kBlockN - 1) / kBlockN;
    int begin, end;
    int64_t slot;
    if (balanced) {
      // The slot cut in unsigned 32 bits, a negative one to the last (in int64, ptxas took 245 -> 254 registers in
      // the wide FP8 kernel with partials), then back to int (below partial_slots): `slots == 1 ? -1 : <unsigned>`
      // would convert the -1 to unsigned, 2^32 - 1, a slot far past the partials (stop 69's first GPU run).
      const int first_slot = p.split_offsets[z];
      const int slots = slot_count(p.split_offsets, z);
      const int piece = z == first ? meta[4] : 0;  // of the sequence's `slots` pieces
      begin = z == first ? min(max(meta[1], 0), num_blocks) : 0;
      end = z == meta[2] && piece != slots - 1 ? min(max(meta[3], 0), num_blocks) : num_blocks;
      const int cut = static_cast<int>(min(static_cast<unsigned>(first_slot) + piece, p.partial_slots - 1u));
      slot = slots == 1 ? -1 : cut;
    } else {
      const int blocks_per_split = (num_blocks + p.num_splits - 1) / p.num_splits;
      begin = blockIdx.y * blocks_per_split;
      end = min(begin + blocks_per_split, num_blocks);
      slot = p.lse_partial == nullptr ? -1 : static_cast<int64_t>(z) * p.slots_per_z + p.first_slot + blockIdx.y;
    }
    attend(z, begin, end, slot);
  }
}

// The dynamic shared memory, aligned to 1024 bytes (the swizzled tiles' atoms), with `count` mbarriers at byte
// `barriers` (the stages') initialised (one arrival: the thread that arms the TMA) and visible to the whole CTA. The
// pointer is raw_shared plus an offset, so the compiler still knows it points to shared memory and emits STS/LDS for
// accesses through it. kGeneric rebuilds it from an integer instead, so those accesses are generic ST/LD with 64-bit
// addresses: measured, the wide kernel is faster so (H200, sparse prefill h128 7569 us against 8136-8154 us with
// STS/LDS; docs/bench/narrow_rs_qk_h200.log).
template <bool kGeneric = false>
__device__ __forceinline__ uint8_t* prepare_shared(uint8_t* raw_shared, int barriers, int count = 2) {
  uint8_t* shared =
      kGeneric ? reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(raw_shared) + 1023) & ~uintptr_t(1023))
               : raw_shared + ((1024 - (sm90::smem_address(raw_shared) & 1023)) & 1023);
  if (threadIdx.x == 0) {
    for (int i = 0; i < count; ++i) sm90::mbarrier_init(sm90::smem_address(shared + barriers + i * 8), 1);
    sm90::fence_barrier_init();
  }
  __syncthreads();
  return shared;
}

// The cache page that holds sequence `batch`'s block `block` (from the block table). Table values are checked only
// on the CPU or with FLASHMLA_CHECK=1, so a page outside the cache (kv_slots / 64 pages) reads page 0 instead, and
// lengths are cut at the table's capacity (visible_length): wrong input gives a wrong output, never a read outside
// the cache or the table (as the Triton kernels do).
__device__ __forceinline__ int block_page(const DecodeParams& p, int batch, int block) {
  const int page = p.block_table[batch * p.block_table_stride + block];
  return static_cast<uint64_t>(static_cast<uint32_t>(page)) * kBlockN < static_cast<uint64_t>(p.kv_slots) ? page : 0;
}

// Where row `row` of a sequence's cache block `block`, held in page `page`, lives, or nullptr past the sequence's
// `length`.
__device__ __forceinline__ const uint8_t* page_row_address(const DecodeParams& p, int page, int block, int row,
                                                           int length) {
  return block * kBlockN + row < length ? p.kv + page * p.kv_block_bytes + row * p.kv_row_bytes : nullptr;
}

// The same for sequence `batch`'s block `block`, its page read from the block table here (for a row that is there).
__device__ __forceinline__ const uint8_t* cache_row_address(const DecodeParams& p, int batch, int block, int row,
                                                            int length) {
  if (block * kBlockN + row >= length) return nullptr;
  return page_row_address(p, block_page(p, batch, block), block, row, length);
}

// Zeroes the value columns (the first 512) of a BF16 stage's rows [first_row, 64): the last block's rows past the
// sequence's end, which P V multiplies by 0 (and 0 * NaN is not 0). `thread` of `threads` share the stores.
__device__ __forceinline__ void zero_value_rows(uint8_t* stage_tiles, int first_row, int thread, int threads) {
  const int chunks = (kBlockN - first_row) * (kLatentDim / 8);
  for (int i = thread; i < chunks; i += threads) {
    const int row = first_row + i / (kLatentDim / 8), chunk = i % (kLatentDim / 8);
    *reinterpret_cast<uint4*>(stage_tiles + (chunk / 8) * kTileBytes + sm90::swizzled_offset(row, chunk % 8)) =
        make_uint4(0, 0, 0, 0);
  }
}

// One thread: cache page `page` through the 4-d tensor map `map` (run_decode's cache_tensor_map, whose box is
// `tiles` tiles), its swizzled 64-column tiles first_tile .. first_tile + tiles - 1 into dst in one TMA completing on
// `barrier`: the BF16 cache's nine tiles or a third of them, or the FP8 cache's one RoPE tile.
__device__ __forceinline__ void load_page_tiles(const CUtensorMap& map, uint32_t dst, uint32_t barrier, int page,
                                                int first_tile, int tiles) {
  sm90::mbarrier_arrive_expect_bytes(barrier, tiles * kTileBytes);
  sm90::tma_load_4d(dst, &map, barrier, 0, 0, first_tile, page);
}

// A whole BF16 page into the stage at dst, or an FP8 page's RoPE tile into the stage's last tile.
__device__ __forceinline__ void load_kv_page(const DecodeParams& p, uint32_t dst, uint32_t barrier, int page) {
  load_page_tiles(p.kv_map, dst, barrier, page, 0, kColumnTiles);
}

__device__ __forceinline__ void load_rope_page(const DecodeParams& p, uint32_t dst, uint32_t barrier, int page) {
  load_page_tiles(p.kv_map, dst + (kColumnTiles - 1) * kTileBytes, barrier, page, 0, 1);
}

// An FP8 page's RoPE tile, for sequence `batch`'s block `block` (its page read from the block table here).
__device__ __forceinline__ void load_rope_block(const DecodeParams& p, uint32_t dst, uint32_t barrier, int batch,
                                                int block) {
  load_rope_page(p, dst, barrier, block_page(p, batch, block));
}

// A quarter of one FP8 row's latent (quarter t % 4 of the thread: 16-value units quarter + 4k, unit k in scale tile
// k / 2) and the row's four tile scales; zeros for a row that is not there.
constexpr int kFp8UnitsPerQuarter = kLatentDim / 16 / 4;
struct Fp8Share {
  uint4 packed[kFp8UnitsPerQuarter];
  float4 scales;
};

__device__ __forceinline__ void load_fp8_share(Fp8Share& share, const uint8_t* row_bytes) {
  const int quarter = threadIdx.x % 4;
  const bool valid = row_bytes != nullptr;
#pragma unroll
  for (int k = 0; k < kFp8UnitsPerQuarter; ++k) {
    share.packed[k] = valid ? __ldg(reinterpret_cast<const uint4*>(row_bytes + (quarter + 4 * k) * 16))
                            : make_uint4(0, 0, 0, 0);
  }
  share.scales = valid ? __ldg(reinterpret_cast<const float4*>(row_bytes + kScaleOffset)) : make_float4(0, 0, 0, 0);
}

// 16 e4m3 values times `scale`, as 8 pairs of `Pair` (__nv_bfloat162, or __half2 for the f16 operands below):
// words[m] holds values 2 m and 2 m + 1. Exact where the scale is a power of two, so it is applied after the
// conversion, one pair multiply instead of two float multiplies before it.
template <typename Pair>
__device__ __forceinline__ void dequantise_fp8_chunk(const uint4& chunk, Pair scale, uint32_t (&words)[8]) {
  const uint32_t packed[4] = {chunk.x, chunk.y, chunk.z, chunk.w};
#pragma unroll
  for (int w = 0; w < 4; ++w) {
#pragma unroll
    for (int pair = 0; pair < 2; ++pair) {
      Pair widened;
      if constexpr (std::is_same_v<Pair, __half2>) {
        const uint32_t bits = e4m3x2_to_f16x2(packed[w] >> (16 * pair));
        widened = *reinterpret_cast<const __half2*>(&bits);
      } else {
        widened = e4m3x2_to_bf16x2(packed[w] >> (16 * pair));
      }
      const Pair scaled = __hmul2(widened, scale);
      words[2 * w + pair] = *reinterpret_cast<const uint32_t*>(&scaled);
    }
  }
}
// Unit k of a share (16 latent values of its row, in scale tile k / 2), dequantised the same way.
__device__ __forceinline__ void dequantise_fp8_unit(const Fp8Share& share, int k, uint32_t (&words)[8]) {
  const float scales[kNumTiles] = {share.scales.x, share.scales.y, share.scales.z, share.scales.w};
  dequantise_fp8_chunk(share.packed[k], __float2bfloat162_rn(scales[k / 2]), words);  // a power of two: exact
}

// f16 operands over the FP8 cache (dense_decode_narrow.cu). A token's values are stored relative to a power of two 2^e
// of its own (e: the row's `exponent`, floor(log2) of its largest tile scale, at least -14), each tile's times
// scale_t / 2^e <= 1 (exact for the powers of two of SPEC.md §3, down to tiles 2^15 below the row's largest), so they
// fit f16 whatever the scales; the 2^e goes to the token's scores and, through the softmax, to its weights in P V.
struct Fp8RowExponent {
  float exponent;  // e
  float scale;     // 2^e
  float inverse;   // 2^-e
};
__device__ __forceinline__ int float_exponent(float positive) {  // floor(log2(x)) of a normal float
  return static_cast<int>((__float_as_uint(positive) >> 23) & 0xff) - 127;
}
__device__ __forceinline__ float power_of_two(int exponent) {  // 2^exponent, exponent in [-126, 127]
  return __uint_as_float(static_cast<uint32_t>(exponent + 127) << 23);
}
__device__ __forceinline__ Fp8RowExponent fp8_row_exponent(const float4& scales) {
  const float largest = fmaxf(fmaxf(fmaxf(scales.x, scales.y), fmaxf(scales.z, scales.w)), 0x1p-14f);
  const int exponent = min(float_exponent(largest), 126);
  return {static_cast<float>(exponent), power_of_two(exponent), power_of_two(-exponent)};
}
// The power of two 2^q that a query row whose largest magnitude is `largest` is divided by to go to f16: its largest
// then lies in [2^8, 2^9), and its values down to 2^-22 of that stay normal.
__device__ __forceinline__ float query_row_scale(float largest) {
  return largest > 0.f ? power_of_two(min(max(float_exponent(largest) - 8, -100), 100)) : 1.f;
}
// Unit k of a share as f16 pairs relative to the row's 2^e (`inverse` = 2^-e).
__device__ __forceinline__ void widen_fp8_unit(const Fp8Share& share, int k, float inverse, uint32_t (&words)[8]) {
  const float scales[kNumTiles] = {share.scales.x, share.scales.y, share.scales.z, share.scales.w};
  dequantise_fp8_chunk(share.packed[k], __float2half2_rn(scales[k / 2] * inverse), words);
}

// Unit k's dequantised words into row `row` of a stage's first 512 columns: chunks 2 quarter, 2 quarter + 1 of column
// tile k. The lanes of an 8-lane phase store 16-byte chunks of two rows: rows r and r + 1 (r even) land in different
// banks as they are; rows r and r + 4 only if one of them stores its odd chunk first (`odd_first`, true for it: each
// of its stores then picks its data by a SEL per word).
__device__ __forceinline__ void store_fp8_unit(const uint32_t (&words)[8], uint8_t* kv_tile, int k, int row,
                                               bool odd_first) {
  const int quarter = threadIdx.x % 4;
  const uint4 halves[2] = {make_uint4(words[0], words[1], words[2], words[3]),
                           make_uint4(words[4], words[5], words[6], words[7])};
  uint8_t* tile = kv_tile + k * kTileBytes;
  *reinterpret_cast<uint4*>(tile + sm90::swizzled_offset(row, 2 * quarter + odd_first)) =
      odd_first ? halves[1] : halves[0];
  *reinterpret_cast<uint4*>(tile + sm90::swizzled_offset(row, 2 * quarter + 1 - odd_first)) =
      odd_first ? halves[0] : halves[1];
}

// The whole share's latent into row `row` of a stage (see store_fp8_unit for `odd_first`).
__device__ __forceinline__ void store_fp8_share(const Fp8Share& share, uint8_t* kv_tile, int row, bool odd_first) {
#pragma unroll
  for (int k = 0; k < kFp8UnitsPerQuarter; ++k) {
    uint32_t words[8];
    dequantise_fp8_unit(share, k, words);
    store_fp8_unit(words, kv_tile, k, row, odd_first);
  }
}

// Cycles per phase of a block loop, for finding what bounds a kernel: built with
// FLASHMLA_EXTRA_CUDA_FLAGS=-DFLASHMLA_PHASES, the warpgroup leaders of the first two CTAs (row blocks 0 and 1 of
// split 0) record, for their last piece of 8 blocks or more, the cycles each phase took per block, and the launcher
// prints them after the kernel (print_phases: a printf inside a kernel is a function call, across which ptxas
// serialises the wgmmas in flight, C7510). Otherwise every call compiles to nothing. Phases 0..kPhases - 1: each
// kernel says what its own are (phase 8: only the narrow FP8 loop's wgmma waits).
constexpr int kPhases = 9;
#ifdef FLASHMLA_PHASES
struct PhaseRecord {
  const char* kernel;
  int blocks;  // 0: none
  unsigned per_block[kPhases], cycles;
  unsigned long long ns;
};
static __device__ PhaseRecord phase_records[4];  // [row block][warpgroup]; one array per translation unit
#endif
struct PhaseClock {
#ifdef FLASHMLA_PHASES
  unsigned last = clock(), first = last, total[kPhases] = {};
  unsigned long long first_ns = nanoseconds();
  __device__ __forceinline__ static unsigned long long nanoseconds() {
    unsigned long long ns;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
    return ns;
  }
  __device__ __forceinline__ void mark(int phase) {
    const unsigned now = clock();
    total[phase] += now - last;
    last = now;
  }
  __device__ __forceinline__ void report(const char* kernel, int blocks) const {
    if (blockIdx.x > 1 || blockIdx.y + blockIdx.z != 0 || threadIdx.x % 128 != 0 || blocks < 8) return;
    PhaseRecord& r = phase_records[2 * blockIdx.x + threadIdx.x / 128];
    r.kernel = kernel;
    for (int i = 0; i < kPhases; ++i) r.per_block[i] = total[i] / blocks;
    r.cycles = clock() - first;
    r.ns = nanoseconds() - first_ns;
    r.blocks = blocks;
  }
#else
  __device__ __forceinline__ void mark(int) {}
  __device__ __forceinline__ void report(const char*, int) const {}
#endif
};

// FLASHMLA_PHASES builds: thread 0 of every CTA of every 16th grid row (or every FLASHMLA_CTA_RECORD_STRIDE-th;
// cta_record_index, while the records last) records its SM and when it started and ended (globaltimer, ns), for the
// waves and the time outside the block loop, and attend_pairs also when its prologue ended, its first pair, its loop,
// and the barrier before the output's stores (cta_mark: 0, 1, 2, 3), and the narrow kernel also when its thread 0 had
// issued its stores and passed the piece's last barrier (4, 5); print_phases prints them after the kernel.
// Otherwise nothing.
#ifdef FLASHMLA_PHASES
constexpr int kCtaMarks = 6;
struct CtaRecord {
  const char* kernel;  // nullptr: none
  int x, y, z;
  unsigned sm;
  unsigned long long entry, exit, marks[kCtaMarks];
};
constexpr int kCtaRecords = 1024;
static __device__ CtaRecord cta_records[kCtaRecords];

// This CTA's record (every split of every 16th grid row, or every FLASHMLA_CTA_RECORD_STRIDE-th, while they fit),
// or -1.
#ifndef FLASHMLA_CTA_RECORD_STRIDE
#define FLASHMLA_CTA_RECORD_STRIDE 16
#endif
__device__ __forceinline__ int cta_record_index() {
  constexpr unsigned kStride = FLASHMLA_CTA_RECORD_STRIDE;
  if (blockIdx.z % kStride != 0) return -1;
  const unsigned index = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * (blockIdx.z / kStride));
  return index < kCtaRecords ? static_cast<int>(index) : -1;
}

// One thread: prints the phase and CTA records a kernel left, and clears them.
static __global__ void print_records() {
  for (int i = 0; i < 4; ++i) {
    PhaseRecord& r = phase_records[i];
    if (r.blocks == 0) continue;
    static_assert(kPhases == 9, "the format below prints nine phases");
    printf("%s row block %d warpgroup %d, %d blocks, cycles per block by phase: %u %u %u %u %u %u %u %u %u (loop %u "
           "cycles in %llu ns: %.2f GHz)\n",
           r.kernel, i / 2, i % 2, r.blocks, r.per_block[0], r.per_block[1], r.per_block[2], r.per_block[3],
           r.per_block[4], r.per_block[5], r.per_block[6], r.per_block[7], r.per_block[8], r.cycles, r.ns,
           static_cast<double>(r.cycles) / static_cast<double>(r.ns));
    r.blocks = 0;
  }
  for (int i = 0; i < kCtaRecords; ++i) {
    CtaRecord& r = cta_records[i];
    if (r.kernel == nullptr) continue;
    const auto since_entry = [&](int m) {  // -1: the mark was not reached
      return r.marks[m] >= r.entry ? static_cast<long long>(r.marks[m] - r.entry) : -1LL;
    };
    printf("%s cta (%d, %d, %d) sm %u: %llu .. %llu ns; prologue, first pair, loop, exit end at +%lld +%lld +%lld "
           "+%llu ns, stores from +%lld, stored +%lld, synced +%lld\n",
           r.kernel, r.x, r.y, r.z, r.sm, r.entry, r.exit, since_entry(0), since_entry(1), since_entry(2),
           r.exit - r.entry, since_entry(3), since_entry(4), since_entry(5));
    r.kernel = nullptr;
    for (int m = 0; m < kCtaMarks; ++m) r.marks[m] = 0;
  }
}
#endif
struct CtaClock {
#ifdef FLASHMLA_PHASES
  unsigned long long entry = PhaseClock::nanoseconds();
  __device__ __forceinline__ void report(const char* kernel) const {
    const int index = cta_record_index();
    if (threadIdx.x != 0 || index < 0) return;
    CtaRecord& r = cta_records[index];
    asm volatile("mov.u32 %0, %%smid;" : "=r"(r.sm));
    r.x = blockIdx.x;
    r.y = blockIdx.y;
    r.z = blockIdx.z;
    r.entry = entry;
    r.exit = PhaseClock::nanoseconds();
    r.kernel = kernel;
  }
#else
  __device__ __forceinline__ void report(const char*) const {}
#endif
};

// FLASHMLA_PHASES builds: thread 0 records milestone `mark` of its CTA (see CtaRecord). Otherwise nothing.
__device__ __forceinline__ void cta_mark(int mark) {
#ifdef FLASHMLA_PHASES
  const int index = cta_record_index();
  if (threadIdx.x == 0 && index >= 0) cta_records[index].marks[mark] = PhaseClock::nanoseconds();
#endif
}

// After a kernel that records phases and CTA times (FLASHMLA_PHASES builds): prints the records. Otherwise nothing.
inline void print_phases(cudaStream_t stream) {
#ifdef FLASHMLA_PHASES
  print_records<<<1, 1, 0, stream>>>();
#endif
}

// Launches csrc/dense_decode_narrow.cu (rows <= kNarrowRows, dense) on grid (1, splits or parts, batch or 1).
template <bool kFp8>
void launch_narrow_decode(const DecodeParams& params, dim3 grid, cudaStream_t stream);

}  // namespace flashmla::decode
