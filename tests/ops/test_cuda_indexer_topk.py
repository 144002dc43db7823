"""The CUDA top-k of `flashmla::indexer_topk` (csrc/indexer_topk.cu, a radix select) against the reference
(torch.topk), on Hopper: selections compared as sorted multisets of the selected logits plus the exact count of -1;
the output ascending by key, ties at the threshold taken from the lowest positions; heavy ties, -inf, +inf, signed
zeros, keys one float step apart, rows shorter than k and with no finite key; rows held in shared memory and rows too
long for it (read from global memory), 16-byte aligned and not; int32 and int64 block tables; outputs poisoned;
repeated runs identical; the op dispatches here, also for an empty batch, and replays in a CUDA graph."""
import pytest
import torch
from decode_inputs import HOPPER

import flashmla_ops
from flashmla_ops import _ext
from flashmla_ops.indexer import indexer_topk_reference
from flashmla_ops.kv_cache import PAGE_BLOCK_SIZE

DEVICE = "cuda"
SHARED_KEYS = 48 * 1024  # csrc/indexer_topk.cu's kSharedKeys: longer rows are read from global memory in each pass
pytestmark = [
    pytest.mark.gpu,
    HOPPER,
]


def poison_allocator():
    torch.full((64 << 20,), -7, dtype=torch.int32, device=DEVICE)


def cuda_topk(logits, topk, block_table=None):
    poison_allocator()
    return _ext.extension().indexer_topk(logits, topk, block_table)


def assert_selection_matches(got, logits, want):
    """Per row: the same count of -1, -1 only after the selected keys, no key twice, keys ascending, and the selected
    logits equal the reference selection's as sorted multisets."""
    assert got.shape == want.shape and got.dtype == torch.int32
    rows = logits.reshape(-1, logits.shape[-1])
    got_rows, want_rows = got.reshape(rows.shape[0], -1).long(), want.reshape(rows.shape[0], -1).long()
    assert torch.equal((got_rows == -1).sum(-1), (want_rows == -1).sum(-1))
    for r in range(rows.shape[0]):
        count = int((got_rows[r] >= 0).sum())
        assert (got_rows[r, count:] == -1).all(), "a -1 before a selected key"
        chosen = got_rows[r, :count]
        assert (chosen[1:] > chosen[:-1]).all(), "keys not strictly ascending (or one twice)"
        assert torch.equal(rows[r, chosen].sort().values, rows[r, want_rows[r][want_rows[r] >= 0]].sort().values)


def check(logits, topk):
    got = cuda_topk(logits, topk)
    assert_selection_matches(got, logits, indexer_topk_reference(logits, topk))
    assert torch.equal(got, cuda_topk(logits, topk))
    return got


def hard_rows(num_keys, generator):
    """Rows that each stress one part of the select (`num_keys` >= 300)."""
    steps = torch.randperm(num_keys, generator=generator, device=DEVICE)
    rows = torch.randn(10, num_keys, generator=generator, device=DEVICE)
    rows[0] = torch.randint(0, 4, (num_keys,), generator=generator, device=DEVICE).float()  # heavy ties
    rows[1, 5:] = float("-inf")  # fewer finite keys than k
    rows[2] = float("-inf")  # nothing visible
    rows[3, ::2] = float("inf")
    rows[4] = -torch.rand(num_keys, generator=generator, device=DEVICE) - 1e30  # all negative, huge
    rows[5, : num_keys // 3] = 0.0
    rows[5, num_keys // 3: 2 * num_keys // 3] = -0.0
    rows[6] = 1.0 + (steps % (1 << 20)) * 2.0 ** -23  # one float step apart: the same top 24 bits
    rows[7] = torch.where(steps % 2 == 0, 1.0, -1.0) * (1.0 + (steps // 2 % (1 << 20)) * 2.0 ** -23)
    rows[8] = torch.ldexp(torch.ones_like(rows[8]), (steps % 60 - 30).int()) * torch.where(steps % 3 == 0, -1.0, 1.0)
    rows[9] = (steps % 7).float() * 2.0 ** -20 - 3.0  # ties among keys apart in the last bits
    return rows


@pytest.mark.parametrize("num_keys", [300, 301, 4099, SHARED_KEYS, SHARED_KEYS + 3, 131072])
def test_cuda_topk_hard_rows(num_keys):
    logits = hard_rows(num_keys, torch.Generator(DEVICE).manual_seed(num_keys))
    for topk in (1, 2, 7, 255, 256, 257, 299, 300, 333, 1023, 1024, 1025, 2048):  # k at the 10-bit digits' edges
        got = check(logits, topk)
        # ties at the threshold go to the lowest positions (row 0: values 0..3, many of each)
        chosen = got[0][got[0] >= 0].long()
        threshold = logits[0, chosen].min()
        ties = chosen[logits[0, chosen] == threshold]
        all_ties = (logits[0] == threshold).nonzero().flatten()
        assert torch.equal(ties, all_ties[:ties.numel()])


def test_cuda_topk_unaligned_rows_and_leading_dims():
    """A row start that is not 16-byte aligned (a slice's offset), leading dims flattened, k above num_keys."""
    generator = torch.Generator(DEVICE).manual_seed(2)
    base = torch.randn(3 * 2 * 1001 + 1, generator=generator, device=DEVICE)
    logits = base[1:].view(3, 2, 1001)
    for topk in (1, 500, 1001, 1500):
        check(logits, topk)


def test_cuda_topk_empty_and_keyless():
    assert cuda_topk(torch.empty(0, 100, device=DEVICE), 16).shape == (0, 16)
    assert torch.equal(cuda_topk(torch.empty(3, 0, device=DEVICE), 4), torch.full((3, 4), -1, device=DEVICE,
                                                                                    dtype=torch.int32))


@pytest.mark.parametrize("table_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("num_keys", [200, 32768, 65536 + 64])
def test_cuda_topk_block_table(table_dtype, num_keys):
    """With a block table: the same selection as without, each position translated to its flat cache slot."""
    generator = torch.Generator(DEVICE).manual_seed(5 + num_keys)
    batch, s_q, blocks = 2, 3, (num_keys + PAGE_BLOCK_SIZE - 1) // PAGE_BLOCK_SIZE + 1
    block_table = torch.randperm(batch * blocks + 7, generator=generator, device=DEVICE)[:batch * blocks]
    block_table = block_table.view(batch, blocks).to(table_dtype)
    logits = torch.randn(batch, s_q, num_keys, generator=generator, device=DEVICE)
    logits[0, 0, 50:] = float("-inf")
    logits[1, 2] = torch.randint(0, 3, (num_keys,), generator=generator, device=DEVICE).float()
    positions = check(logits, 60).long()
    slots = cuda_topk(logits, 60, block_table)
    blocks_of = torch.gather(block_table.long(), 1, (positions.clamp_min(0) // PAGE_BLOCK_SIZE).flatten(1))
    want = torch.where(positions >= 0, blocks_of.view_as(positions) * PAGE_BLOCK_SIZE + positions % PAGE_BLOCK_SIZE, -1)
    assert torch.equal(slots.long(), want)


@pytest.mark.parametrize("rows,num_keys,topk", [(8, 131072, 2048), (300, 32768, 2048), (64, 5000, 512)])
def test_cuda_topk_random_rows(rows, num_keys, topk):
    generator = torch.Generator(DEVICE).manual_seed(rows + num_keys)
    logits = torch.randn(rows, num_keys, generator=generator, device=DEVICE)
    logits[1] = torch.randint(0, 50, (num_keys,), generator=generator, device=DEVICE).float()
    logits[2, 1000:] = float("-inf")
    check(logits, topk)


def test_cuda_topk_op_dispatch_and_cuda_graph():
    """The op takes the kernel (its output ascending, unlike torch.topk's) and replays in a CUDA graph on new
    logits."""
    assert flashmla_ops.backend("indexer_topk", DEVICE) == "cuda"
    generator = torch.Generator(DEVICE).manual_seed(8)
    block_table = torch.arange(2 * 40, device=DEVICE, dtype=torch.int32).flip(0).view(2, 40)
    logits = torch.randn(2, 2, 40 * PAGE_BLOCK_SIZE, generator=generator, device=DEVICE)
    got = torch.ops.flashmla.indexer_topk(logits, 256, None)
    assert torch.equal(got, cuda_topk(logits, 256))
    assert torch.ops.flashmla.indexer_topk(logits[:0], 256, None).shape == (0, 2, 256)
    graph = torch.cuda.CUDAGraph()
    torch.ops.flashmla.indexer_topk(logits, 256, block_table)
    with torch.cuda.graph(graph):
        slots = torch.ops.flashmla.indexer_topk(logits, 256, block_table)
    logits.copy_(torch.randn(logits.shape, generator=generator, device=DEVICE))
    logits[1, 0, 100:] = float("-inf")
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(slots, cuda_topk(logits, 256, block_table))
    positions = cuda_topk(logits, 256)
    assert_selection_matches(positions, logits, indexer_topk_reference(logits, 256))


def test_rows_of_8k_keys_in_a_fresh_process():
    """8193-12288 keys a row: the codes (4 bytes a key) plus the kernel's ~16 KiB of static shared memory pass the
    48 KiB that needs no opt-in, while the codes alone do not. A process whose first top-k has such rows (an 8k
    context) must set the limit itself; in this file's process a longer row may already have raised it."""
    import subprocess
    import sys

    script = ("import torch, flashmla_ops\n"
              "from flashmla_ops.indexer import indexer_topk_reference\n"
              "logits = torch.randn(4, 8192 + 64, device='cuda')\n"
              "got = torch.ops.flashmla.indexer_topk(logits, 2048, None)\n"
              "want = indexer_topk_reference(logits, 2048)\n"
              "assert torch.equal(logits.gather(-1, got.long()).sort(-1).values,"
              " logits.gather(-1, want.long()).sort(-1).values)\n"
              "print('ok', flashmla_ops.backend('indexer_topk', 'cuda'))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.split() == ["ok", "cuda"], done.stdout + done.stderr


def test_block_entries_past_int32_slots_give_no_token(monkeypatch):
    """Block entries of 2**25 and more (refused where values are checked; on the GPU only with FLASHMLA_CHECK=1) would
    make slots past int32, which wrapped to other, real-looking slots (2**26 * 64 + 6 -> 6): the kernel writes -1."""
    monkeypatch.delenv("FLASHMLA_CHECK", raising=False)
    logits = torch.full((1, 1, 4 * PAGE_BLOCK_SIZE), float("-inf"), device=DEVICE)
    logits[0, 0, [6, 70, 130, 200]] = torch.tensor([4.0, 3.0, 2.0, 1.0], device=DEVICE)
    table = torch.tensor([[2 ** 26, 2 ** 25 - 1, 2 ** 25, 3]], dtype=torch.int32, device=DEVICE)
    got = cuda_topk(logits, 4, table)
    assert sorted(got.flatten().tolist()) == [-1, -1, 3 * PAGE_BLOCK_SIZE + 8, (2 ** 25 - 1) * PAGE_BLOCK_SIZE + 6]


@pytest.mark.parametrize("num_keys,topk", [(300, 64), (5000, 2048), (70000, 2048)])
def test_the_kernel_and_the_reference_select_the_same_keys_in_the_same_order(num_keys, topk):
    """Stop 47 made the reference select as the kernel says it does (ties at the threshold from the lowest positions,
    ascending key order, -1 after): the two are equal index for index, on rows of many ties (relu'd scores rounded,
    as V3.2's logits tie at 0) and on random ones; since stop 60 also on ties of -0 and +0 and on NaNs of both signs
    (the kernel's total order, which the reference now ranks by; not yet run on a GPU at stop 60)."""
    generator = torch.Generator(DEVICE).manual_seed(num_keys + topk)
    tied = torch.relu(torch.randn(4, num_keys, generator=generator, device=DEVICE)).round(decimals=1)
    spread = torch.randn(4, num_keys, generator=generator, device=DEVICE)
    spread[0, num_keys // 3:] = float("-inf")
    signs = torch.where(torch.rand(4, num_keys, generator=generator, device=DEVICE) < 0.5, -1.0, 1.0)
    signed = tied * signs  # -0 and +0 among the ties
    nans = torch.rand(4, num_keys, generator=generator, device=DEVICE) < 0.01
    nan = torch.full_like(signed, float("nan"))
    signed = torch.where(nans, torch.where(signs < 0, -nan, nan), signed)  # negation sets the sign bit
    signed[3, ::5] = float("inf")
    for logits in (tied, spread, signed):
        assert torch.equal(cuda_topk(logits, topk), indexer_topk_reference(logits, topk))
