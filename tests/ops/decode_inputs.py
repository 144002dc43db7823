"""Random paged-decode inputs shared by the decode kernel tests (Triton and CUDA)."""
import torch

from flashmla_ops import reference
from flashmla_ops.kv_cache import D_QK, PAGE_BLOCK_SIZE

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(seqlens, s_q, h_q, is_fp8, generator, padded=False):
    batch = len(seqlens)
    blocks_per_seq = max(1, -(-max(seqlens) // PAGE_BLOCK_SIZE)) + 1  # spare capacity
    num_blocks = batch * blocks_per_seq + 3
    cache = torch.randn(num_blocks, PAGE_BLOCK_SIZE, 1, D_QK, generator=generator, device=DEVICE).to(torch.bfloat16)
    if is_fp8:
        cache = reference.quantize_kv_fp8(cache)
    if padded:  # a cache that is a slice of a wider buffer (block stride > 64 rows, by 64 bytes)
        row = cache.shape[-1]
        buffer = torch.zeros(num_blocks, PAGE_BLOCK_SIZE * row + 64 // cache.element_size(), dtype=cache.dtype,
                             device=DEVICE)
        buffer[:, :PAGE_BLOCK_SIZE * row] = cache.reshape(num_blocks, -1)
        cache = buffer[:, :PAGE_BLOCK_SIZE * row].view(num_blocks, PAGE_BLOCK_SIZE, 1, row)
    block_table = torch.randperm(num_blocks, generator=generator, device=DEVICE)[:batch * blocks_per_seq]
    block_table = block_table.view(batch, blocks_per_seq).int()
    cache_seqlens = torch.tensor(seqlens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(batch, s_q, h_q, D_QK, generator=generator, device=DEVICE).to(torch.bfloat16)
    return q, cache, block_table, cache_seqlens


def poison_allocator(num_bytes: int) -> None:
    """Fill memory the caching allocator hands out next with NaN, so that unwritten outputs show (CUDA only: the
    CPU allocator gives no such reuse)."""
    if DEVICE == "cuda":
        torch.full((num_bytes // 4,), float("nan"), device=DEVICE)
