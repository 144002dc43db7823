"""get_mla_metadata: the decode work split is a partition of every sequence's 64-token blocks into contiguous runs,
whole sequences per part where that stays within the slack of an even share, else equal runs.

Row layout (decode.py, METADATA_FIELDS): begin_batch, begin_block, end_batch (inclusive), end_block (exclusive, in
end_batch), begin_split (which split of begin_batch this part is), 3 reserved. A part with no work has
begin_batch = end_batch = batch. num_splits `(batch + 1,)` is cumulative: num_splits[b + 1] - num_splits[b] parts
touch sequence b.
"""
import pytest
import torch
from decode_inputs import HOPPER, poisoned

from flashmla_ops.decode import ALIGNED_SLACK_BLOCKS, ALIGNED_SLACK_PERCENT, get_mla_metadata_reference

ops = torch.ops.flashmla


def blocks_of(lengths):
    return [max(1, -(-n // 64)) for n in lengths]  # an empty sequence still counts one block (its output is written)


def covered_blocks(meta_row, blocks):
    """The (sequence, block) pairs one part covers."""
    begin_batch, begin_block, end_batch, end_block = meta_row[:4]
    pairs = []
    for b in range(begin_batch, min(end_batch, len(blocks) - 1) + 1):
        first = begin_block if b == begin_batch else 0
        last = end_block if b == end_batch else blocks[b]
        pairs += [(b, j) for j in range(first, last)]
    return pairs


def check_partition(lengths, num_sm_parts, device):
    cache_seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    meta, num_splits = ops.get_mla_metadata(cache_seqlens, num_sm_parts)
    assert meta.dtype == num_splits.dtype == torch.int32
    assert meta.shape == (num_sm_parts, 8) and num_splits.shape == (len(lengths) + 1,)
    meta, num_splits = meta.cpu().tolist(), num_splits.cpu().tolist()
    blocks = blocks_of(lengths)
    batch = len(lengths)

    seen = {}
    parts_of = [[] for _ in lengths]
    for part, row in enumerate(meta):
        begin_batch, begin_block, end_batch, end_block = row[:4]
        pairs = covered_blocks(row, blocks)
        if not pairs:
            assert begin_batch == end_batch == batch, f"part {part}: an idle part is marked batch: {row}"
            continue
        assert 0 <= begin_batch <= end_batch < batch, f"part {part}: {row}"
        assert 0 <= begin_block < blocks[begin_batch] and 0 < end_block <= blocks[end_batch], f"part {part}: {row}"
        for pair in pairs:
            assert pair not in seen, f"block {pair} covered by parts {seen[pair]} and {part}"
            seen[pair] = part
        for b in sorted({b for b, _ in pairs}):
            parts_of[b].append(part)
        assert row[4] == len(parts_of[begin_batch]) - 1, f"part {part}: begin_split {row[4]} for sequence {begin_batch}"
    every_block = {(b, j) for b in range(batch) for j in range(blocks[b])}
    assert set(seen) == every_block, f"missing {sorted(every_block - set(seen))[:5]}"

    # Parts are contiguous runs in (sequence, block) order.
    order = sorted(every_block)
    owner = [seen[pair] for pair in order]
    assert owner == sorted(owner)

    assert num_splits[0] == 0
    assert [num_splits[b + 1] - num_splits[b] for b in range(batch)] == [len(p) for p in parts_of]

    # Whole sequences (ceil(batch / parts) consecutive ones per part) when the heaviest such part stays within the
    # slack of the even share ceil(total / parts); else equal runs: no part above the even share.
    loads = [len(covered_blocks(row, blocks)) for row in meta]
    even = -(-sum(blocks) // num_sm_parts)
    group = -(-batch // num_sm_parts) if batch else 1
    heaviest = max((sum(blocks[i:i + group]) for i in range(0, batch, group)), default=0)
    if batch and heaviest * 100 <= even * ALIGNED_SLACK_PERCENT + ALIGNED_SLACK_BLOCKS * 100:
        assert num_splits == list(range(batch + 1)), "whole sequences: no sequence split"
        assert [parts[0] for parts in parts_of] == [b // group for b in range(batch)]
        assert max(loads) == heaviest
    else:
        assert max(loads, default=0) <= even, loads
    return loads


@pytest.mark.parametrize("lengths,num_sm_parts", [
    ([0, 1, 64, 65, 1000], 4),
    ([100_000] + [1, 70, 0, 5] * 8, 132),   # one very long sequence among short ones
    ([4096] * 128, 132),                    # uniform: whole sequences, one per part
    ([4096] * 128, 66),                     # two per part
    ([1000] * 10, 4),                       # three per part, the last part lighter: at the slack's edge
    ([4096] * 127 + [5000], 132),           # one sequence 23% longer: past the slack, equal runs
    ([5], 8),                               # more parts than blocks
    ([0, 0, 0], 2),
    ([63, 64, 65, 127, 128, 129], 1),
    ([3000, 1, 1, 1], 7),
    ([], 3),                                # batch 0
    ([], 1),
])
def test_metadata_is_a_balanced_partition(device, lengths, num_sm_parts):
    check_partition(lengths, num_sm_parts, device)


def test_metadata_random_lengths(device):
    for _ in range(20):
        batch = int(torch.randint(1, 40, ()))
        skew = torch.rand(batch) < 0.1
        lengths = torch.where(skew, torch.randint(0, 20000, (batch,)), torch.randint(0, 300, (batch,))).tolist()
        check_partition(lengths, int(torch.randint(1, 140, ())), device)


def hopper(test):
    """A GPU test of csrc/mla_metadata.cu (sm_90)."""
    return pytest.mark.gpu(HOPPER(test))


def random_lengths(batch, generator):
    """Short and long sequences mixed, with empty ones, negative ones (one block each, as empty ones), exact
    multiples of the block, and a huge length."""
    kind = torch.randint(0, 7, (batch,), generator=generator)
    short = torch.randint(0, 300, (batch,), generator=generator)
    long = torch.randint(0, 200_000, (batch,), generator=generator)
    lengths = torch.where(kind == 0, long, short)
    lengths = torch.where(kind == 1, (lengths // 64) * 64, lengths)
    lengths = torch.where(kind == 2, torch.zeros_like(lengths), lengths)
    lengths = torch.where(kind == 3, -lengths - 1, lengths)
    if batch > 2:
        lengths[int(torch.randint(0, batch, (), generator=generator))] = 2**31 - 1
    return lengths.to(torch.int32)


@pytest.mark.parametrize("batch,num_sm_parts", [(1, 1), (1, 132), (3, 2), (128, 132), (128, 66), (131, 132),
                                                (1023, 7), (1024, 1024), (1025, 66), (3000, 132), (5000, 1500),
                                                (40, 1), (2, 2000)])
@pytest.mark.parametrize("uniform", [False, True])
@hopper
def test_cuda_metadata_equals_the_reference(batch, num_sm_parts, uniform, cuda_calls):
    """csrc/mla_metadata.cu against get_mla_metadata_reference, value for value: batches and part counts on both sides
    of the kernel's 1024-thread chunks, uniform batches (whole sequences) and skewed ones (equal runs), lengths below
    0, 0 and 2**31 - 1 (a batch of those totals past int32's blocks); outputs over memory of -1 (0xff bytes:
    decode_inputs.poisoned)."""
    generator = torch.Generator().manual_seed(batch * 7919 + num_sm_parts * (2 if uniform else 1))
    for trial, uniform_length in enumerate((int(torch.randint(0, 70_000, (), generator=generator)), 2**31 - 1, -70)):
        lengths = (torch.full((batch,), uniform_length, dtype=torch.int32) if uniform
                   else random_lengths(batch, generator))
        got = poisoned(ops.get_mla_metadata, lengths.cuda(), num_sm_parts)
        want = get_mla_metadata_reference(lengths, num_sm_parts)
        assert cuda_calls[-1:] == ["get_mla_metadata"]
        for name, g, w in zip(("tile_scheduler_metadata", "num_splits"), got, want):
            assert g.dtype == torch.int32 and g.shape == w.shape, name
            assert torch.equal(g.cpu(), w), f"trial {trial} {name}: first difference at " \
                f"{(g.cpu() != w).nonzero()[:1].tolist()}"


@hopper
def test_cuda_metadata_of_no_sequences(cuda_calls):
    for parts in (1, 5):
        got = ops.get_mla_metadata(torch.zeros(0, dtype=torch.int32, device="cuda"), parts)
        assert cuda_calls[-1:] == ["get_mla_metadata"]
        for g, w in zip(got, get_mla_metadata_reference(torch.zeros(0, dtype=torch.int32), parts)):
            assert torch.equal(g.cpu(), w)


@hopper
def test_cuda_metadata_replays_in_a_cuda_graph(cuda_calls):
    """Captured once, the schedule follows cache_seqlens' values on every replay (no host sync, no stale shape)."""
    cache_seqlens = torch.full((32,), 512, dtype=torch.int32, device="cuda")
    ops.get_mla_metadata(cache_seqlens, 132)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        meta, num_splits = ops.get_mla_metadata(cache_seqlens, 132)
    assert "get_mla_metadata" in cuda_calls
    # equal runs, then whole sequences ([100] * 32: two blocks each, one part each), then equal runs again
    for lengths in ([512] * 32, [32768] + [512] * 31, [100] * 32, list(range(0, 3200, 100))):
        cache_seqlens.copy_(torch.tensor(lengths, dtype=torch.int32))
        graph.replay()
        want = get_mla_metadata_reference(torch.tensor(lengths, dtype=torch.int32), 132)
        assert torch.equal(meta.cpu(), want[0]) and torch.equal(num_splits.cpu(), want[1])
