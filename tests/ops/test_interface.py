"""FlashMLA's Python API (flashmla_ops.get_mla_metadata / flash_mla_with_kvcache / flash_mla_sparse_fwd)."""
import inspect

import pytest
import torch

import flashmla_ops
import mla_oracle as oracle
from decode_inputs import ON_HOPPER
from flashmla_ops import interface

ops = torch.ops.flashmla

# SPEC.md §2, FlashMLA's current signatures.
FLASH_MLA_WITH_KVCACHE = ("(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits=None, "
                          "softmax_scale=None, causal=False, is_fp8_kvcache=False, indices=None, attn_sink=None, "
                          "extra_k_cache=None, extra_indices_in_kvcache=None, topk_length=None, extra_topk_length=None)")
FLASH_MLA_SPARSE_FWD = "(q, kv, indices, sm_scale, d_v=512, attn_sink=None, topk_length=None, indexer_topk=0)"


def signature_of(text):
    namespace = {}
    exec(f"def f{text}: pass", namespace)
    return inspect.signature(namespace["f"])


def plain_parameters(function):
    """Names, kinds and defaults (annotations dropped)."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


@pytest.mark.parametrize("function,spec", [(flashmla_ops.flash_mla_with_kvcache, FLASH_MLA_WITH_KVCACHE),
                                           (flashmla_ops.flash_mla_sparse_fwd, FLASH_MLA_SPARSE_FWD),
                                           (flashmla_ops.get_mla_metadata, "(*args, **kwargs)")])
def test_signatures_match_flashmla(function, spec):
    assert plain_parameters(function) == [(p.name, p.kind, p.default) for p in signature_of(spec).parameters.values()]


def test_get_mla_metadata_accepts_the_old_arguments():
    cache_seqlens = torch.tensor([5, 9], dtype=torch.int32)
    for args, kwargs in [((), {}), ((cache_seqlens, 1, 1), {}), ((cache_seqlens,), dict(num_q_tokens_per_head_k=16,
                                                                                         num_heads_k=1))]:
        result = flashmla_ops.get_mla_metadata(*args, **kwargs)
        assert isinstance(result, tuple) and len(result) == 2 and result[1] is None
        assert isinstance(result[0], flashmla_ops.FlashMLASchedMeta)


def dense_case(lengths, s_q=1, h_q=16, fp8=False, device="cpu", capacity=None):
    """`capacity`: tokens each sequence's block table row holds (default: its length)."""
    reserved = [capacity] * len(lengths) if capacity else lengths
    num_blocks = sum(-(-n // 64) for n in reserved) + 2
    cache, flat_keys = oracle.paged_cache(num_blocks, fp8=fp8, device=device)
    block_table = oracle.block_table_for(reserved, num_blocks)
    q = oracle.bf16(len(lengths), s_q, h_q, oracle.D_QK, device=device)
    return q, cache, flat_keys, block_table.to(device), torch.tensor(lengths, dtype=torch.int32, device=device)


@pytest.mark.parametrize("causal,fp8", [(False, False), (True, True)])
def test_flash_mla_with_kvcache_dense(device, causal, fp8):
    q, cache, flat_keys, block_table, cache_seqlens = dense_case([100, 0, 65], s_q=2, fp8=fp8, device=device)
    sched_meta, _ = flashmla_ops.get_mla_metadata()
    result = flashmla_ops.flash_mla_with_kvcache(q, cache, block_table, cache_seqlens, 512, sched_meta, causal=causal,
                                                 is_fp8_kvcache=fp8)
    assert isinstance(result, tuple) and len(result) == 2
    out, lse = result
    ref_out, ref_lse = oracle.dense_decode(q.cpu(), flat_keys, block_table.cpu(), cache_seqlens.cpu(),
                                           oracle.D_QK ** -0.5, 512, causal)
    oracle.assert_attention_close(out, lse, ref_out, ref_lse)


def test_flashmla_api_hands_the_ops_sinks_lengths_and_d_v(device):
    """The API passes on every argument that changes the numbers: attn_sink on the dense path (out scaled by
    exp(lse) / (exp(lse) + exp(sink)), lse unchanged), and flash_mla_sparse_fwd's attn_sink, topk_length and d_v;
    against the oracle."""
    q, cache, flat_keys, block_table, cache_seqlens = dense_case([100, 0, 65], s_q=2, h_q=4, device=device)
    attn_sink = torch.tensor([-1.0, 2.0, 5.0, float("inf")])
    out, lse = flashmla_ops.flash_mla_with_kvcache(q, cache, block_table, cache_seqlens, 512, None, causal=True,
                                                   attn_sink=attn_sink.to(device))
    oracle.assert_attention_close(out, lse, *oracle.dense_decode(q.cpu(), flat_keys, block_table.cpu(),
                                                                 cache_seqlens.cpu(), oracle.D_QK ** -0.5, 512, True,
                                                                 attn_sink))
    assert (out[..., 3, :] == 0).all()

    s, d_v = 20, 256
    q, kv = oracle.bf16(s, 4, oracle.D_QK, device=device), oracle.bf16(s, 1, oracle.D_QK, device=device)
    indices = torch.randint(-1, s + 2, (s, 1, 12), dtype=torch.int32)
    topk_length = torch.randint(0, 13, (s,), dtype=torch.int32)
    out, max_logits, lse = flashmla_ops.flash_mla_sparse_fwd(q, kv, indices.to(device), 0.05, d_v,
                                                             attn_sink.to(device), topk_length.to(device))
    ref_out, ref_max, ref_lse, _ = oracle.sparse_prefill(q.cpu(), kv.cpu(), indices, 0.05, d_v, attn_sink, topk_length)
    oracle.assert_attention_close(out, lse, ref_out, ref_lse)
    assert torch.equal(torch.isneginf(max_logits.cpu()), torch.isneginf(ref_max))
    finite = torch.isfinite(ref_max)
    assert torch.allclose(max_logits.double().cpu()[finite], ref_max[finite], atol=1e-4, rtol=0)


def test_softmax_scale_default_is_d_qk_to_the_minus_half(device):
    q, cache, _, block_table, cache_seqlens = dense_case([70, 3], device=device)
    default = flashmla_ops.flash_mla_with_kvcache(q, cache, block_table, cache_seqlens, 512, None)
    explicit = flashmla_ops.flash_mla_with_kvcache(q, cache, block_table, cache_seqlens, 512, None,
                                                   softmax_scale=576 ** -0.5)
    other = flashmla_ops.flash_mla_with_kvcache(q, cache, block_table, cache_seqlens, 512, None, softmax_scale=0.5)
    assert torch.equal(default[0], explicit[0]) and torch.equal(default[1], explicit[1])
    assert not torch.allclose(default[1], other[1])


@pytest.mark.parametrize("sparse", [False, True])
def test_softmax_scale_default_follows_q_d_qk(sparse):
    """The default is q's own d_qk ** -0.5, not DeepSeek's 576 ** -0.5: a cache of another width (d_qk 64 here, the
    reference path) gets 64 ** -0.5, dense and sparse alike."""
    d_qk = 64
    q, cache = oracle.bf16(2, 1, 4, d_qk), oracle.bf16(3, 64, 1, d_qk)
    if sparse:
        arguments = (q, cache, None, None, 32)
        options = dict(indices=torch.randint(-1, 3 * 64, (2, 1, 20), dtype=torch.int32))
    else:
        block_table = torch.tensor([[0, 1], [2, 0]], dtype=torch.int32)
        arguments = (q, cache, block_table, torch.tensor([100, 40], dtype=torch.int32), 32)
        options = {}
    default = flashmla_ops.flash_mla_with_kvcache(*arguments, None, **options)
    for scale, same in ((d_qk ** -0.5, True), (oracle.D_QK ** -0.5, False)):
        explicit = flashmla_ops.flash_mla_with_kvcache(*arguments, None, softmax_scale=scale, **options)
        assert (torch.equal(default[0], explicit[0]) and torch.equal(default[1], explicit[1])) is same, scale


def test_flash_mla_with_kvcache_sparse(device):
    """Sparse decode through the API: block_table and cache_seqlens None, FP8 cache, extra cache, sink."""
    batch, s_q, h_q = 2, 2, 16
    cache, flat_keys = oracle.paged_cache(3, fp8=True, device=device)
    extra_cache, extra_flat_keys = oracle.paged_cache(2, fp8=True, pad=1312, device=device)
    indices = torch.randint(-1, 3 * 64, (batch, s_q, 45), dtype=torch.int32)
    extra_indices = torch.randint(-1, 2 * 64, (batch, s_q, 10), dtype=torch.int32)
    topk_length = torch.tensor([45, 12], dtype=torch.int32)
    extra_topk_length = torch.tensor([3, 10], dtype=torch.int32)
    attn_sink = torch.randn(h_q)
    q = oracle.bf16(batch, s_q, h_q, oracle.D_QK, device=device)
    sched_meta, _ = flashmla_ops.get_mla_metadata()
    out, lse = flashmla_ops.flash_mla_with_kvcache(
        q, cache, None, None, 512, sched_meta, is_fp8_kvcache=True, indices=indices.to(device),
        attn_sink=attn_sink.to(device), extra_k_cache=extra_cache, extra_indices_in_kvcache=extra_indices.to(device),
        topk_length=topk_length.to(device), extra_topk_length=extra_topk_length.to(device))
    ref_out, ref_lse = oracle.sparse_decode(q.cpu(), flat_keys, indices, topk_length, oracle.D_QK ** -0.5, 512,
                                            extra_flat_keys, extra_indices, extra_topk_length, attn_sink)
    oracle.assert_attention_close(out, lse, ref_out, ref_lse)


@pytest.fixture
def eight_sm_parts(monkeypatch):
    """The CPU path uses one SM part, which hides the split; pretend there are eight."""
    monkeypatch.setattr(interface, "num_sm_parts", lambda device, s_q, h_q: 8)


@pytest.fixture(params=["values compared", "identity and version only"])
def reuse_rule(request, monkeypatch):
    """The API's reuse of a schedule as on CPU tensors (the lengths' values compared too) and as on a GPU without
    FLASHMLA_CHECK, where only the tensor's identity and version counter decide (the op's own checks of these CPU
    tensors still refuse a stale schedule, so a wrong reuse fails either way)."""
    if request.param == "identity and version only":
        monkeypatch.setattr(interface, "value_checks_apply", lambda tensor: False)


def expected_metadata(cache_seqlens):
    return ops.get_mla_metadata(cache_seqlens, 8)


def test_sched_meta_reused_with_the_same_cache_seqlens(eight_sm_parts, reuse_rule):
    q, cache, _, block_table, cache_seqlens = dense_case([300, 20, 129])
    sched_meta, _ = flashmla_ops.get_mla_metadata()
    assert sched_meta.tile_scheduler_metadata is None
    first = flashmla_ops.flash_mla_with_kvcache(q, cache, block_table, cache_seqlens, 512, sched_meta)
    filled = sched_meta.tile_scheduler_metadata
    assert all(torch.equal(a, b) for a, b in zip((filled, sched_meta.num_splits), expected_metadata(cache_seqlens)))
    for _ in range(3):  # e.g. every layer of one decode step
        again = flashmla_ops.flash_mla_with_kvcache(q, cache, block_table, cache_seqlens, 512, sched_meta)
        assert sched_meta.tile_scheduler_metadata is filled, "same cache_seqlens: the metadata is reused, not rebuilt"
        assert torch.equal(again[0], first[0])


def test_sched_meta_have_initialized_as_flashmla_names_it(eight_sm_parts):
    """FlashMLA's `have_initialized`: False until a call fills the object, True after; set to False (as engines do
    before a CUDA graph capture) the next call computes the split again, even for the same lengths; it cannot be set
    True on an object no call has filled."""
    q, cache, _, block_table, cache_seqlens = dense_case([300, 20, 129])
    sched_meta, _ = flashmla_ops.get_mla_metadata()
    assert sched_meta.have_initialized is False
    with pytest.raises(ValueError, match="have_initialized"):
        sched_meta.have_initialized = True
    first = flashmla_ops.flash_mla_with_kvcache(q, cache, block_table, cache_seqlens, 512, sched_meta)
    filled = sched_meta.tile_scheduler_metadata
    assert sched_meta.have_initialized is True and filled is not None
    sched_meta.have_initialized = True  # already so: nothing changes
    flashmla_ops.flash_mla_with_kvcache(q, cache, block_table, cache_seqlens, 512, sched_meta)
    assert sched_meta.tile_scheduler_metadata is filled
    sched_meta.have_initialized = False
    assert sched_meta.have_initialized is False
    again = flashmla_ops.flash_mla_with_kvcache(q, cache, block_table, cache_seqlens, 512, sched_meta)
    assert sched_meta.have_initialized is True and sched_meta.tile_scheduler_metadata is not filled
    assert all(torch.equal(a, b) for a, b in zip((sched_meta.tile_scheduler_metadata, sched_meta.num_splits),
                                                 expected_metadata(cache_seqlens)))
    assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


def test_sched_meta_recomputed_when_cache_seqlens_changes_in_place(eight_sm_parts, reuse_rule):
    q, cache, _, block_table, cache_seqlens = dense_case([300, 20, 129], capacity=320)
    sched_meta, _ = flashmla_ops.get_mla_metadata()
    flashmla_ops.flash_mla_with_kvcache(q, cache, block_table, cache_seqlens, 512, sched_meta)
    cache_seqlens[1] += 60  # the next decode step, written into the same tensor
    out, lse = flashmla_ops.flash_mla_with_kvcache(q, cache, block_table, cache_seqlens, 512, sched_meta)
    assert all(torch.equal(a, b) for a, b in zip((sched_meta.tile_scheduler_metadata, sched_meta.num_splits),
                                                 expected_metadata(cache_seqlens)))
    fresh = flashmla_ops.flash_mla_with_kvcache(q, cache, block_table, cache_seqlens, 512, None)
    assert torch.equal(out, fresh[0]) and torch.equal(lse, fresh[1])


def test_flashmla_api_under_inference_mode(eight_sm_parts):
    """Inference tensors have no version counter: the split is recomputed on every call (it follows lengths changed
    in place), and the outputs are those outside inference mode. Sparse decode with topk_length likewise."""
    q, cache, _, block_table, cache_seqlens = dense_case([300, 20, 129], capacity=320)
    want = flashmla_ops.flash_mla_with_kvcache(q, cache, block_table, cache_seqlens, 512, None)
    with torch.inference_mode():
        lengths = cache_seqlens.clone()
        sched_meta, _ = flashmla_ops.get_mla_metadata()
        got = flashmla_ops.flash_mla_with_kvcache(q, cache, block_table, lengths, 512, sched_meta)
        lengths[1] += 60
        flashmla_ops.flash_mla_with_kvcache(q, cache, block_table, lengths, 512, sched_meta)
        assert all(torch.equal(a, b) for a, b in zip((sched_meta.tile_scheduler_metadata, sched_meta.num_splits),
                                                     expected_metadata(lengths)))
    assert all(torch.equal(a, b) for a, b in zip(got, want))

    fp8_cache = ops.quantize_kv_fp8(oracle.bf16(3, 64, 1, oracle.D_QK))
    indices = torch.randint(-1, 3 * 64, (2, 1, 10), dtype=torch.int32)
    q, topk_length = oracle.bf16(2, 1, 16, oracle.D_QK), torch.tensor([10, 3], dtype=torch.int32)
    sparse = dict(indices=indices, is_fp8_kvcache=True, topk_length=topk_length)
    want = flashmla_ops.flash_mla_with_kvcache(q, fp8_cache, None, None, 512, None, **sparse)
    with torch.inference_mode():
        sparse["topk_length"] = topk_length.clone()
        got = flashmla_ops.flash_mla_with_kvcache(q, fp8_cache, None, None, 512, flashmla_ops.get_mla_metadata()[0],
                                                  **sparse)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_sched_meta_after_an_inference_mode_call(eight_sm_parts):
    """Lengths L1 (tracked), then an inference tensor L2, then L1 again unmodified: the third call must not reuse
    L2's split as if it were L1's."""
    q, cache, _, block_table, first = dense_case([300, 20, 129], capacity=320)
    sched_meta, _ = flashmla_ops.get_mla_metadata()
    flashmla_ops.flash_mla_with_kvcache(q, cache, block_table, first, 512, sched_meta)
    with torch.inference_mode():
        second = torch.tensor([5, 310, 64], dtype=torch.int32)
        flashmla_ops.flash_mla_with_kvcache(q, cache, block_table, second, 512, sched_meta)
    flashmla_ops.flash_mla_with_kvcache(q, cache, block_table, first, 512, sched_meta)
    assert all(torch.equal(a, b) for a, b in zip((sched_meta.tile_scheduler_metadata, sched_meta.num_splits),
                                                 expected_metadata(first)))


def test_numpy_and_tensor_scalars_are_taken():
    """Numpy scalars, a 0-d tensor scale and an int flag: what the ops' schemas take, the API takes too."""
    import numpy as np

    q, cache, _, block_table, cache_seqlens = dense_case([70, 5])
    want = flashmla_ops.flash_mla_with_kvcache(q, cache, block_table, cache_seqlens, 512, None, softmax_scale=0.04,
                                               causal=True)
    for scale, head_dim_v, causal in ((np.float32(0.04), np.int64(512), np.bool_(True)),
                                      (torch.tensor(0.04), 512, 1)):
        got = flashmla_ops.flash_mla_with_kvcache(q, cache, block_table, cache_seqlens, head_dim_v, None,
                                                  softmax_scale=scale, causal=causal)
        assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_sched_meta_recomputed_for_new_cache_seqlens_tensors(eight_sm_parts, reuse_rule):
    """A decode loop that builds a new cache_seqlens tensor each step and reuses one sched_meta must never run with
    the previous step's split. (A tensor freed after one step may get the same Python id() as the next step's.)"""
    q, cache, _, block_table, _ = dense_case([300, 20, 129], h_q=1, capacity=320)
    sched_meta, _ = flashmla_ops.get_mla_metadata()
    stale_steps = []
    for step in range(100):
        lengths = torch.tensor([1 + (37 * step) % 300, 1 + (91 * step) % 250, 129], dtype=torch.int32)
        flashmla_ops.flash_mla_with_kvcache(q, cache, block_table, lengths, 512, sched_meta)
        if not torch.equal(sched_meta.tile_scheduler_metadata, expected_metadata(lengths)[0]):
            stale_steps.append(step)
        del lengths
    assert not stale_steps, f"stale scheduling metadata at steps {stale_steps}"


def test_num_splits_must_be_none():
    q, cache, _, block_table, cache_seqlens = dense_case([10])
    with pytest.raises(ValueError, match="num_splits"):
        flashmla_ops.flash_mla_with_kvcache(q, cache, block_table, cache_seqlens, 512, None, num_splits=torch.ones(2))


def test_flash_mla_sparse_fwd_returns(device):
    s, h_q, topk = 20, 16, 12
    q, kv = oracle.bf16(s, h_q, oracle.D_QK, device=device), oracle.bf16(s, 1, oracle.D_QK, device=device)
    indices = torch.randint(-1, s + 2, (s, 1, topk), dtype=torch.int32)
    three = flashmla_ops.flash_mla_sparse_fwd(q, kv, indices.to(device), 0.05)
    assert isinstance(three, tuple) and len(three) == 3
    four = flashmla_ops.flash_mla_sparse_fwd(q, kv, indices.to(device), 0.05, indexer_topk=5)
    assert isinstance(four, tuple) and len(four) == 4
    ref_out, ref_max, ref_lse, ref_lse_indexer = oracle.sparse_prefill(q.cpu(), kv.cpu(), indices, 0.05, 512,
                                                                        indexer_topk=5)
    for result in (three, four):
        oracle.assert_attention_close(result[0], result[2], ref_out, ref_lse)
        assert torch.allclose(result[1].double().cpu(), ref_max, atol=1e-4, rtol=0)
    finite = torch.isfinite(ref_lse_indexer)
    assert torch.equal(torch.isfinite(four[3].cpu()), finite)
    assert torch.allclose(four[3].double().cpu()[finite], ref_lse_indexer[finite], atol=1e-4, rtol=0)


@pytest.mark.parametrize("cuda_build", [False, True])
def test_flashmla_api_compiles_with_a_shared_sched_meta(monkeypatch, cuda_build):
    """The FlashMLA calling pattern (one get_mla_metadata object, several calls) traces with fullgraph=True, also on a
    CUDA build of torch, where the API asks whether a CUDA graph is being captured: dynamo cannot trace that query
    (here a graph break stands in for it), so it must not be asked while compiling (it was, and fullgraph failed)."""
    import flashmla_ops

    if cuda_build:
        from flashmla_ops import interface

        monkeypatch.setattr(interface, "_capturing", lambda: torch._dynamo.graph_break() or False)

    q = torch.randn(2, 1, 16, 576).bfloat16()
    cache = torch.randn(4, 64, 1, 576).bfloat16()
    block_table = torch.arange(4, dtype=torch.int32).view(2, 2)
    cache_seqlens = torch.tensor([70, 5], dtype=torch.int32)

    def two_layers(q, cache, block_table, cache_seqlens):
        sched_meta, _ = flashmla_ops.get_mla_metadata()
        first = flashmla_ops.flash_mla_with_kvcache(q, cache, block_table, cache_seqlens, 512, sched_meta)[0]
        return flashmla_ops.flash_mla_with_kvcache(first.repeat(1, 1, 1, 2)[..., :576].contiguous(), cache,
                                                   block_table, cache_seqlens, 512, sched_meta)

    torch._dynamo.reset()
    compiled = torch.compile(two_layers, fullgraph=True)
    for got, want in zip(compiled(q, cache, block_table, cache_seqlens), two_layers(q, cache, block_table,
                                                                                     cache_seqlens)):
        assert torch.equal(got, want)


def test_flashmla_api_compiles_with_a_symbolic_scale():
    """With dynamic=True d_qk is symbolic, so the default scale d_qk ** -0.5 is too; and a float argument that changes
    between calls becomes symbolic when the call recompiles (automatic dynamic). The API's check of the scale called
    math.isfinite on it, which dynamo cannot trace: fullgraph failed. Both now compile and equal eager."""
    import flashmla_ops

    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 4, 576, generator=generator).bfloat16()
    cache = torch.randn(4, 64, 1, 576, generator=generator).bfloat16()
    block_table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    cache_seqlens = torch.tensor([70, 5], dtype=torch.int32)

    def decode(q, cache, block_table, cache_seqlens):
        sched_meta, _ = flashmla_ops.get_mla_metadata()
        return flashmla_ops.flash_mla_with_kvcache(q, cache, block_table, cache_seqlens, 512, sched_meta, causal=True)

    torch._dynamo.reset()
    compiled = torch.compile(decode, fullgraph=True, dynamic=True)
    args = (q, cache, block_table, cache_seqlens)
    assert all(torch.equal(got, want) for got, want in zip(compiled(*args), decode(*args)))

    def prefill(q, kv, indices, sm_scale):
        return flashmla_ops.flash_mla_sparse_fwd(q, kv, indices, sm_scale)

    prefill_args = (torch.randn(5, 4, 576, generator=generator).bfloat16(),
                    torch.randn(7, 1, 576, generator=generator).bfloat16(),
                    torch.randint(-1, 10, (5, 1, 8), dtype=torch.int32, generator=generator))
    torch._dynamo.reset()
    compiled = torch.compile(prefill, fullgraph=True)
    for sm_scale in (0.05, 0.06, 0.2):
        got, want = compiled(*prefill_args, sm_scale), prefill(*prefill_args, sm_scale)
        assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_sparse_sched_meta_checks_once_and_computes_no_split(monkeypatch):
    """Sparse decode: the API's checks run once for every layer's new indices of one shape, and no split is computed
    (none of the sparse kernels takes one; it was computed for nothing)."""
    import flashmla_ops
    from flashmla_ops import interface

    monkeypatch.setattr(interface, "num_sm_parts", lambda device, s_q, h_q: 4)
    q = torch.randn(2, 1, 16, 576).bfloat16()
    cache = torch.randn(4, 64, 1, 576).bfloat16()
    sched_meta, _ = flashmla_ops.get_mla_metadata()
    checks = []
    monkeypatch.setattr(interface, "_check_sparse", lambda *args: checks.append(args[0]))
    splits = []
    monkeypatch.setattr(torch.ops.flashmla, "get_mla_metadata", lambda *args: splits.append(args))
    for _ in range(3):  # layers
        indices = torch.randint(0, 256, (2, 1, 32), dtype=torch.int32)
        flashmla_ops.flash_mla_with_kvcache(q, cache, None, None, 512, sched_meta, indices=indices)
    # the API's checks once for the shapes; no split at all: the sparse kernels take none
    assert checks == ["flash_mla_with_kvcache"] and splits == []
    assert sched_meta.tile_scheduler_metadata is None and sched_meta.num_splits is None


def test_a_write_that_does_not_move_the_version_is_seen_where_values_are_checked():
    """Lengths written without moving the tensor's version (through .data here; on a GPU a kernel of one's own): on
    CPU tensors (and with FLASHMLA_CHECK=1 on a GPU) the reuse compares the values and recomputes the schedule (it
    was reused stale, which the op's own metadata check then refused)."""
    import flashmla_ops

    q = torch.randn(2, 1, 16, 576).bfloat16()
    cache = torch.randn(8, 64, 1, 576).bfloat16()
    block_table = torch.arange(8, dtype=torch.int32).view(2, 4)
    cache_seqlens = torch.tensor([70, 5], dtype=torch.int32)
    sched_meta, _ = flashmla_ops.get_mla_metadata()
    flashmla_ops.flash_mla_with_kvcache(q, cache, block_table, cache_seqlens, 512, sched_meta)
    version = cache_seqlens._version
    cache_seqlens.data.copy_(torch.tensor([200, 130], dtype=torch.int32))
    assert cache_seqlens._version == version
    out, lse = flashmla_ops.flash_mla_with_kvcache(q, cache, block_table, cache_seqlens, 512, sched_meta)
    want = torch.ops.flashmla.get_mla_metadata(cache_seqlens, sched_meta.tile_scheduler_metadata.shape[0])
    assert torch.equal(sched_meta.tile_scheduler_metadata, want[0]) and torch.equal(sched_meta.num_splits, want[1])
    fresh, _ = flashmla_ops.get_mla_metadata()
    assert torch.equal(lse, flashmla_ops.flash_mla_with_kvcache(q, cache, block_table, cache_seqlens, 512, fresh)[1])


def test_the_schedule_is_computed_only_where_the_dense_kernel_reads_it(monkeypatch):
    """On a GPU the Triton kernels and the reference split by shape alone: the API computes no schedule for them (the
    reference's split is ~95 small kernels). The CUDA kernel gets one; CPU tensors too (their values are checked)."""
    paths = {"cuda": ("cuda", "triton"), "triton": ("triton",), "reference": ()}
    for taken, reads in (("cuda", True), ("triton", False), ("reference", False)):
        monkeypatch.setattr(interface._ext, "paths", lambda op, device: paths[taken] if op == "dense_decode" else ())
        assert interface.dense_kernel_reads_schedule(torch.device("cuda")) is reads, taken
        assert interface.dense_kernel_reads_schedule(torch.device("cpu"))


def test_the_schedule_question_is_asked_after_the_checks():
    """A schedule decided per call (`dense_call_reads_schedule`: which path these arguments take) is asked once the
    API's checks passed, and a False leaves the metadata None."""
    sched_meta = interface.FlashMLASchedMeta()
    lengths = torch.tensor([70, 5], dtype=torch.int32)
    for reads in (False, True):
        order = []
        def check():
            order.append("check")

        def schedule():
            order.append("schedule")
            return reads

        sched_meta.fill(lambda: lengths, None, ("dense", 1, 16, 2, reads), check=check, schedule=schedule)
        assert order == ["check", "schedule"]
        assert (sched_meta.tile_scheduler_metadata is not None) is reads
        assert (sched_meta.num_splits is not None) is reads


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_no_schedule_for_a_call_the_cuda_kernel_declines():
    """On Hopper a q whose rows are not 16-byte aligned goes to a path that splits by shape: no schedule computed;
    the same q made contiguous gets one."""
    if not ON_HOPPER:
        pytest.skip("needs the CUDA dense decode kernel (sm_90)")
    assert "cuda" in interface._ext.paths("dense_decode", torch.device("cuda"))  # asked here: it builds csrc/
    q, cache, flat_keys, block_table, cache_seqlens = dense_case([300, 20, 129], device="cuda")
    unaligned = torch.empty(*q.shape[:-1], q.shape[-1] + 1, dtype=q.dtype, device="cuda")[..., 1:]
    unaligned.copy_(q)
    assert interface.decode.dense_decode_path(unaligned, cache, 512, False) != "cuda"
    want = oracle.dense_decode(q.cpu(), flat_keys, block_table.cpu(), cache_seqlens.cpu(), oracle.D_QK ** -0.5, 512,
                               False)
    for query in (unaligned, q):
        sched_meta, _ = flashmla_ops.get_mla_metadata()
        out, lse = flashmla_ops.flash_mla_with_kvcache(query, cache, block_table, cache_seqlens, 512, sched_meta)
        assert (sched_meta.tile_scheduler_metadata is None) is (query is unaligned)
        oracle.assert_attention_close(out, lse, *want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_no_schedule_for_the_triton_dense_decode(monkeypatch):
    monkeypatch.setenv("FLASHMLA_BACKEND", "triton")
    q, cache, flat_keys, block_table, cache_seqlens = dense_case([300, 20, 129], device="cuda")
    assert interface.decode.dense_decode_path(q, cache, 512, False) == "triton"
    sched_meta, _ = flashmla_ops.get_mla_metadata()
    out, lse = flashmla_ops.flash_mla_with_kvcache(q, cache, block_table, cache_seqlens, 512, sched_meta)
    assert sched_meta.tile_scheduler_metadata is None and sched_meta.num_splits is None
    want = flashmla_ops.flash_mla_with_kvcache(q, cache, block_table, cache_seqlens, 512, None)
    assert torch.equal(out, want[0]) and torch.equal(lse, want[1])
    oracle.assert_attention_close(out, lse, *oracle.dense_decode(q.cpu(), flat_keys, block_table.cpu(),
                                                                  cache_seqlens.cpu(), oracle.D_QK ** -0.5, 512, False))
