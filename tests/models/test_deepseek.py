"""models/deepseek.py against transformers' own DeepseekV2/V3/V32ForCausalLM on the same random checkpoint.

Prefill logits of every prompt token (prompts of different lengths packed in one batch) and the logits of several
decode steps through the paged cache (one token per sequence, then two at once, causal) must match transformers'
full forward over the same tokens, for a BF16 and an FP8 cache.

Tolerances (max |ours - theirs| / max |theirs| over the vocabulary):
- V2/V3 prefill runs the expanded attention in the model's float32: only summation order differs (1e-4).
- Decode (and V3.2 prefill) feeds the attention ops bfloat16 q and latent kv (rounding 2^-9 relative per element,
  FP32 accumulation): 0.2-0.5% seen, 1.5e-2 allowed.
- The FP8 cache stores the latent in e4m3 (3 mantissa bits: up to 2^-4 relative per element, per-128 power-of-two
  scales): 2-4.5% seen, 8e-2 allowed.
The argmax must agree wherever transformers' top-2 logits are further apart than the tolerance allows.

V3.2: transformers implements the indexer in the model dtype (no Hadamard rotation, no FP8: the rotation is
orthogonal, so BF16/FP32 scores are the same) and folds the top-k choice into an additive mask; ours computes the
indexer logits from bfloat16 q/k with `indexer_logits`, picks with `indexer_topk` and attends with `sparse_prefill` /
`sparse_decode`. In a tiny random model the indexer scores of neighbouring candidates are close (relu zeroes
whole rows, weights of both signs cancel), so BF16 rounding, or the 0.3% a BF16 attention layer changes the next
layer's input by, swaps near-boundary tokens; one swap out of 16 changes a logit row by up to 40%. So:
- the logits comparison runs V3.2 with index_topk 64 (at least every context here): every op of the sparse path
  (indexer logits, top-k with -1 padding, index cache, sparse prefill / decode over flat slots) is in it, and the
  choice is all visible tokens;
- `test_indexer_choice` checks the choice itself on the first layer, where both models see the same input: every
  token transformers picks scores, by our logits, within rounding of our k-th best;
- `test_sparse_attention_is_sparse` checks that index_topk 16 does change the result.
"""
import pytest
import torch

from models import PagedKVCache, decode_step, load_model, prefill

PREFILL_TOL = {"deepseek_v2": 1e-4, "deepseek_v3": 1e-4, "deepseek_v32": 1.5e-2}
DECODE_TOL = {"bf16": 1.5e-2, "fp8": 8e-2}
PROMPT_LENGTHS = (21, 9, 30)
DECODE_STEPS = 3


def assert_logits_close(ours: torch.Tensor, theirs: torch.Tensor, tol: float, what: str) -> None:
    """Rows of logits `(n, vocab)`: relative error and argmax agreement (where not a near tie)."""
    scale = theirs.abs().amax(-1)
    error = (ours - theirs).abs().amax(-1) / scale
    assert error.max() <= tol, f"{what}: relative logit error {error.max():.2e} > {tol:.1e} (rows {error.tolist()})"
    top2 = theirs.topk(2, dim=-1).values
    decided = top2[:, 0] - top2[:, 1] > 2 * tol * scale
    agree = ours.argmax(-1) == theirs.argmax(-1)
    assert agree[decided].all(), f"{what}: argmax differs at rows {(~agree & decided).nonzero().flatten().tolist()}"


@torch.no_grad()
def check_against_transformers(path, hf_model, kv_cache_dtype: str) -> None:
    model = load_model(path, dtype=torch.float32)
    model_type = model.config.model_type
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, model.config.vocab_size, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]
    reference = lambda tokens: hf_model(torch.tensor([tokens])).logits[0]  # noqa: E731
    cache = PagedKVCache(model.config, num_blocks=8, max_batch_size=len(prompts), max_seq_len=128,
                         kv_cache_dtype=kv_cache_dtype)

    logits = prefill(model, cache, prompts, last_only=False)
    assert_logits_close(logits, torch.cat([reference(p) for p in prompts]), PREFILL_TOL[model_type], "prefill")

    sequences = [list(p) for p in prompts]
    for step in range(DECODE_STEPS + 1):
        s_q = 1 if step < DECODE_STEPS else 2  # the last step feeds two tokens per sequence (causal decode)
        new = [reference(seq)[-1].topk(s_q).indices.tolist() for seq in sequences]
        for seq, tokens in enumerate(new):
            sequences[seq] += tokens
            cache.extend(seq, s_q)
        logits = decode_step(model, cache, torch.tensor(new))
        expected = torch.cat([reference(seq)[-s_q:] for seq in sequences])
        assert_logits_close(logits, expected, DECODE_TOL[kv_cache_dtype], f"decode step {step} (s_q={s_q})")


@pytest.mark.parametrize("kv_cache_dtype", ["bf16", "fp8"])
@pytest.mark.parametrize("model_type", ["deepseek_v2", "deepseek_v3", "deepseek_v32"])
def test_matches_transformers(hf_checkpoints, model_type, kv_cache_dtype):
    overrides = {"index_topk": 64} if model_type == "deepseek_v32" else {}
    path, hf_model = hf_checkpoints(model_type, **overrides)
    check_against_transformers(path, hf_model, kv_cache_dtype)


def test_sparse_attention_is_sparse(hf_checkpoints):
    """V3.2 with index_topk 16 differs from the same weights attending to every token (index_topk 64): the
    comparison above really exercises the sparse choice."""
    path, _ = hf_checkpoints("deepseek_v32")
    prompt = [list(range(2, 32))]
    logits = {}
    for topk in (16, 64):
        model = load_model(path, dtype=torch.float32)
        model.config.index_topk = topk
        cache = PagedKVCache(model.config, num_blocks=2, max_batch_size=1, max_seq_len=64)
        with torch.no_grad():
            logits[topk] = prefill(model, cache, prompt)
    assert (logits[16] - logits[64]).abs().max() > 0.1 * logits[64].abs().max()


@torch.no_grad()
def test_indexer_choice(hf_checkpoints):
    """Layer 0 of V3.2 (index_topk 16): transformers' top-k set against our logits. Inputs are identical (embeddings
    and RMSNorm in float32), so only the BF16 rounding of the indexer's q and k separates the two scorings."""
    path, hf_model = hf_checkpoints("deepseek_v32")
    model = load_model(path, dtype=torch.float32)
    tokens = torch.randint(2, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(2))
    chosen = []
    hook = hf_model.model.layers[0].self_attn.indexer.register_forward_hook(
        lambda module, args, out: chosen.append(out[0]))
    try:
        hf_model(tokens[None])
    finally:
        hook.remove()

    positions = torch.arange(len(tokens))
    x = model.model.layers[0].input_layernorm(model.model.embed_tokens(tokens))
    attention = model.model.layers[0].self_attn
    cos, sin = model.model.rotary_emb(positions)
    q, k, weights = attention.indexer(x, attention.q_a_layernorm(attention.q_a_proj(x)), cos, sin)
    logits = torch.ops.flashmla.indexer_logits(q, k, weights, torch.zeros_like(positions, dtype=torch.int32),
                                               (positions + 1).int(), None, None)
    topk = model.config.index_topk
    ours = torch.ops.flashmla.indexer_topk(logits, topk, None)
    for t in range(len(tokens)):
        visible = min(t + 1, topk)
        assert sorted(ours[t, :visible].tolist()) == sorted(set(ours[t, :visible].tolist()))
        assert (ours[t, visible:] == -1).all()
        kth = logits[t].topk(visible).values[-1]
        theirs = chosen[0][t, :visible]
        tolerance = 1e-2 * logits[t, :t + 1].abs().max()
        assert (logits[t, theirs] >= kth - tolerance).all(), f"query {t}: transformers picks a token we rank low"
