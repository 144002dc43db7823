"""Randomized properties of `PagedKVCache` (fork, copy on write, truncate, free, reset, out-of-blocks refusals) and of
generation over it: whatever the sequence of operations, every block is free or held (never both), counted by the
rows that hold it, and each row reads back exactly the tokens it was given (model-free: a marker per token and pool;
with a model: a fresh prefill's cache of the row's history)."""
import random

import numpy as np
import pytest
import torch

from models import DeepseekConfig, PagedKVCache, generate, prefill, random_model, tiny_config

B = 64


def assert_blocks_consistent(cache: PagedKVCache) -> None:
    held = {block for blocks in cache.seq_blocks for block in blocks}
    assert len(set(cache.free_blocks)) == len(cache.free_blocks), "a block in the free list twice"
    assert not held & set(cache.free_blocks), "a block both free and held"
    assert len(held) + len(cache.free_blocks) == cache.num_blocks, "a block neither free nor held (leaked)"
    for block in range(cache.num_blocks):
        assert cache.block_refs[block] == sum(blocks.count(block) for blocks in cache.seq_blocks), block
    assert cache.cache_seqlens.tolist() == cache.seq_lens
    for seq, blocks in enumerate(cache.seq_blocks):
        assert len(blocks) == -(-cache.seq_lens[seq] // B)
        assert cache.block_table[seq, :len(blocks)].tolist() == blocks


def row_values(cache: PagedKVCache, seq: int) -> list[torch.Tensor]:
    """Each pool's rows for row `seq`'s tokens, read through its block_table row (as the ops read them)."""
    n = cache.seq_lens[seq]
    t = torch.arange(n)
    slots = cache.block_table[seq, t // B].long() * B + t % B
    return [pool.reshape(-1, *pool.shape[2:])[slots] for pool in (*cache.kv_cache, *(cache.index_cache or ()))]


@pytest.mark.parametrize("kv_cache_dtype,model_type", [("bf16", "deepseek_v3"), ("fp8", "deepseek_v32"),
                                                        ("fp32", "deepseek_v32")])
@pytest.mark.parametrize("seed", range(4))
def test_random_cache_operations_keep_rows_and_pool_consistent(kv_cache_dtype, model_type, seed):
    """Random extend / extend_batch (a marker written into every new token's first value, each pool) / fork /
    truncate / free / reset, some refused for want of blocks: after each, the pool is consistent and every row reads
    its own markers (a shared block written by another row, or a freed block handed to another, shows)."""
    rng = random.Random(seed)
    config = DeepseekConfig.from_dict(tiny_config(model_type))
    rows = 4
    cache = PagedKVCache(config, num_blocks=rng.randint(3, 10), max_batch_size=rows,
                         max_seq_len=rng.choice([128, 192]), kv_cache_dtype=kv_cache_dtype)
    pools = (*cache.kv_cache, *(cache.index_cache or ()))
    shadow: list[list[int]] = [[] for _ in range(rows)]  # each row's markers, token by token
    counter = iter(range(10 ** 9))

    def write(seq: int, start: int, end: int) -> None:
        for t in range(start, end):
            marker = next(counter) % 200 + 1
            block = cache.block_table[seq, t // B].item()
            for pool in pools:
                pool[block, t % B].reshape(-1)[0] = marker
            shadow[seq].append(marker)

    for _ in range(120):
        op = rng.choice(["extend", "batch", "fork", "truncate", "truncate", "free", "reset"])
        try:
            if op == "extend":
                seq, n = rng.randrange(rows), rng.choice([0, 1, 5, 63, 64, 65, 130])
                start = cache.seq_lens[seq]
                cache.extend(seq, n)
                write(seq, start, start + n)
            elif op == "batch":
                batch, n = rng.randint(0, rows), rng.choice([0, 1, 1, 2, 70])
                starts = list(cache.seq_lens[:batch])
                cache.extend_batch(batch, n)
                for seq in range(batch):
                    write(seq, starts[seq], starts[seq] + n)
            elif op == "fork":
                seq = rng.randrange(rows)
                into = [r for r in range(rows) if r != seq and cache.seq_lens[r] == 0 and rng.random() < 0.7]
                cache.fork(seq, into)
                for row in into:
                    shadow[row] = list(shadow[seq])
                if rng.random() < 0.5:  # every sharer writes a token at once: each into a last block of its own
                    for row in [seq, *into]:
                        start = cache.seq_lens[row]
                        cache.extend(row, 1)
                        write(row, start, start + 1)
            elif op == "truncate":
                lengths = {}
                for seq in rng.sample(range(rows), rng.randint(1, rows)):
                    n = cache.seq_lens[seq]
                    lengths[seq] = rng.choice([0, n, n // 2, n // B * B, max(0, n - 1), rng.randint(0, n)])
                cache.truncate(lengths)
                for seq, n in lengths.items():
                    del shadow[seq][n:]
            elif op == "free":
                seq = rng.randrange(rows)
                cache.free(seq)
                shadow[seq] = []
            elif rng.random() < 0.2:
                cache.reset()
                shadow = [[] for _ in range(rows)]
        except (RuntimeError, ValueError) as error:  # refused whole: nothing changed
            assert "out of blocks" in str(error) or "max_seq_len" in str(error), error
        assert_blocks_consistent(cache)
        for seq in range(rows):
            for values in row_values(cache, seq):
                assert values.flatten(1)[:, 0].tolist() == shadow[seq], (op, seq)


@torch.no_grad()
@pytest.mark.parametrize("model_type", ["deepseek_v3", "deepseek_v32"])
def test_random_generation_keeps_each_row_a_fresh_prefill_of_its_tokens(model_type):
    """prefill (fresh, shared and continued rows, in passes of 3 or 512), generate (some runs failing at a decode
    step, then cut back), fork, truncate and free in random order on a float32 cache: every row's latent and indexer
    rows equal a fresh prefill's of the tokens it holds, and no run is refused for want of blocks after a pass."""
    rng = random.Random(11)
    config = DeepseekConfig.from_dict(tiny_config(model_type, index_topk=512))  # top-k over all: no near-ties
    model = random_model(config, seed=1)
    passes = []
    model.register_forward_pre_hook(lambda module, args: passes.append(len(args[0])))
    rows = 4
    cache = PagedKVCache(config, num_blocks=12, max_batch_size=rows, max_seq_len=256, kv_cache_dtype="fp32")
    history: list[list[int]] = [[] for _ in range(rows)]

    def tokens(n: int) -> list[int]:
        return [rng.randrange(2, config.vocab_size) for _ in range(n)]

    def failing_step(model, cache, step_tokens):
        raise KeyError("the device went away")

    for _ in range(20):
        op = rng.choice(["prefill", "generate", "fail", "fork", "truncate", "free"])
        passes.clear()
        try:
            if op in ("prefill", "generate", "fail"):
                common = tokens(rng.choice([3, 60, 70]))
                prompts = [list(common) if rng.random() < 0.5 else tokens(rng.choice([1, 30, 65]))
                           for _ in range(rng.randint(1, rows))]
                if op == "prefill":
                    prefill(model, cache, prompts, chunk=rng.choice([3, 512]))
                    for seq, prompt in enumerate(prompts):
                        history[seq] += prompt
                elif op == "generate":
                    outputs, _ = generate(model, cache, prompts, rng.choice([1, 3]), eos_token_ids=(), chunk=7)
                    for seq, (prompt, output) in enumerate(zip(prompts, outputs)):
                        history[seq] += prompt + output[:-1]
                else:
                    with pytest.raises(KeyError):
                        generate(model, cache, prompts, 3, eos_token_ids=(), step=failing_step)
            elif op == "fork":
                seq = rng.randrange(rows)
                into = [r for r in range(rows) if r != seq and cache.seq_lens[r] == 0]
                cache.fork(seq, into)
                for row in into:
                    history[row] = list(history[seq])
            elif op == "truncate":
                lengths = {seq: rng.choice([0, len(h) // 2, len(h) // B * B, max(0, len(h) - 1)])
                           for seq, h in enumerate(history)}
                cache.truncate(lengths)
                for seq, n in lengths.items():
                    del history[seq][n:]
            else:
                seq = rng.randrange(rows)
                cache.free(seq)
                history[seq] = []
        except (RuntimeError, ValueError) as error:  # refused before any pass
            assert ("out of blocks" in str(error) or "max_seq_len" in str(error)) and passes == [], (op, error, passes)
        assert_blocks_consistent(cache)
        assert cache.seq_lens == [len(h) for h in history]
        for seq, held in enumerate(history):
            if held:
                fresh = PagedKVCache(config, num_blocks=8, max_batch_size=1, max_seq_len=512, kv_cache_dtype="fp32")
                prefill(model, fresh, [held])
                for got, want in zip(row_values(cache, seq), row_values(fresh, 0)):
                    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("call", [
    lambda cache: cache.truncate({0: 10, 1: 50.0}),
    lambda cache: cache.truncate({0: 10, 1: True}),
    lambda cache: cache.extend(0, 3.0),
    lambda cache: cache.extend_batch(2, 1.0),
    lambda cache: cache.extend_batch(2.0, 1),
])
def test_a_non_int_count_is_refused_before_anything_changes(call):
    """Lengths, counts and rows must be ints (numpy's too): a float was taken until it failed halfway, leaving rows
    cut or grown on the host while `cache_seqlens` (what the ops read) still held the old lengths, over blocks
    already back in the pool."""
    config = DeepseekConfig.from_dict(tiny_config("deepseek_v3"))
    cache = PagedKVCache(config, num_blocks=6, max_batch_size=2, max_seq_len=256)
    cache.extend(0, 100)
    cache.extend(1, 64)
    before = ([list(b) for b in cache.seq_blocks], list(cache.seq_lens), list(cache.free_blocks),
              cache.block_table.clone(), cache.cache_seqlens.clone())
    with pytest.raises(ValueError):
        call(cache)
    after = (cache.seq_blocks, cache.seq_lens, cache.free_blocks, cache.block_table, cache.cache_seqlens)
    assert before[:3] == after[:3] and all(torch.equal(a, b) for a, b in zip(before[3:], after[3:]))
    assert all(type(n) is int for n in cache.seq_lens)
    cache.truncate({0: np.int64(70), 1: 0})  # numpy ints are ints
    cache.extend(1, np.int64(3))
    assert cache.seq_lens == [70, 3] and cache.cache_seqlens.tolist() == [70, 3]
    assert_blocks_consistent(cache)
