"""Batched generation over the paged cache: prefill the prompts packed (or, into rows that hold an earlier turn, as
continuations through the decode path), then decode one token per sequence per step (greedy, or temperature + top-p
sampling) until EOS or `max_new_tokens`.

The decode step reads only static tensors (the cache's pools, `block_table`, `cache_seqlens`, updated in place by
`PagedKVCache.extend`) and never syncs with the host, so `torch.compile(decode_step, fullgraph=True)` traces it whole
and, on CUDA, captures it in a CUDA graph (`compile_decode_step`).
"""
import functools
import math
import time
from dataclasses import dataclass

import torch

from flashmla_ops import num_sm_parts
from flashmla_ops.kv_cache import PAGE_BLOCK_SIZE
from flashmla_ops.interface import dense_kernel_reads_schedule

from .cache import PagedKVCache, is_int
from .deepseek import TORCH_RELEASE, DeepseekForCausalLM, PrefillMetadata, decode_metadata


# Tokens per forward pass when prompts continue cached sequences (`prefill`): each pass reads every weight once and
# holds its tokens' activations (V3.2: their indexer logits, `tokens x max_seq_len` float32; on the ops' reference path
# also `tokens x heads x context` scores in tiles).
CONTINUATION_CHUNK = 512


def prefill(model: DeepseekForCausalLM, cache: PagedKVCache, prompts: list[list[int]],
            last_only: bool = True, chunk: int = CONTINUATION_CHUNK) -> torch.Tensor:
    """Run prompt `b` into cache row `b`; returns each prompt's last-token logits `(batch, vocab)` float32, or with
    `last_only=False` every token's, packed in prompt order `(sum of lengths, vocab)`.

    Empty rows take their prompts packed into one pass: causal attention over the prompt alone (V2/V3: keys and values
    expanded from the latent by kv_b_proj; V3.2: sparse attention over the prompt's indexer top-k). Empty rows with the
    same prompt (several samples of one prompt) prefill it once and share its blocks (`PagedKVCache.fork`). A row that
    already holds tokens (an earlier turn: `generate` leaves its sequences cached, all but the last token it returned,
    which then starts the next prompt) is continued: its prompt attends to the cached tokens and causally to itself
    through the decode path (the absorbed attention over the paged cache, the prompt's tokens as `s_q` queries: the
    decode ops with causal masking; V3.2: the paged indexer's top-k), rows whose prompts have the same length in one
    batch, in passes of at most `chunk` tokens (so a long prompt can also be run as a short first prompt and its
    continuation: chunked prefill). Its logits are a fresh prefill's of the whole sequence up to rounding (V3.2: and to
    the indexer's choice at a near-tie of its top-k, which the two paths' logits may break differently).

    All rows are checked to have room first (nothing is cached otherwise); if a pass fails, every row is cut back to
    its length before the call."""
    _check_prompts("prefill", model, cache, prompts)
    chunk = _check_chunk("prefill", chunk)
    before = {seq: cache.seq_lens[seq] for seq in range(len(prompts))}
    # empty rows with the same prompt: one of them prefilled, the others forked from it (all its blocks shared)
    same = _same_prompts(cache, prompts)
    borrowed = {seq: -(-len(prompts[seq]) // PAGE_BLOCK_SIZE) for rows in same.values() for seq in rows[1:]}
    cache.check_room({seq: before[seq] + len(prompt) for seq, prompt in enumerate(prompts)}, borrowed)  # all, or none
    try:
        leaders = [rows[0] for rows in same.values()]
        if len(leaders) == len(prompts):  # the usual case: distinct prompts into empty rows, one packed pass
            return _packed_prefill(model, cache, list(enumerate(prompts)), last_only)
        logits = {}
        if leaders:
            packed = _packed_prefill(model, cache, [(seq, prompts[seq]) for seq in leaders], last_only)
            sizes = [1 if last_only else len(prompts[seq]) for seq in leaders]
            for rows, part in zip(same.values(), packed.split(sizes)):
                cache.fork(rows[0], rows[1:])
                logits.update((seq, part) for seq in rows)
        logits.update(_continue(model, cache, [(seq, prompt) for seq, prompt in enumerate(prompts) if before[seq]],
                                last_only, chunk))
        return torch.cat([logits[seq] for seq in range(len(prompts))])
    except BaseException:
        cache.truncate({seq: length for seq, length in before.items() if cache.seq_lens[seq] > length})
        raise


def _same_prompts(cache: PagedKVCache, prompts: list[list[int]]) -> dict[tuple[int, ...], list[int]]:
    """The empty rows given each prompt, in row order (the first prefills it, the others fork from it)."""
    same: dict[tuple[int, ...], list[int]] = {}
    for seq, prompt in enumerate(prompts):
        if cache.seq_lens[seq] == 0:
            same.setdefault(tuple(prompt), []).append(seq)
    return same


def _packed_prefill(model: DeepseekForCausalLM, cache: PagedKVCache, prompts: list[tuple[int, list[int]]],
                    last_only: bool) -> torch.Tensor:
    """Prompts `(row, tokens)` into their empty rows, packed into one pass (see `prefill`)."""
    device = cache.block_table.device
    slots, k_start, k_end, positions = [], [], [], []
    start = 0
    for seq, prompt in prompts:
        length = len(prompt)
        slots += cache.extend(seq, length)
        positions += range(length)
        k_start += [start] * length
        k_end += range(start + 1, start + length + 1)
        start += length
    as_tensor = lambda values, dtype: torch.tensor(values, dtype=dtype, device=device)  # noqa: E731
    lengths = [len(prompt) for _, prompt in prompts]
    metadata = PrefillMetadata(as_tensor(slots, torch.int64), as_tensor(k_start, torch.int32),
                               as_tensor(k_end, torch.int32), tuple(lengths))
    input_ids = as_tensor([token for _, prompt in prompts for token in prompt], torch.int64)
    last_rows = torch.cumsum(as_tensor(lengths, torch.int64), 0) - 1 if last_only else None
    return model(input_ids, as_tensor(positions, torch.int64), metadata, cache, logits_rows=last_rows)


def _continue(model: DeepseekForCausalLM, cache: PagedKVCache, prompts: list[tuple[int, list[int]]],
              last_only: bool, chunk: int) -> dict[int, torch.Tensor]:
    """Prompts `(row, tokens)` after their rows' cached tokens, through the decode path (see `prefill`): rows whose
    prompts have the same length go together, as one decode step of `s_q` = that length (or `chunk` tokens at a time,
    and at most `chunk` tokens a pass in all). Returns row -> its last token's logits `(1, vocab)` or every token's
    `(len(prompt), vocab)`."""
    device = cache.block_table.device
    logits: dict[int, list[torch.Tensor]] = {seq: [] for seq, _ in prompts}
    by_length: dict[int, list[tuple[int, list[int]]]] = {}
    for seq, prompt in prompts:
        by_length.setdefault(len(prompt), []).append((seq, prompt))
    for length, group in by_length.items():
        for first in range(0, length, chunk):
            s_q = min(chunk, length - first)
            last_pass = first + s_q == length
            rows_per_pass = max(1, chunk // s_q)
            for start in range(0, len(group), rows_per_pass):
                rows = group[start:start + rows_per_pass]
                for seq, _ in rows:
                    cache.extend(seq, s_q)
                index = torch.tensor([seq for seq, _ in rows], dtype=torch.int64, device=device)
                metadata = decode_metadata(cache.block_table[index], cache.cache_seqlens[index], s_q)
                tokens = torch.tensor([token for _, prompt in rows for token in prompt[first:first + s_q]],
                                      dtype=torch.int64, device=device)
                wanted = None
                if last_only:  # each row's last token in its last pass; none before
                    wanted = (torch.arange(len(rows), device=device) * s_q + s_q - 1 if last_pass
                              else torch.empty(0, dtype=torch.int64, device=device))
                out = model(tokens, metadata.positions, metadata, cache, logits_rows=wanted)
                if not last_only or last_pass:
                    for (seq, _), row_logits in zip(rows, out.view(len(rows), -1, out.shape[-1])):
                        logits[seq].append(row_logits)
    return {seq: torch.cat(parts) for seq, parts in logits.items()}


def _check_prompts(op: str, model: DeepseekForCausalLM, cache: PagedKVCache, prompts: list[list[int]]) -> None:
    """One prompt per cache row `0 .. len(prompts) - 1` (empty, or holding an earlier turn it continues), each prompt
    non-empty token ids (ints) of the vocabulary; a cache made for the model's config."""
    layers, sparse = model.config.num_hidden_layers, model.config.is_sparse
    if len(cache.kv_cache) != layers or (cache.index_cache is not None) != sparse:
        raise ValueError(f"{op}: the cache must be made for the model's config ({layers} layers, "
                         f"{'with' if sparse else 'without'} the indexer's key cache), got {len(cache.kv_cache)} "
                         f"layers, {'with' if cache.index_cache is not None else 'without'} one")
    wrong = [prompts] if not isinstance(prompts, (list, tuple)) else [
        item for prompt in prompts
        for item in ([prompt] if not isinstance(prompt, (list, tuple)) else [t for t in prompt if not is_int(t)])]
    if wrong:
        raise TypeError(f"{op}: prompts must be a list of prompts, each a list of token ids (ints; a tensor's "
                        f"tolist()), got {type(wrong[0]).__name__} {str(wrong[0])[:40]}")
    if not 1 <= len(prompts) <= len(cache.seq_lens):
        raise ValueError(f"{op}: prompts must hold 1 to {len(cache.seq_lens)} prompts (the cache's max_batch_size), "
                         f"got {len(prompts)}")
    vocab = model.config.vocab_size
    for seq, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"{op}: sequence {seq} needs a non-empty prompt, got an empty one")
        if min(prompt) < 0 or max(prompt) >= vocab:
            bad = [token for token in prompt if not 0 <= token < vocab]
            raise ValueError(f"{op}: prompt {seq} holds token ids outside the vocabulary [0, {vocab}): {bad[:8]}")


def _check_chunk(op: str, chunk: int) -> int:
    """`chunk` as a Python int (numpy's ints are taken, as the cache's counts are)."""
    if not is_int(chunk) or chunk < 1:
        raise ValueError(f"{op}: chunk must be an int >= 1, got {chunk!r}")
    return int(chunk)


def _check_sampling(op: str, temperature: float, top_p: float) -> None:
    if not temperature >= 0 or math.isinf(temperature):  # `not >=` also catches NaN
        raise ValueError(f"{op}: temperature must be a finite number >= 0 (0: greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"{op}: top_p must be in (0, 1], got {top_p}")


def decode_step(model: DeepseekForCausalLM, cache: PagedKVCache, tokens: torch.Tensor,
                balanced: bool = False) -> torch.Tensor:
    """tokens `(batch, s_q)` int64, already counted in `cache.cache_seqlens` (via `extend`) -> logits
    `(batch * s_q, vocab)` float32. `balanced`: the dense decode layers share one `get_mla_metadata` split of the
    step's blocks over the SMs (one launch a step on Hopper), which a long sequence among short ones needs (on the
    H100 the skewed b32 row took 49.3 us with it, 348.9 us split by shape); else each layer splits by shape alone
    (the default until its cost on uniform batches is timed again: docs/HISTORY.md, stop 48). Only where a layer
    reads it: V3.2's sparse layers do not, nor do the dense kernels but the CUDA one (`dense_kernel_reads_schedule`;
    while compiling that is `compile_decode_step`'s to ask)."""
    batch, s_q = tokens.shape
    attention = model.model.layers[0].self_attn
    parts = None
    if balanced and attention.indexer is None and dense_kernel_reads_schedule(tokens.device):
        parts = num_sm_parts(tokens.device, s_q, attention.num_heads)
    metadata = decode_metadata(cache.block_table[:batch], cache.cache_seqlens[:batch], s_q, parts)
    return model(tokens.reshape(batch * s_q), metadata.positions, metadata, cache)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits `(batch, vocab)` -> tokens `(batch,)` int64: argmax at temperature 0, else a draw from the smallest
    set of tokens whose probability reaches `top_p`."""
    _check_sampling("sample", temperature, top_p)
    if logits.dim() != 2:
        raise ValueError(f"sample: logits must be (batch, vocab), got shape {tuple(logits.shape)}")
    if temperature == 0:
        return logits.argmax(-1)
    # over the row's largest first: a tiny temperature then gives one-hot weights instead of inf / inf = NaN
    probs = torch.softmax((logits - logits.max(-1, keepdim=True).values) / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    if top_p < 1:  # at 1 every token stays: float32's cumsum reaches 1 before the tail and would drop it
        outside = torch.cumsum(sorted_probs, -1) - sorted_probs >= top_p  # keeps the first token always
        sorted_probs = sorted_probs.masked_fill(outside, 0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(-1, choice)[:, 0]


@dataclass
class GenerationStats:
    prefill_seconds: float
    decode_seconds: float
    new_tokens: int

    @property
    def decode_tokens_per_second(self) -> float:
        return self.new_tokens / self.decode_seconds if self.decode_seconds else float("nan")


def compile_decode_step(device: torch.device, balanced: bool = False):
    """`decode_step` (with `balanced`) under `torch.compile(fullgraph=True)`; on CUDA with CUDA graphs (mode
    "reduce-overhead"): the whole step, custom ops included, is recorded once per shape and replayed (no host sync
    inside, and the cache tensors it mutates have static addresses). The cache's sizes are symbolic (`PagedKVCache`),
    so compiling happens about twice (batch 1, then any larger batch), whatever the cache sizes."""
    # Fused kernels round bfloat16 intermediates where eager does, so compiled decoding picks eager's tokens (an
    # inductor option since torch 2.5; torch 2.4 refuses options it does not know). Not on the CPU before torch 2.13:
    # its C++ backend crashes on it in 2.9-2.10 (`use_compute_types`) and picks eager's tokens only from 2.13.
    options = {"triton.cudagraphs": device.type == "cuda"}
    import torch._inductor.config as inductor_config  # imported by torch.compile anyway

    if hasattr(inductor_config, "emulate_precision_casts") and (device.type != "cpu" or TORCH_RELEASE >= (2, 13)):
        options["emulate_precision_casts"] = True
    balanced = balanced and dense_kernel_reads_schedule(device)  # asked here: not inside the traced step
    compiled = torch.compile(functools.partial(decode_step, balanced=balanced), fullgraph=True, options=options)
    if device.type != "cuda":
        return compiled

    def step(model: DeepseekForCausalLM, cache: PagedKVCache, tokens: torch.Tensor) -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()  # a new step: the last step's outputs may be overwritten
        return compiled(model, cache, tokens)

    return step


@torch.inference_mode()
def generate(model: DeepseekForCausalLM, cache: PagedKVCache, prompts: list[list[int]], max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, eos_token_ids: tuple[int, ...] | None = None,
             step=decode_step, generator: torch.Generator | None = None,
             chunk: int = CONTINUATION_CHUNK) -> tuple[list[list[int]], GenerationStats]:
    """New tokens of each prompt (ending at its first EOS, included) and timings. `eos_token_ids`: None (the
    default) stops at the model's `config.eos_token_id`, as transformers' generate does; `()` never stops early.
    `step` is `decode_step` or `compile_decode_step(device)`. Finished sequences keep decoding (static batch shape)
    until all are done.
    Tensor-parallel ranks all hold the same logits, so they agree on greedy tokens; sampled ones are rank 0's.

    Everything is checked before the first token is cached: the prompts, the sampling arguments, and that every
    sequence fits max_seq_len and the pool has the blocks for all of them at full length (no preemption here: a
    run that could stop for want of blocks is refused up front). If the run fails after that, its rows are cut back
    to what they held before. On success they keep the sequences (the prompts and all new tokens but the last): free
    or reset them to reuse, or continue them: a row that holds tokens takes its prompt after them (`prefill`), so a
    conversation's next turn is `generate` again on the same rows with prompts that start with each row's last new
    token (`chunk`: the tokens a continuation pass takes, see `prefill`). Empty rows given the same prompt (samples of
    one prompt) prefill it once and share its blocks, which the pool check counts once."""
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    max_new_tokens = int(max_new_tokens)  # numpy's ints are taken too, as the cache's counts are
    if eos_token_ids is None:  # the model's own end of sequence
        eos_token_ids = tuple(model.config.eos_token_ids)
    if is_int(eos_token_ids):  # config.json's eos_token_id is an int
        eos_token_ids = (eos_token_ids,)
    if not all(is_int(token) for token in eos_token_ids):
        raise TypeError(f"generate: eos_token_ids must be token ids (ints), got {eos_token_ids!r}")
    _check_sampling("generate", temperature, top_p)
    chunk = _check_chunk("generate", chunk)
    _check_prompts("generate", model, cache, prompts)
    before = [cache.seq_lens[seq] for seq in range(len(prompts))]
    # Rows forked from another with the same prompt share its full blocks (and its last one until they write past it)
    borrowed = {seq: len(prompts[seq]) // PAGE_BLOCK_SIZE if max_new_tokens > 1
                else -(-len(prompts[seq]) // PAGE_BLOCK_SIZE)
                for rows in _same_prompts(cache, prompts).values() for seq in rows[1:]}
    # the last new token is returned, not cached
    cache.check_room({seq: before[seq] + len(prompt) + max_new_tokens - 1 for seq, prompt in enumerate(prompts)},
                     borrowed)
    try:
        return _generate(model, cache, prompts, before, max_new_tokens, temperature, top_p, eos_token_ids, step,
                         generator, chunk)
    except BaseException:
        cache.truncate({seq: length for seq, length in enumerate(before) if cache.seq_lens[seq] > length})
        raise


def _generate(model, cache, prompts, before, max_new_tokens, temperature, top_p, eos_token_ids, step, generator,
              chunk):
    batch = len(prompts)

    def pick(logits: torch.Tensor) -> torch.Tensor:
        tokens = sample(logits, temperature, top_p, generator)
        return model.parallel.broadcast(tokens) if model.parallel is not None and temperature > 0 else tokens

    sync = torch.cuda.synchronize if cache.block_table.is_cuda else (lambda: None)
    started = time.perf_counter()
    next_tokens = pick(prefill(model, cache, prompts, chunk=chunk))
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [False] * batch
    sync()
    decode_started = time.perf_counter()
    while True:
        for seq, token in enumerate(next_tokens.tolist()):
            if not done[seq]:
                outputs[seq].append(token)
                done[seq] = token in eos_token_ids or len(outputs[seq]) == max_new_tokens
        if all(done):
            break
        cache.extend_batch(batch, 1)
        logits = step(model, cache, next_tokens[:, None])
        next_tokens = pick(logits)
    sync()
    finished = time.perf_counter()
    # Rows that met EOS early kept decoding with the batch: cut them back to their prompt and new tokens but the last
    kept = [length + len(prompt) + len(output) - 1 for length, prompt, output in zip(before, prompts, outputs)]
    cache.truncate({seq: length for seq, length in enumerate(kept) if cache.seq_lens[seq] > length})
    stats = GenerationStats(decode_started - started, finished - decode_started,
                            sum(len(o) for o in outputs) - batch)
    return outputs, stats
