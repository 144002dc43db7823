"""Stop 25: three variants of the sparse gathers in attend_pairs, written and compiled in stop 25 (no device time was
left), run in stop 26 call 1 (docs/bench/stop26_call1.log): each passed the sparse GPU tests, none was faster than
main, none kept. Writes bench/{Vb,Vc,Vbc}/csrc: copies of csrc whose dense_decode.cu is rewritten from this tree's
(run it on 17afd66 .. 68372ee, whose attend_pairs still has the text it replaces; it asserts each edit applies).

  Vb:  warpgroup 0 releases stage 1 (kReleasedB) in the middle of its gathers of a + 2, right after their first third
       and P V of b being done, instead of at the next pair's start after all of them: warpgroup 1's gathers of stage 1
       start while warpgroup 0 is still issuing.
  Vc:  a stage's tiles are gathered and scored in the order 4-7, 0-3, 8 (sparse_tile); at a pair's start warpgroup 1
       gathers tiles 4-7 of stage 1 before waiting for the release (only its own P V of the previous b read them), the
       rest after. (Stop 24's dense version of this, with TMA, was 5-8% slower; the sparse gathers stall their issuer,
       which the TMA refill does not.)
  Vbc: both.

Compiled here (nvcc 13.0, sm_90a, -Xptxas -v): no spills, no C75xx remark; the sparse BF16 kernel takes 253 (Vb)
and 255 (Vc, Vbc) registers; the other three kernels' SASS is identical to main's (cuobjdump). To run (stop 26):
bench/s26a.sh (its text is at the end of this file), which comes down to

    python3 docs/bench/stop25_variants.py
    python scripts/ab_kernels.py --base-csrc bench/Vb/csrc --base-csrc bench/Vc/csrc --base-csrc bench/Vbc/csrc \
        --rounds 2 --tests "tests/ops/test_cuda_sparse_prefill.py tests/ops/test_cuda_sparse_decode.py" \
        -- scripts/bench_sparse.py --no-reference

then the phases of main's sparse prefill (FLASHMLA_EXTRA_CUDA_FLAGS=-DFLASHMLA_PHASES python bench/phases_sparse.py
prefill; that script is at the end of this file too).
"""
import os
import shutil
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
src = open(f'{ROOT}/csrc/dense_decode.cu').read()

def sub(s, old, new):
    assert old in s, old[:80]
    return s.replace(old, new, 1)

OLD_GATHER_START = "  const auto gather_stage = [&](int stage, int block) {\n    const uint8_t* row_bytes[4];"
OLD_GATHER_END = "    load_ahead(block + 2);\n  };\n"

def split_gather(s, permuted):
    i = s.index(OLD_GATHER_START)
    j = s.index(OLD_GATHER_END, i) + len(OLD_GATHER_END)
    new = '''  // The gathers in pieces: the rows' addresses, the tiles sparse_tile(n) for n in [first, last) (a commit group after
  // each third: the parts Q K^T waits for), then the token mask and the next indices.
  const auto gather_rows = [&](const uint8_t* (&row_bytes)[4], int block) {
#pragma unroll
    for (int i = 0; i < 4; ++i) row_bytes[i] = gather_row_address<true>(p, batch, block, length, ahead[i]);
  };
  const auto gather_tiles = [&](int stage, const uint8_t* const (&row_bytes)[4], int first, int last) {
    constexpr int kTilesPerPart = kColumnTiles / kParts;
#pragma unroll
    for (int n = 0; n < kColumnTiles; ++n) {
      if (n < first || n >= last) continue;
      const int t = sparse_tile(n);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const bool valid = row_bytes[i] != nullptr;
        cp_async_16(kv_tile(stage) + t * kTileBytes + swizzled_offset(gather_row_of(i), lane % 8),
                    valid ? static_cast<const void*>(row_bytes[i] + (8 * t + lane % 8) * 16) : p.kv, valid);
      }
      if (n % kTilesPerPart == kTilesPerPart - 1) cp_async_commit();
    }
  };
  const auto finish_gather = [&](int stage, const uint8_t* const (&row_bytes)[4], int block) {
    // Bit 4 i + j of warp w's 16-bit word for row 16 w + 4 i + j (from lane 8 j).
    uint32_t word = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t bits = __ballot_sync(0xffffffffu, row_bytes[i] != nullptr);
#pragma unroll
      for (int j = 0; j < 4; ++j) word |= ((bits >> (8 * j)) & 1u) << (4 * i + j);
    }
    if (lane == 0) reinterpret_cast<uint16_t*>(token_masks)[stage * 4 + warp] = static_cast<uint16_t>(word);
    load_ahead(block + 2);
  };
  const auto gather_stage = [&](int stage, int block) {
    const uint8_t* row_bytes[4];
    gather_rows(row_bytes, block);
    gather_tiles(stage, row_bytes, 0, kColumnTiles);
    finish_gather(stage, row_bytes, block);
  };
'''
    s = s[:i] + new + s[j:]
    order = ("n < 4 ? n + 4 : (n < 8 ? n - 4 : 8)" if permuted else "n")
    doc = ("// Sparse: the order in which a stage's tiles are gathered and scored: value tiles 4-7 first (only warpgroup 1's\n"
           "// P V reads them, so it refills them before warpgroup 0 releases the stage), then 0-3, then the RoPE tile.\n"
           if permuted else "// Sparse: the order in which a stage's tiles are gathered and scored.\n")
    fn = doc + f"__device__ __forceinline__ constexpr int sparse_tile(int n) {{ return {order}; }}\n\n"
    k = s.index("template <bool kSparse>\n__device__ __forceinline__ void attend_pairs(")
    s = s[:k] + fn + s[k:]
    return s

def permute_scores(s):
    s = sub(s, "template <typename WaitPart>\n__device__ __forceinline__ void issue_block_scores(float (&scores)[kBlockN / 2], uint32_t q_tile, uint32_t kv_tile,\n                                                   WaitPart wait_part) {",
            "template <typename WaitPart, typename TileOf>\n__device__ __forceinline__ void issue_block_scores(float (&scores)[kBlockN / 2], uint32_t q_tile, uint32_t kv_tile,\n                                                   WaitPart wait_part, TileOf tile_of) {")
    s = sub(s, "    const uint32_t column = (k / 4) * kTileBytes + (k % 4) * 32;\n    wgmma_m64n64k16_ss(",
            "    const uint32_t column = tile_of(k / 4) * kTileBytes + (k % 4) * 32;\n    wgmma_m64n64k16_ss(")
    s = sub(s, """        mbarrier_wait(barrier(stage, part), fill & 1);
      }
    });""", """        mbarrier_wait(barrier(stage, part), fill & 1);
      }
    }, [](int n) { return kSparse ? sparse_tile(n) : n; });""")
    return s

def release_mid_gather(s):
    s = sub(s, "      if (pair > 0) named_barrier_arrive(kReleasedB, kThreads);  // stage 1 is free on this side",
            "      // Stage 1 is free on this side (sparse: released mid-gather at the previous pair's end).\n"
            "      if (!kSparse && pair > 0) named_barrier_arrive(kReleasedB, kThreads);")
    s = sub(s, """        if constexpr (kSparse) {
          if (a + 2 < end) gather_stage(0, a + 2);
        }
        clock.mark(1);""", """        // Sparse: stage 1 is released as soon as P V of b is done, after the first third of these gathers, so that
        // warpgroup 1 starts its own while the rest of these are issued.
        if constexpr (kSparse) {
          if (a + 2 < end) {
            const uint8_t* row_bytes[4];
            gather_rows(row_bytes, a + 2);
            gather_tiles(0, row_bytes, 0, kColumnTiles / kParts);
            wgmma_wait<0>();
            fence_registers(out_acc);
            named_barrier_arrive(kReleasedB, kThreads);
            gather_tiles(0, row_bytes, kColumnTiles / kParts, kColumnTiles);
            finish_gather(0, row_bytes, a + 2);
          }
        }
        clock.mark(1);""")
    return s

def early_refill(s):
    s = sub(s, """      if (pair > 0) {
        named_barrier_sync(kReleasedB, kThreads);
        clock.mark(1);
        if constexpr (kSparse) {
          if (has_b) gather_stage(1, b);
        } else if (thread == 0 && has_b) {
          fill_stage(1, b);
        }
      }""", """      if (pair > 0) {
        if constexpr (kSparse) {
          // Tiles 4-7 first (sparse_tile): only this warpgroup's P V of the previous b read them, and it is done.
          const uint8_t* row_bytes[4] = {nullptr, nullptr, nullptr, nullptr};
          if (has_b) {
            gather_rows(row_bytes, b);
            gather_tiles(1, row_bytes, 0, 4);
          }
          named_barrier_sync(kReleasedB, kThreads);
          clock.mark(1);
          if (has_b) {
            gather_tiles(1, row_bytes, 4, kColumnTiles);
            finish_gather(1, row_bytes, b);
          }
        } else {
          named_barrier_sync(kReleasedB, kThreads);
          clock.mark(1);
          if (thread == 0 && has_b) fill_stage(1, b);
        }
      }""")
    return s

variants = {
    'Vb': lambda s: release_mid_gather(split_gather(s, False)),
    'Vc': lambda s: early_refill(permute_scores(split_gather(s, True))),
    'Vbc': lambda s: release_mid_gather(early_refill(permute_scores(split_gather(s, True)))),
}
for name, f in variants.items():
    d = f'{ROOT}/bench/{name}'
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(f'{ROOT}/csrc', f'{d}/csrc')
    open(f'{d}/csrc/dense_decode.cu', 'w').write(f(src))
    print(name, 'ok')

# bench/s26a.sh, the planned first device call of stop 26 (bench/ is not in git):
#   # stop 26 call 1 (prepared in stop 25): A/B of main against bench/Vb, bench/Vc and bench/Vbc (sparse gathers in
#   # attend_pairs: stage 1 released mid-gather; warpgroup 1's tiles 4-7 refilled before the release; both), each
#   # base's sparse GPU tests first; then phases of main's sparse prefill with the split PhaseClock marks.
#   # Recreate the bases first: python3 docs/bench/stop25_variants.py (writes bench/{Vb,Vc,Vbc}/csrc from csrc).
#   export PYTHONPATH=$PWD:$PWD/scripts MAX_JOBS=16 PYTHONUNBUFFERED=1
#   T0=$(date +%s); t() { echo "## t=$(( $(date +%s) - T0 ))s $*"; }
#   nvidia-smi --query-gpu=name --format=csv,noheader
#   FLASHMLA_EXTRA_CUDA_FLAGS=-DFLASHMLA_PHASES python -c "import flashmla_ops._ext as e; assert e._load() is not None" > $OUT/build_phases.log 2>&1 &
#   t "A/B: main (tree) against Vb, Vc, Vbc, their sparse tests first"
#   timeout 400 python scripts/ab_kernels.py --base-csrc bench/Vb/csrc --base-csrc bench/Vc/csrc --base-csrc bench/Vbc/csrc --rounds 2 --tests "tests/ops/test_cuda_sparse_prefill.py tests/ops/test_cuda_sparse_decode.py" -- scripts/bench_sparse.py --no-reference 2>&1 | grep -v "^configuration\|ceilings\|wrote\|^$\|Docs:\|jit\|warnings.warn" | tail -n 60
#   wait
#   t "phases: sparse prefill h128 (s_q 1024), main"
#   FLASHMLA_EXTRA_CUDA_FLAGS=-DFLASHMLA_PHASES timeout 60 python bench/phases_sparse.py prefill > $OUT/phases_prefill.log 2>&1
#   grep -h "cycles per block\|== call\|Error\|error" $OUT/phases_prefill.log | tail -n 10
#   t done
# bench/phases_sparse.py:
#   # One sparse call for a -DFLASHMLA_PHASES build: the kernels print their phases. argv[1]: "prefill" (s_q 1024 h128
#   # s_kv 32k topk 2048, BF16) or "decode" (b128 h128 topk 2048, FP8 cache).
#   import sys
#   
#   import torch
#   
#   sys.path.insert(0, "scripts")
#   from bench_sparse import decode_inputs, prefill_inputs  # noqa: E402
#   
#   from flashmla_ops.kv_cache import D_QK, KV_LORA_RANK  # noqa: E402
#   
#   torch.manual_seed(0)
#   scale = D_QK ** -0.5
#   for _ in range(2):
#       if sys.argv[1] == "prefill":
#           q, kv, indices = prefill_inputs(1024, 32768, 128, 2048, "cuda")
#           torch.ops.flashmla.sparse_prefill(q, kv, indices, scale, KV_LORA_RANK, None, None, 0)
#       else:
#           q, cache, indices = decode_inputs(128, 1, 128, 2048, True, "cuda")
#           torch.ops.flashmla.sparse_decode(q, cache, indices, None, None, None, None, None, None, KV_LORA_RANK, scale,
#                                            True, None)
#       torch.cuda.synchronize()
#       print("== call done", flush=True)
