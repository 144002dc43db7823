"""models/deepseek.py against transformers' own DeepseekV2/V3/V32ForCausalLM on the same random checkpoint.

Prefill logits of every prompt token (prompts of different lengths packed in one batch) and the logits of several
decode steps through the paged cache (one token per sequence, then two at once, causal) must match transformers'
full forward over the same tokens, for a float32, a BF16 and an FP8 cache. Our model is loaded in float32, so it
feeds the ops float32 activations (models/deepseek.py: the ops run their exact float32 reference).

Tolerances (max |ours - theirs| / max |theirs| over the vocabulary):
- Prefill (V2/V3 expanded attention, V3.2 `indexer_logits` + `indexer_topk` + `sparse_prefill`) runs in float32,
  whatever the cache: only summation order differs (~1e-6 seen, 1e-4 allowed). So does decode over the float32
  cache (`kv_cache_dtype="fp32"`).
- Decode over the BF16 cache reads the latent rounded to bfloat16 and feeds q in bfloat16 (2^-9 relative per
  element, FP32 accumulation): 0.2-0.5% seen, 1.5e-2 allowed.
- The FP8 cache stores the latent in e4m3 (3 mantissa bits: up to 2^-4 relative per element, per-128 power-of-two
  scales): 2-4.5% seen, 8e-2 allowed.
The argmax must agree wherever transformers' top-2 logits are further apart than the tolerance allows.

V3.2: transformers implements the indexer in the model dtype (no Hadamard rotation, no FP8: the rotation is
orthogonal, so BF16/FP32 scores are the same) and folds the top-k choice into an additive mask; ours computes the
indexer logits with `indexer_logits` (`indexer_logits_paged` in decode), picks with `indexer_topk` and attends with
`sparse_prefill` / `sparse_decode`. One token swapped at the selection boundary changes a logit row by up to 40%, so
the comparison is only meaningful where the selection is unambiguous:
- float32 cache (`test_matches_transformers[deepseek_v32-fp32]`): index_topk 16, below two of the prompts and every
  decode context, so the indexer really selects; the selection of every prefill query in every layer is compared
  with transformers' (`SelectionRecorder`), and logits within 1e-4. The checkpoint (conftest's `EXACT_V32`) has 32
  indexer heads, not 4: a key's score `sum_h w_h relu(q_h . k)` is exactly 0 when every head's `q_h . k` is
  negative, which with 4 heads happens to 1 key in 16, so several keys tie at 0, often right at the top-k boundary
  (weights of both signs put 0 mid-range), and which of them is picked is arbitrary (it differs between packed and
  single-prompt prefill, and from torch.topk's; with 4 heads this test fails on such a tie). With 32 heads an
  all-negative key has probability 2^-32; the test also asserts that every boundary is decided by a margin far above
  float32 rounding (MIN_SELECTION_MARGIN), so no choice is a coin toss. Decode's choice is checked through the
  logits: a swapped token moves them far beyond 1e-4.
- BF16 / FP8 caches: BF16 rounding of the cached latent and index keys swaps near-boundary tokens in decode, so these
  run V3.2 with index_topk 64 (at least every context here): every op of the sparse path (indexer logits, top-k with
  -1 padding, index cache, sparse prefill / decode over flat slots) is in it, and the choice is all visible tokens;
- `test_indexer_choice` checks the choice on the first layer (4 indexer heads, ties allowed for): every token
  transformers picks scores, by our logits, within rounding of our k-th best;
- `test_sparse_attention_is_sparse` checks that index_topk 16 does change the result.
"""
import copy
import types

import pytest
import torch

from models import (
    DeepseekConfig,
    PagedKVCache,
    decode_step,
    load_model,
    prefill,
    tiny_config,
)
from models import deepseek
from models.deepseek import Experts, MLAttention

PREFILL_TOL = 1e-4
DECODE_TOL = {"fp32": 1e-4, "bf16": 1.5e-2, "fp8": 8e-2}
PROMPT_LENGTHS = (21, 9, 30, 9)  # two of one length: batched into one attention call
DECODE_STEPS = 3
MIN_SELECTION_MARGIN = 1e-5  # relative to the row's largest |indexer logit|: 10x the float32 differences seen


def assert_logits_close(ours: torch.Tensor, theirs: torch.Tensor, tol: float, what: str) -> None:
    """Rows of logits `(n, vocab)`: relative error and argmax agreement (where not a near tie)."""
    scale = theirs.abs().amax(-1)
    error = (ours - theirs).abs().amax(-1) / scale
    assert error.max() <= tol, f"{what}: relative logit error {error.max():.2e} > {tol:.1e} (rows {error.tolist()})"
    top2 = theirs.topk(2, dim=-1).values
    decided = top2[:, 0] - top2[:, 1] > 2 * tol * scale
    agree = ours.argmax(-1) == theirs.argmax(-1)
    assert agree[decided].all(), f"{what}: argmax differs at rows {(~agree & decided).nonzero().flatten().tolist()}"


class SelectionRecorder:
    """V3.2 prefill selections: ours (`MLAttention.prefill_indices`, packed rows, with the indexer logits they came
    from) and transformers' (its indexers' top-k outputs, one forward per prompt), one entry per layer call."""

    def __init__(self, monkeypatch, hf_model):
        self.ours, self.theirs = [], []
        prefill_indices = MLAttention.prefill_indices

        def record(attention, index_q, index_k, index_weights, metadata, fp8=False):
            assert not fp8, "the selections are compared with a float cache (transformers' indexer is not FP8)"
            indices = prefill_indices(attention, index_q, index_k, index_weights, metadata, fp8)
            logits = torch.ops.flashmla.indexer_logits(index_q, index_k, index_weights, metadata.k_start,
                                                       metadata.k_end, None, None)
            self.ours.append((indices, logits, metadata.k_start))
            return indices

        monkeypatch.setattr(MLAttention, "prefill_indices", record)
        self.handles = [layer.self_attn.indexer.register_forward_hook(
            lambda module, args, out: self.theirs.append(out[0])) for layer in hf_model.model.layers]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def check(self, prompts: list[list[int]], topk: int) -> None:
        """Every query of every prompt, every layer: the same set of visible keys, -1 padding after them, and (where
        it selects) a k-th best score ahead of the next by MIN_SELECTION_MARGIN."""
        num_layers = len(self.ours)
        assert len(self.theirs) == num_layers * len(prompts)
        assert max(map(len, prompts)) > topk, "no query has more than index_topk keys to choose from"
        for layer, (indices, logits, k_start) in enumerate(self.ours):
            row = 0
            for p, prompt in enumerate(prompts):
                theirs = self.theirs[p * num_layers + layer]  # (len(prompt), min(topk, len(prompt)))
                for t in range(len(prompt)):
                    visible = min(t + 1, topk)
                    ours = indices[row, :visible] - k_start[row]
                    assert (indices[row, visible:] == -1).all(), f"layer {layer} prompt {p} query {t}: padding"
                    assert sorted(ours.tolist()) == sorted(theirs[t, :visible].tolist()), (
                        f"layer {layer} prompt {p} query {t}: selected {sorted(ours.tolist())}, transformers "
                        f"{sorted(theirs[t, :visible].tolist())}")
                    if t + 1 > topk:
                        scores = logits[row, k_start[row]:k_start[row] + t + 1].sort(descending=True).values
                        margin = (scores[topk - 1] - scores[topk]) / scores.abs().max()
                        assert margin > MIN_SELECTION_MARGIN, (
                            f"layer {layer} prompt {p} query {t}: ambiguous selection (k-th and next indexer scores "
                            f"{scores[topk - 1]:.6g}, {scores[topk]:.6g}): choose another seed or more indexer heads")
                    row += 1


@torch.no_grad()
def check_against_transformers(path, hf_model, kv_cache_dtype: str, monkeypatch=None) -> None:
    """With `monkeypatch` (V3.2), the prefill's selections are compared too."""
    model = load_model(path, dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, model.config.vocab_size, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]
    reference = lambda tokens: hf_model(torch.tensor([tokens])).logits[0]  # noqa: E731
    cache = PagedKVCache(model.config, num_blocks=8, max_batch_size=len(prompts), max_seq_len=128,
                         kv_cache_dtype=kv_cache_dtype)

    recorder = SelectionRecorder(monkeypatch, hf_model) if monkeypatch is not None else None
    try:
        logits = prefill(model, cache, prompts, last_only=False)
        expected = torch.cat([reference(p) for p in prompts])
    finally:
        if recorder is not None:
            recorder.remove()
    if recorder is not None:
        recorder.check(prompts, model.config.index_topk)
    assert_logits_close(logits, expected, PREFILL_TOL, "prefill")

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


@pytest.mark.parametrize("kv_cache_dtype", ["fp32", "bf16", "fp8"])
@pytest.mark.parametrize("model_type", ["deepseek_v2", "deepseek_v3", "deepseek_v32"])
def test_matches_transformers(request, hf_checkpoints, monkeypatch, model_type, kv_cache_dtype):
    if model_type != "deepseek_v32":
        check_against_transformers(*hf_checkpoints(model_type), kv_cache_dtype)
    elif kv_cache_dtype == "fp32":  # index_topk 16 (tiny_config's): the indexer selects; selections compared
        path, hf_model = request.getfixturevalue("exact_v32_checkpoint")
        assert hf_model.config.index_topk < max(PROMPT_LENGTHS)
        check_against_transformers(path, hf_model, kv_cache_dtype, monkeypatch)
    else:
        check_against_transformers(*hf_checkpoints(model_type, index_topk=64), kv_cache_dtype)


YARN = dict(type="yarn", factor=4.0, original_max_position_embeddings=128, beta_fast=32, beta_slow=1)


@pytest.mark.parametrize("model_type,overrides", [
    # YaRN with one of mscale / mscale_all_dim: cos/sin take mscale(factor) (transformers' rule)
    ("deepseek_v3", dict(rope_scaling={**YARN, "mscale_all_dim": 1.0})),
    ("deepseek_v2", dict(rope_scaling={**YARN, "mscale": 0.707})),
    # both, as every DeepSeek checkpoint sets them
    ("deepseek_v3", dict(rope_scaling={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707})),
    # V3.2's attention ropes interleaved pairs whatever rope_interleave says (index_topk 64: every token visible)
    ("deepseek_v32", dict(rope_interleave=False, index_topk=64)),
    # V3.2 with YaRN, as its checkpoint sets it: the sparse prefill and decode take the mscale'd softmax scale too
    ("deepseek_v32", dict(rope_scaling={**YARN, "mscale": 1.0, "mscale_all_dim": 1.0}, index_topk=64)),
    # rms_norm_eps far from the 1e-6 default (activations' mean square is ~1e-2 here), two shared experts (V2's)
    ("deepseek_v2", dict(rms_norm_eps=1e-2, n_shared_experts=2)),
    # every layer MoE
    ("deepseek_v3", dict(first_k_dense_replace=0)),
    # V2 group-limited routing with more experts a token (3) than the kept group holds (2): the third choice is an
    # expert of a dropped group, which V2 weighs 0
    ("deepseek_v2", dict(n_group=4, topk_group=1, num_experts_per_tok=3)),
    # a rope_theta other than tiny_config's 10000 (every DeepSeek checkpoint's): the frequencies read it
    ("deepseek_v3", dict(rope_theta=1000.0)),
    # V3 ropes halves where rope_interleave is false (transformers' rotate_half); only V2 / V3.2 force pairs
    ("deepseek_v3", dict(rope_interleave=False)),
    # with q_lora_rank: q_a_layernorm keeps RMSNorm's 1e-6 (as kv_a_layernorm does), not rms_norm_eps
    ("deepseek_v3", dict(rms_norm_eps=1e-2)),
    # v_head_dim unlike qk_nope_head_dim (32): kv_b_proj's rows split into the key and value halves (expanded
    # prefill, absorbed decode and V3.2's absorbed prefill)
    ("deepseek_v2", dict(v_head_dim=48)),
    ("deepseek_v32", dict(v_head_dim=48, index_topk=64)),
], ids=["yarn-mscale_all_dim-only", "yarn-mscale-only", "yarn-both", "v32-rope_interleave-false", "v32-yarn",
        "rms_norm_eps-n_shared_experts", "first_k_dense_replace-0", "v2-top_k-past-kept-groups", "rope_theta",
        "v3-rope_interleave-false", "v3-rms_norm_eps-q_lora", "v2-v_head_dim", "v32-v_head_dim"])
def test_matches_transformers_config_variants(hf_checkpoints, model_type, overrides):
    """Config variants the fixtures' checkpoints do not use but transformers loads: YaRN's cos/sin factor and
    interpolated frequencies act from the first position, so the short prompts here show a wrong factor; the other
    fields change the model only where they differ from tiny_config's values (rms_norm_eps 1e-6, one shared expert,
    first_k_dense_replace 1, rope_theta 10000, V3's rope_interleave true, v_head_dim = qk_nope_head_dim = 32)."""
    check_against_transformers(*hf_checkpoints(model_type, **overrides), "fp32")


def test_v2_norm_topk_prob_normalises_instead_of_scaling():
    """DeepSeek's V2 router with norm_topk_prob: weights summing to 1, not scaled by routed_scaling_factor (V3
    normalises, then scales)."""
    from models.deepseek import Router

    for model_type, total in (("deepseek_v2", 1.0), ("deepseek_v3", 1.5)):
        config = DeepseekConfig.from_dict(tiny_config(model_type, norm_topk_prob=True, routed_scaling_factor=1.5))
        router = Router(config)
        torch.nn.init.normal_(router.weight, std=0.5)
        weights, _ = router(torch.randn(5, config.hidden_size))
        assert torch.allclose(weights.sum(-1), torch.full((5,), total)), model_type
    # one expert a token: V2 scales the expert's score (DeepSeek's code normalises only from two experts)
    config = DeepseekConfig.from_dict(tiny_config("deepseek_v2", norm_topk_prob=True, routed_scaling_factor=1.5,
                                                  num_experts_per_tok=1))
    router = Router(config)
    torch.nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(5, config.hidden_size)
    weights, indices = router(x)
    scores = torch.softmax(torch.nn.functional.linear(x, router.weight), -1)
    assert torch.allclose(weights, 1.5 * scores.gather(1, indices))


@pytest.mark.parametrize("model_type,n_group,topk_group,top_k", [
    ("deepseek_v2", 8, 1, 3), ("deepseek_v2", 8, 2, 6), ("deepseek_v2", 4, 2, 2),
    ("deepseek_v3", 8, 1, 3), ("deepseek_v3", 8, 2, 6), ("deepseek_v3", 4, 2, 2)])
def test_router_weights_match_transformers(model_type, n_group, topk_group, top_k):
    """Each token's weight per expert (0 for experts not chosen) as transformers' router gives it, including top-k
    past the experts of the kept groups: V2 zeroes the dropped groups' scores before its top-k (those choices weigh
    0), V3 gathers the unmasked scores of whatever its top-k picks."""
    import transformers
    from models.deepseek import Router

    v2 = pytest.importorskip("transformers.models.deepseek_v2.modeling_deepseek_v2")
    v3 = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
    if not hasattr(v2, "DeepseekV2TopkRouter") or not hasattr(v3, "DeepseekV3TopkRouter"):
        pytest.skip(f"transformers {transformers.__version__} has no V2 / V3 TopkRouter module")
    DeepseekV2TopkRouter, DeepseekV3TopkRouter = v2.DeepseekV2TopkRouter, v3.DeepseekV3TopkRouter

    config_dict = tiny_config(model_type, n_routed_experts=16, n_group=n_group, topk_group=topk_group,
                              num_experts_per_tok=top_k)
    ours = Router(DeepseekConfig.from_dict(config_dict))
    hf_class = DeepseekV2TopkRouter if model_type == "deepseek_v2" else DeepseekV3TopkRouter
    theirs = hf_class(transformers.AutoConfig.for_model(**config_dict))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ours.weight.copy_(0.3 * torch.randn(ours.weight.shape, generator=generator))
        theirs.weight.copy_(ours.weight)
        if ours.e_score_correction_bias is not None:
            ours.e_score_correction_bias.copy_(0.1 * torch.randn(16, generator=generator))
            theirs.e_score_correction_bias.copy_(ours.e_score_correction_bias)
        x = torch.randn(64, config_dict["hidden_size"], generator=generator)
        weights, indices = ours(x)
        _, hf_weights, hf_indices = theirs(x)
    dense = lambda w, i: torch.zeros(x.shape[0], 16).scatter_add_(1, i, w)  # noqa: E731
    torch.testing.assert_close(dense(weights, indices), dense(hf_weights, hf_indices), rtol=1e-6, atol=1e-6)


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


@pytest.mark.parametrize("device, major, release, hip, expected", [
    ("cuda", 9, (2, 8), None, "always"), ("cuda", 9, (2, 13), None, "always"), ("cuda", 10, (2, 9), None, "always"),
    ("cuda", 10, (2, 8), None, "never"), ("cuda", 8, (2, 8), None, "never"), ("cuda", 8, (2, 13), None, "eager"),
    ("cuda", 12, (2, 13), None, "eager"), ("cuda", 10, (2, 13), "6.4", "never"), ("cpu", None, (2, 8), None, "never"),
    ("cpu", None, (2, 9), None, "always"), ("meta", None, (2, 13), None, "never")])
def test_grouped_mm_only_where_it_runs(monkeypatch, device, major, release, hip, expected):
    """torch._grouped_mm where it is one kernel without a host sync ("always": Hopper from torch 2.8, datacenter
    Blackwell and the CPU from 2.9), on other NVIDIA GPUs only outside a CUDA graph's capture or a compiled step
    ("eager": torch 2.9+ loops over the groups after a host sync there; 2.8 raises), never on AMD GPUs; and only for
    sizes of whole 16-byte strides."""
    monkeypatch.setattr(deepseek, "TORCH_RELEASE", release)
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(major=major))
    capturing, compiling = [False], [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling[0])
    device = torch.device(device)
    assert deepseek.takes_grouped_mm(device, 64, 32) is (expected != "never")
    for flag in (capturing, compiling):
        flag[0] = True
        assert deepseek.takes_grouped_mm(device, 64, 32) is (expected == "always")
        flag[0] = False
    assert not deepseek.takes_grouped_mm(device, 64, 36)
    assert not deepseek.takes_grouped_mm(device, 68, 32)


@pytest.mark.parametrize("num_tokens", [1, 2, 3, 40])
@pytest.mark.parametrize("first_expert", [0, 4])
@pytest.mark.parametrize("grouped_mm", [True, False])
def test_grouped_experts_match_dense(monkeypatch, num_tokens, first_expert, grouped_mm):
    """The bfloat16 MoE paths (up to FEW_TOKENS tokens the routed_experts op, past them tokens sorted by expert and
    torch._grouped_mm) against every expert on every token mixed by the router's weights, in float32 on the same
    bfloat16 weights: decode-sized and prefill-sized batches, all experts held or, as under expert parallelism, only
    experts 4..7 of 8 (others' choices count 0). Without `grouped_mm` (torch 2.8 on the CPU, where takes_grouped_mm
    says no) the experts never call torch._grouped_mm and take the dense path past FEW_TOKENS."""
    if not grouped_mm:
        def refuse(*args, **kwargs):
            raise AssertionError("torch._grouped_mm called")

        monkeypatch.setattr(deepseek, "TORCH_RELEASE", (2, 8))
        monkeypatch.setattr(torch, "_grouped_mm", refuse, raising=False)
    config = DeepseekConfig.from_dict(tiny_config("deepseek_v3"))
    experts = Experts(config)
    num_held = 8 if first_expert == 0 else 4
    generator = torch.Generator().manual_seed(num_tokens)
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            weight = getattr(experts, name)
            setattr(experts, name, torch.nn.Parameter(
                0.2 * torch.randn(num_held, *weight.shape[1:], generator=generator).bfloat16()))
    experts.first_expert = first_expert
    x = torch.randn(num_tokens, config.hidden_size, generator=generator).bfloat16()
    indices = torch.stack([torch.randperm(8, generator=generator)[:2] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, 2, generator=generator)
    with torch.no_grad():
        out = experts(x, weights, indices)
        local = indices - first_expert
        held = (local >= 0) & (local < num_held)
        combine = torch.zeros(num_tokens, num_held + 1).scatter_add_(
            1, local.masked_fill(~held, num_held), weights.masked_fill(~held, 0))[:, :-1]
        expected = copy.deepcopy(experts).float().dense(x.float(), combine)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
