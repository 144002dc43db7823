"""The paged latent KV cache: per-layer block pools, a block allocator per sequence, and the static tensors
(`block_table`, `cache_seqlens`) that decode reads, updated in place so a compiled decode step sees the same tensors.

Token `t` of sequence `b` lives at flat slot `block_table[b, t // 64] * 64 + t % 64` of every layer's pool.
"""
import numbers

import torch

from flashmla_ops.kv_cache import FP8_BYTES, KV_LORA_RANK, PAGE_BLOCK_SIZE, ROPE_DIM

from .deepseek import DeepseekConfig

KV_CACHE_DTYPES = ("bf16", "fp8", "fp32")
FLOAT_CACHE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def is_int(value) -> bool:
    """An int (numpy's too), not a bool (numpy's bool is no Integral): the cache's rows, token counts and lengths index
    host lists and slices, so anything else is refused before its state changes (a float failed halfway: rows part
    updated, cache_seqlens stale); generation's token ids likewise."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class PagedKVCache:
    """Latent cache `kv_cache[layer]` `(num_blocks, 64, 1, 576)` bfloat16 or `(num_blocks, 64, 1, 656)` uint8 (FP8
    layout), and for V3.2 the indexer key cache `index_cache[layer]` `(num_blocks, 64, index_head_dim)` bfloat16 or
    `(num_blocks, 64, index_head_dim + 4)` uint8. All layers share one block numbering.

    `kv_cache_dtype` "bf16" (the default, the fast kernels), "fp8" (the 656-byte layout), or "fp32": both caches
    float32, the exact reference path for checking a float32 model (its decode runs the ops' float32 reference,
    slowly on a GPU); not meant for serving.

    Sequences are the rows `0 .. max_batch_size - 1` of `block_table` `(max_batch_size, max_blocks_per_seq)` int32
    and `cache_seqlens` `(max_batch_size,)` int32; `seq_lens` is the host copy of the lengths.

    Rows may share blocks (`fork`: a prompt prefilled once for several samples); `block_refs[block]` counts the rows
    holding it, a block returns to the pool when none does, and a row about to write into a shared block (its last,
    partly filled one) first copies it to a block of its own (copy on write, in every layer's pools).
    """

    def __init__(self, config: DeepseekConfig, num_blocks: int, max_batch_size: int, max_seq_len: int,
                 kv_cache_dtype: str = "bf16", device: torch.device | str = "cpu"):
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")
        d_qk = config.kv_lora_rank + config.qk_rope_head_dim
        self.is_fp8 = kv_cache_dtype == "fp8"
        if (config.kv_lora_rank, config.qk_rope_head_dim) != (KV_LORA_RANK, ROPE_DIM):
            raise ValueError(f"the paged cache (its ops: write_kv_cache, the decode kernels) holds the {KV_LORA_RANK} "
                             f"latent and {ROPE_DIM} RoPE columns of every DeepSeek model: kv_lora_rank must be "
                             f"{KV_LORA_RANK} and qk_rope_head_dim {ROPE_DIM}, got {config.kv_lora_rank} and "
                             f"{config.qk_rope_head_dim}")
        self.num_blocks = num_blocks
        self.max_blocks_per_seq = -(-max_seq_len // PAGE_BLOCK_SIZE)
        layers = range(config.num_hidden_layers)
        if self.is_fp8:
            self.kv_cache = [torch.zeros(num_blocks, PAGE_BLOCK_SIZE, 1, FP8_BYTES, dtype=torch.uint8, device=device)
                             for _ in layers]
        else:
            self.kv_cache = [torch.zeros(num_blocks, PAGE_BLOCK_SIZE, 1, d_qk,
                                         dtype=FLOAT_CACHE_DTYPES[kv_cache_dtype], device=device) for _ in layers]
        self.index_cache = None
        if config.is_sparse:
            d_i = config.index_head_dim
            shape, dtype = ((d_i + 4, torch.uint8) if self.is_fp8 else (d_i, FLOAT_CACHE_DTYPES[kv_cache_dtype]))
            self.index_cache = [torch.zeros(num_blocks, PAGE_BLOCK_SIZE, shape, dtype=dtype, device=device)
                                for _ in layers]
        self.block_table = torch.zeros(max_batch_size, self.max_blocks_per_seq, dtype=torch.int32, device=device)
        self.cache_seqlens = torch.zeros(max_batch_size, dtype=torch.int32, device=device)
        self.seq_lens = [0] * max_batch_size
        self.seq_blocks: list[list[int]] = [[] for _ in range(max_batch_size)]
        self.free_blocks = list(range(num_blocks - 1, -1, -1))
        self.block_refs = [0] * num_blocks
        # Updated in place between steps: static addresses, so a compiled decode step keeps its CUDA graph
        # (inductor otherwise skips graphs for mutated inputs). Their sizes (pool blocks, batch rows, blocks per
        # sequence) are symbolic from the start, so caches of other sizes reuse the compiled step instead of each
        # costing a compilation (CUDA graphs are still recorded per shape).
        for tensor in (*self.kv_cache, *(self.index_cache or ()), self.block_table, self.cache_seqlens):
            torch._dynamo.mark_static_address(tensor)
        for tensor in (*self.kv_cache, *(self.index_cache or ())):
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        torch._dynamo.maybe_mark_dynamic(self.block_table, 1)

    @property
    def max_seq_len(self) -> int:
        """Tokens one sequence can hold (its block_table row's blocks)."""
        return self.max_blocks_per_seq * PAGE_BLOCK_SIZE

    def check_room(self, lengths: dict[int, int], borrowed: dict[int, int] | None = None) -> None:
        """That each sequence `seq` can grow to `lengths[seq]` tokens, all of them together, before any does: a
        ValueError for a row the cache does not have or a length past max_seq_len, a RuntimeError when the pool has
        too few free blocks (so an extension happens whole or not at all). `borrowed[seq]`: blocks of another row
        that `seq` will share (a fork) instead of taking from the pool. A partly filled last block that k of its
        holders write into costs k copies, or k - 1 when they all do (the last then writes in place)."""
        more, writers = 0, {}
        borrowed = borrowed or {}
        for seq, end in lengths.items():
            if not 0 <= seq < len(self.seq_lens):
                raise ValueError(f"sequence {seq} is not a row of this cache (max_batch_size {len(self.seq_lens)})")
            if end > self.max_seq_len:
                raise ValueError(f"sequence {seq} would reach {end} tokens, more than max_seq_len "
                                 f"({self.max_seq_len})")
            more += max(0, -(-end // PAGE_BLOCK_SIZE) - len(self.seq_blocks[seq]) - borrowed.get(seq, 0))
            if self._copy_on_write(seq, end):
                block = self.seq_blocks[seq][self.seq_lens[seq] // PAGE_BLOCK_SIZE]
                writers[block] = writers.get(block, 0) + 1
        more += sum(min(count, self.block_refs[block] - 1) for block, count in writers.items())
        if more > len(self.free_blocks):
            raise RuntimeError(f"KV cache out of blocks: sequences {sorted(lengths)} need {more} more, "
                               f"{len(self.free_blocks)} free of {self.num_blocks}")

    def extend(self, seq: int, num_tokens: int) -> list[int]:
        """Make room for `num_tokens` more tokens of sequence `seq` (allocating blocks, writing its block_table row
        and cache_seqlens entry in place); returns their flat slots."""
        if not is_int(seq) or not is_int(num_tokens) or not 0 <= seq < len(self.seq_lens) or num_tokens < 0:
            raise ValueError(f"extend: seq must be in [0, {len(self.seq_lens)}) and num_tokens >= 0, got seq {seq}, "
                             f"num_tokens {num_tokens}")
        self.check_room({seq: self.seq_lens[seq] + num_tokens})
        start = self.seq_lens[seq]
        self._write_blocks(self._allocate(seq, num_tokens))
        self.cache_seqlens[seq] = self.seq_lens[seq]
        blocks = self.seq_blocks[seq]
        return [blocks[t // PAGE_BLOCK_SIZE] * PAGE_BLOCK_SIZE + t % PAGE_BLOCK_SIZE
                for t in range(start, self.seq_lens[seq])]

    def extend_batch(self, batch: int, num_tokens: int = 1) -> None:
        """`extend(seq, num_tokens)` for the sequences `0 .. batch - 1` (a decode step's), in one device op on
        `cache_seqlens` and one block_table write when blocks are allocated: per-sequence writes would each be a
        host-to-device copy on CUDA. Checked whole first: out of blocks, no sequence has grown."""
        if not is_int(batch) or not is_int(num_tokens) or not 0 <= batch <= len(self.seq_lens) or num_tokens < 0:
            raise ValueError(f"extend_batch: batch must be in [0, {len(self.seq_lens)}] and num_tokens >= 0, got "
                             f"batch {batch}, num_tokens {num_tokens}")
        ends = [length + num_tokens for length in self.seq_lens[:batch]]
        # only the sequences that cross into a new block take one (a decode step: one in 64, or none), or that write
        # into a block they share (copy on write: the first step after a fork)
        growing = {seq: end for seq, (end, blocks) in enumerate(zip(ends, self.seq_blocks))
                   if end > len(blocks) * PAGE_BLOCK_SIZE or self._copy_on_write(seq, end)}
        self.check_room(growing)
        self._write_blocks([new for seq in growing for new in self._allocate(seq, num_tokens)])
        self.seq_lens[:batch] = ends
        self.cache_seqlens[:batch] += num_tokens

    def _copy_on_write(self, seq: int, end: int) -> bool:
        """Whether growing `seq` to `end` tokens writes into a block it shares: its last block, partly filled."""
        length, blocks = self.seq_lens[seq], self.seq_blocks[seq]
        return (end > length and length % PAGE_BLOCK_SIZE != 0 and len(blocks) == -(-length // PAGE_BLOCK_SIZE)
                and self.block_refs[blocks[length // PAGE_BLOCK_SIZE]] > 1)

    def _allocate(self, seq: int, num_tokens: int) -> list[tuple[int, int, int]]:
        """Host bookkeeping of `extend`: grows `seq_lens[seq]` and its blocks (a shared last block first copied to a
        block of its own); returns the new block_table entries `(seq, column, block)` (not yet written)."""
        end = self.seq_lens[seq] + num_tokens  # room checked by the caller (`check_room`)
        blocks = self.seq_blocks[seq]
        new = []
        if self._copy_on_write(seq, end):
            column = self.seq_lens[seq] // PAGE_BLOCK_SIZE
            shared, own = blocks[column], self.free_blocks.pop()
            for pool in (*self.kv_cache, *(self.index_cache or ())):
                pool[own].copy_(pool[shared])
            self.block_refs[shared] -= 1
            self.block_refs[own] = 1
            blocks[column] = own
            new.append((seq, column, own))
        needed = -(-end // PAGE_BLOCK_SIZE)
        while len(blocks) < needed:
            new.append((seq, len(blocks), self.free_blocks.pop()))
            blocks.append(new[-1][2])
            self.block_refs[blocks[-1]] = 1
        self.seq_lens[seq] = end
        return new

    def _release(self, blocks: list[int]) -> None:
        """One row fewer holds each of `blocks`; those no row holds return to the pool."""
        for block in reversed(blocks):
            self.block_refs[block] -= 1
            if self.block_refs[block] == 0:
                self.free_blocks.append(block)

    def fork(self, seq: int, into: list[int]) -> None:
        """Rows `into` (each empty) become copies of row `seq`: they share its blocks (nothing is copied now: a row
        copies its partly filled last block when it first writes into it). E.g. one prompt prefilled once for several
        sampled continuations."""
        if not 0 <= seq < len(self.seq_lens):
            raise ValueError(f"fork: seq must be in [0, {len(self.seq_lens)}), got {seq}")
        for row in into:
            if not 0 <= row < len(self.seq_lens) or row == seq or self.seq_lens[row]:
                raise ValueError(f"fork: rows to fork into must be other, empty rows of the cache, got {row}")
        if len(set(into)) != len(into):
            raise ValueError(f"fork: each row to fork into once, got {into}")
        if not into:
            return
        for row in into:
            self.seq_blocks[row] = list(self.seq_blocks[seq])
            self.seq_lens[row] = self.seq_lens[seq]
            for block in self.seq_blocks[seq]:
                self.block_refs[block] += 1
        rows = torch.tensor(into, dtype=torch.int64).to(self.block_table.device)
        self.block_table[rows] = self.block_table[seq].clone()
        self.cache_seqlens[rows] = self.cache_seqlens[seq].clone()

    def _write_blocks(self, new: list[tuple[int, int, int]]) -> None:
        """Write block_table entries `(seq, column, block)`, with one host-to-device copy."""
        if new:
            entries = torch.tensor(new, dtype=torch.int64).to(self.block_table.device)
            self.block_table[entries[:, 0], entries[:, 1]] = entries[:, 2].to(torch.int32)

    def truncate(self, lengths: dict[int, int]) -> None:
        """Cut each sequence `seq` back to its first `lengths[seq]` tokens (at most its length), returning the blocks
        past them to the pool; `cache_seqlens` is written in one host-to-device copy."""
        for seq, length in lengths.items():
            if (not is_int(seq) or not is_int(length) or not 0 <= seq < len(self.seq_lens)
                    or not 0 <= length <= self.seq_lens[seq]):
                raise ValueError(f"truncate: sequence {seq} must be a row of this cache and its length in [0, its "
                                 f"{self.seq_lens[seq] if is_int(seq) and 0 <= seq < len(self.seq_lens) else '?'} "
                                 f"tokens], got {length}")
        for seq, length in lengths.items():
            blocks = self.seq_blocks[seq]
            keep = -(-length // PAGE_BLOCK_SIZE)
            self._release(blocks[keep:])
            del blocks[keep:]
            self.seq_lens[seq] = length
        if lengths:
            rows = torch.tensor(list(lengths), dtype=torch.int64)
            values = torch.tensor(list(lengths.values()), dtype=torch.int32)
            self.cache_seqlens[rows.to(self.cache_seqlens.device)] = values.to(self.cache_seqlens.device)

    def free(self, seq: int) -> None:
        """Return sequence `seq`'s blocks to the pool and empty it."""
        if not 0 <= seq < len(self.seq_lens):
            raise ValueError(f"free: seq must be in [0, {len(self.seq_lens)}), got {seq}")
        self._release(self.seq_blocks[seq])
        self.seq_blocks[seq] = []
        self.seq_lens[seq] = 0
        self.cache_seqlens[seq] = 0
        self.block_table[seq] = 0

    def reset(self) -> None:
        """Free every sequence (the pools keep their contents; nothing reads freed slots)."""
        for seq in range(len(self.seq_lens)):
            self.free(seq)
