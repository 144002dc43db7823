"""The CUDA kernels' schedule code on the CPU: csrc/decode_common.cuh's `for_each_piece` and csrc/dense_decode.cu's
`combine_slots`, their own text compiled by the host C++ compiler (with CUDA's integer min/max overloads and blockIdx
as a variable), so that C++'s conversions are the kernels' own. A Python model of these functions does not catch a
conversion: stop 69's `slots == 1 ? -1 : <unsigned>` made the -1 of a direct write 2^32 - 1, a slot far past the
partials, which every balanced launch hit (an illegal address on the first GPU run) and no CPU test saw.

Checked over get_mla_metadata's schedules, fresh and made for other lengths of the same batch: every block of each
sequence is read by exactly one piece; a sequence of one slot is written straight to the output by one piece and not
combined; the others' pieces write each of the sequence's slots once and the combine reads exactly those. Over
metadata that is not get_mla_metadata's (any int32 values): every piece stays within the batch, its sequence's
blocks and the launch's partial slots, the combine within the slots and kMaxSplits, and a part takes at most batch
pieces. Skipped without a C++ compiler.
"""
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from flashmla_ops.decode import get_mla_metadata_reference

CSRC = Path(__file__).resolve().parent.parent.parent / "csrc"
COMPILER = shutil.which("c++") or shutil.which("g++")
PAGE = 64
MAX_SPLITS = 1024
HARNESS = r"""
#include <cstdint>
#include <cstdio>
#include <vector>
#define __device__
#define __forceinline__ inline
#define __restrict__
struct Dim3 { unsigned x, y, z; } blockIdx;
// CUDA's integer overloads (crt/math_functions.hpp): a signed and an unsigned argument take the unsigned one
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline unsigned min(int a, unsigned b) { return min(static_cast<unsigned>(a), b); }
inline unsigned min(unsigned a, int b) { return min(a, static_cast<unsigned>(b)); }
inline unsigned max(int a, unsigned b) { return max(static_cast<unsigned>(a), b); }
inline unsigned max(unsigned a, int b) { return max(a, static_cast<unsigned>(b)); }
constexpr int kBlockN = 64;
constexpr int kMaxSplits = 1024;
struct DecodeParams {
  const int* metadata; const int* split_offsets; int metadata_fields, batch, partial_slots, block_table_blocks;
  int num_splits, slots_per_z, first_slot, queries_per_z, topk; const int* topk_length; const int* cache_seqlens;
  const float* lse_partial;
};
template <bool kSparse>
VISIBLE_LENGTH
SLOT_COUNT
FOR_EACH_PIECE
COMBINE_SLOTS
// stdin: cases of "batch parts", lengths, the (parts, 8) metadata, the (batch + 1) num_splits. stdout per case: each
// part's pieces "P y z begin end slot", then each sequence's "C z combined first count".
int main() {
  int batch, parts;
  while (scanf("%d %d", &batch, &parts) == 2) {
    std::vector<int> lengths(batch), metadata(parts * 8), splits(batch + 1);
    for (auto& v : lengths) scanf("%d", &v);
    for (auto& v : metadata) scanf("%d", &v);
    for (auto& v : splits) scanf("%d", &v);
    const float lse = 0;
    const DecodeParams p{metadata.data(), splits.data(), 8, batch, batch + parts, 1 << 20, 1, 1, 0, 1, 0, nullptr,
                         lengths.data(), &lse};
    for (unsigned y = 0; y < static_cast<unsigned>(parts); ++y) {
      blockIdx = {0, y, 0};
      for_each_piece<false>(p, [&](int z, int begin, int end, int64_t slot) {
        printf("P %u %d %d %d %lld\n", y, z, begin, end, static_cast<long long>(slot));
      });
    }
    for (int z = 0; z < batch; ++z) {
      int count = -7;
      int64_t first = -7;
      const bool combined = combine_slots(z, splits.data(), batch + parts, count, first);
      printf("C %d %d %lld %d\n", z, combined ? 1 : 0, static_cast<long long>(first), count);
    }
    printf("E\n");
  }
}
"""


def function_text(source: str, signature: str) -> str:
    """A top-level function's text in `source`: from the line that starts with `signature` to its closing brace."""
    match = re.search(rf"^{re.escape(signature)}.*?^}}\n", source, re.S | re.M)
    assert match, f"{signature} not found"
    return match.group(0)


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    if COMPILER is None:
        pytest.skip("no C++ compiler")
    common = (CSRC / "decode_common.cuh").read_text()
    pieces = function_text(common, "template <bool kSparse, typename Attend>\n__device__ __forceinline__ void "
                                   "for_each_piece")
    visible = function_text(common, "__device__ __forceinline__ int visible_length")
    slot_count = function_text(common, "__device__ __forceinline__ int slot_count")
    combine = function_text((CSRC / "dense_decode.cu").read_text(), "__device__ __forceinline__ bool combine_slots")
    source = (HARNESS.replace("VISIBLE_LENGTH", visible).replace("SLOT_COUNT", slot_count)
              .replace("FOR_EACH_PIECE", pieces).replace("COMBINE_SLOTS", combine))
    directory = tmp_path_factory.mktemp("schedule_host")
    (directory / "harness.cpp").write_text(source)
    subprocess.run([COMPILER, "-std=c++17", "-O1", "-o", str(directory / "harness"), str(directory / "harness.cpp")],
                   check=True, capture_output=True)
    return directory / "harness"


def run(harness, cases):
    """The harness's pieces and combines of each (lengths, metadata, num_splits) case."""
    lines = []
    for lengths, metadata, num_splits in cases:
        lines += [f"{len(lengths)} {metadata.shape[0]}", " ".join(map(str, lengths)),
                  " ".join(map(str, metadata.flatten().tolist())), " ".join(map(str, num_splits.tolist()))]
    output = subprocess.run([str(harness)], input="\n".join(lines) + "\n", capture_output=True, text=True,
                            check=True).stdout
    results = []
    for block in output.split("E\n")[:-1]:
        rows = [line.split() for line in block.splitlines()]
        pieces = [tuple(map(int, row[1:])) for row in rows if row[0] == "P"]  # (part, z, begin, end, slot)
        combines = [tuple(map(int, row[1:])) for row in rows if row[0] == "C"]  # (z, combined, first, count)
        results.append((pieces, combines))
    assert len(results) == len(cases)
    return results


def some_lengths(rng, batch):
    return [rng.choice([0, 1, 63, 64, 65, 127, 128, rng.randrange(5000), rng.randrange(40000)]) for _ in range(batch)]


def test_schedules_read_every_block_once_and_fill_their_slots(harness):
    rng = random.Random(69)
    cases = [([200, 1, 400, 130], [70, 1, 300, 5], 1)]  # the GPU test that found the -1 made unsigned
    for _ in range(600):
        batch = rng.randrange(1, 40)
        lengths = some_lengths(rng, batch)
        made_for = lengths if rng.random() < 0.4 else some_lengths(rng, batch)
        cases.append((lengths, made_for, rng.choice([1, 2, 3, 7, 40, 132, rng.randrange(1, 300)])))
    inputs = [(lengths, *get_mla_metadata_reference(torch.tensor(made_for, dtype=torch.int32), parts))
              for lengths, made_for, parts in cases]
    for (lengths, metadata, num_splits), (pieces, combines) in zip(inputs, run(harness, inputs)):
        offsets = num_splits.tolist()
        for z, length in enumerate(lengths):
            mine = [piece for piece in pieces if piece[1] == z]
            read = sorted(block for _, _, begin, end, _ in mine for block in range(begin, end))
            assert read == list(range(-(-length // PAGE))), f"sequence {z}: blocks read {read}"
            slots = offsets[z + 1] - offsets[z]
            if slots == 1:
                assert [piece[4] for piece in mine] == [-1], f"sequence {z}: one slot, written straight"
                assert combines[z][1] == 0
            else:
                assert sorted(piece[4] for piece in mine) == list(range(offsets[z], offsets[z + 1]))
                assert combines[z] == (z, 1, offsets[z], slots)


INT32_MIN, INT32_MAX = -2 ** 31, 2 ** 31 - 1


def test_any_metadata_stays_within_its_bounds(harness):
    rng = random.Random(70)
    extremes = [INT32_MIN, INT32_MIN + 1, -1, 0, 1, 2, 3, 64, INT32_MAX - 1, INT32_MAX]
    cases = []
    for _ in range(400):
        batch, parts = rng.randrange(1, 9), rng.randrange(1, 9)
        lengths = some_lengths(rng, batch)
        value = (lambda: rng.choice(extremes)) if rng.random() < 0.5 else (lambda: rng.randrange(-5, 12))
        metadata = torch.tensor([[value() for _ in range(8)] for _ in range(parts)], dtype=torch.int64).int()
        num_splits = torch.tensor([value() for _ in range(batch + 1)], dtype=torch.int64).int()
        cases.append((lengths, metadata, num_splits))
    for (lengths, metadata, num_splits), (pieces, combines) in zip(cases, run(harness, cases)):
        batch, slots = len(lengths), len(lengths) + metadata.shape[0]
        for part in range(metadata.shape[0]):
            assert sum(piece[0] == part for piece in pieces) <= batch
        for _, z, begin, end, slot in pieces:
            assert 0 <= z < batch and -1 <= slot < slots
            if begin < end:
                assert 0 <= begin and end <= -(-lengths[z] // PAGE)
        for z, combined, first, count in combines:
            if combined:
                assert 0 <= first and 0 <= count <= min(slots - first, MAX_SPLITS)
