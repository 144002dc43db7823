"""The few-token routed-experts op (flashmla_ops/moe.py): its reference against a per-choice float32 loop, the Triton
kernels against the reference (on the CPU under Triton's interpreter, and on a GPU: odd sizes, several tokens, experts
this rank does not hold, and DeepSeek-V2-Lite's shapes in a CUDA graph), and its argument checks."""
import pytest
import torch
import torch.nn.functional as F

from flashmla_ops.moe import routed_experts_reference

triton_moe = pytest.importorskip("flashmla_ops.triton.moe", exc_type=ImportError)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ops = torch.ops.flashmla


def make_inputs(tokens, hidden, inter, num_experts, top_k, generator, dtype=torch.bfloat16, device=DEVICE):
    x = torch.randn(tokens, hidden, generator=generator)
    gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=generator) / hidden ** 0.5
    down = torch.randn(num_experts, hidden, inter, generator=generator) / inter ** 0.5
    weights = torch.rand(tokens, top_k, generator=generator)
    # distinct experts per token, and some not held here (num_experts: another rank's; -1)
    experts = torch.stack([torch.randperm(num_experts + 1, generator=generator)[:top_k] for _ in range(tokens)])
    if tokens > 1:
        experts[1, 0] = -1
    return tuple(t.to(device, dtype) for t in (x, gate_up, down)) + (weights.to(device), experts.to(device))


def per_choice_loop(x, gate_up, down, weights, experts):
    """The definition, one (token, choice) at a time in float32."""
    num_experts, inter = down.shape[0], down.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for k in range(experts.shape[1]):
            e = int(experts[t, k])
            if not 0 <= e < num_experts:
                continue
            gate_up_out = F.linear(x[t].float().cpu(), gate_up[e].float().cpu())
            h = F.silu(gate_up_out[:inter]) * gate_up_out[inter:]
            out[t] += float(weights[t, k]) * F.linear(h, down[e].float().cpu())
    return out


def assert_close(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype
    scale = want.float().abs().max().clamp_min(1e-3)
    assert ((got.float() - want.float()).abs() <= 1e-2 * scale).all(), (got.float() - want.float()).abs().max() / scale


def test_reference_matches_the_per_choice_loop():
    generator = torch.Generator().manual_seed(0)
    inputs = make_inputs(3, 40, 24, 5, 3, generator, dtype=torch.float32, device="cpu")
    got = routed_experts_reference(*inputs)
    torch.testing.assert_close(got, per_choice_loop(*inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens,hidden,inter,num_experts,top_k", [
    (1, 40, 24, 5, 3), (2, 300, 100, 7, 4), (3, 72, 520, 4, 2), (1, 513, 17, 3, 3)])
def test_triton_matches_reference(tokens, hidden, inter, num_experts, top_k):
    generator = torch.Generator().manual_seed(tokens * 1000 + hidden)
    inputs = make_inputs(tokens, hidden, inter, num_experts, top_k, generator)
    torch.full((tokens, hidden), float("nan"), dtype=torch.bfloat16, device=DEVICE)  # freed: a poisoned allocation
    got = triton_moe.routed_experts(*inputs)
    assert_close(got, routed_experts_reference(*inputs))
    assert torch.equal(got, triton_moe.routed_experts(*inputs))  # the same sum every run


def test_no_token_and_no_held_expert():
    generator = torch.Generator().manual_seed(1)
    x, gate_up, down, weights, experts = make_inputs(2, 40, 24, 5, 3, generator)
    assert triton_moe.routed_experts(x[:0], gate_up, down, weights[:0], experts[:0]).shape == (0, 40)
    nobody = torch.full_like(experts, 5)
    assert torch.equal(triton_moe.routed_experts(x, gate_up, down, weights, nobody), torch.zeros_like(x))
    # a rank holding no expert at all: the reference (the CPU path) and Triton both give zeros
    for path in (routed_experts_reference, triton_moe.routed_experts):
        assert torch.equal(path(x, gate_up[:0], down[:0], weights, experts), torch.zeros_like(x))


def test_triton_takes_strided_router_outputs_and_int32_experts():
    """The router's weights and experts as column-major views and the experts as int32 (the op's dtypes; the tests
    passed int64 row-major ones only, so dropping the kernel's contiguous() or the op's int32 passed them)."""
    generator = torch.Generator().manual_seed(6)
    x, gate_up, down, weights, experts = make_inputs(3, 40, 24, 5, 3, generator)
    want = routed_experts_reference(x, gate_up, down, weights, experts)
    strided = weights.t().contiguous().t(), experts.int().t().contiguous().t()
    assert_close(triton_moe.routed_experts(x, gate_up, down, *strided), want)
    assert_close(ops.routed_experts(x, gate_up, down, weights, experts.int()), want)


def test_triton_supports_only_rows_of_unit_stride():
    """The kernels stream rows of x, gate_up_proj and down_proj: a column-major one goes to the reference (on the CPU
    every call does, so `supports` returning True for any strides passed every test)."""
    generator = torch.Generator().manual_seed(7)
    x, gate_up, down, _, _ = make_inputs(3, 40, 24, 5, 3, generator)
    assert triton_moe.supports(x, gate_up, down)
    column_major = lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2)  # noqa: E731
    assert not triton_moe.supports(column_major(x), gate_up, down)
    assert not triton_moe.supports(x, column_major(gate_up), down)
    assert not triton_moe.supports(x, gate_up, column_major(down))


def test_op_checks_arguments():
    generator = torch.Generator().manual_seed(2)
    x, gate_up, down, weights, experts = make_inputs(2, 40, 24, 5, 3, generator, device="cpu")
    with pytest.raises(ValueError, match="down_proj must have shape"):
        ops.routed_experts(x, gate_up, down[:, :39], weights, experts)
    with pytest.raises(ValueError, match="gate_up_proj must be"):
        ops.routed_experts(x, gate_up[:, :47], down, weights, experts)
    with pytest.raises(TypeError, match="weights must have dtype float32"):
        ops.routed_experts(x, gate_up, down, weights.bfloat16(), experts)
    with pytest.raises(ValueError, match="experts must have shape"):
        ops.routed_experts(x, gate_up, down, weights, experts[:1])


def test_output_strides_match_the_fake_impl_for_a_transposed_x():
    """Every path returns a contiguous output and the fake impl says so: the fake's torch.empty_like(x) kept a
    column-major x's strides while the reference returned a contiguous tensor, so opcheck's fake-tensor test failed and
    a compiled call raised on the output's strides."""
    generator = torch.Generator().manual_seed(3)
    x, gate_up, down, weights, experts = make_inputs(3, 24, 8, 3, 2, generator, device="cpu")
    x_t = x.t().contiguous().t()  # (tokens, hidden), column-major
    for args in ((x_t, gate_up, down, weights, experts), (x_t, gate_up[:0], down[:0], weights, experts)):
        torch.library.opcheck(ops.routed_experts, args, test_utils=["test_faketensor", "test_aot_dispatch_dynamic"])
    with torch._inductor.config.patch(fx_graph_cache=False):  # not a graph cached with an earlier fake's strides
        compiled = torch.compile(lambda *args: ops.routed_experts(*args) * 2, fullgraph=True)
        got = compiled(x_t, gate_up, down, weights, experts)
    assert torch.equal(got, ops.routed_experts(x, gate_up, down, weights, experts) * 2)


def test_triton_up_rows_past_int32_offsets():
    """An expert's up rows start INTER * stride(1) elements past its gate rows: that product wrapped in int32 at 2**31
    (here 2 rows of inter with a row stride of 2**30: a view into 7 GiB, on the CPU untouched and lazily allocated),
    so the kernel read 2**31 elements before the weights (NaN here; past the allocation a segfault)."""
    hidden, inter, row_stride = 16, 2, 2 ** 30
    try:
        memory = torch.empty(2 ** 31 + (2 * inter - 1) * row_stride + hidden, dtype=torch.bfloat16, device=DEVICE)
    except RuntimeError:  # torch.OutOfMemoryError too
        pytest.skip("cannot reserve 7 GiB")
    generator = torch.Generator().manual_seed(4)
    x, gate_up, down, weights, experts = make_inputs(1, hidden, inter, 1, 1, generator)
    experts.zero_()
    for row in range(inter):  # what the wrapped offset reads in place of the up rows: 2**31 elements before them
        memory[row * row_stride:row * row_stride + hidden] = float("nan")
    strided = memory.as_strided(gate_up.shape, (0, row_stride, 1), 2 ** 31)
    strided.copy_(gate_up)
    got = triton_moe.routed_experts(x, strided, down, weights, experts)
    assert_close(got, routed_experts_reference(x, gate_up, down, weights, experts))


def test_triton_token_rows_past_int32_offsets():
    """x's row offset token * stride(0) wrapped in int32 at 2**31 too (token 2 of rows 2**30 apart, a view into 8 GiB
    as above): that token's x was read 2**31 elements before x."""
    hidden, row_stride = 16, 2 ** 30
    try:
        memory = torch.empty(2 ** 31 + 2 * row_stride + hidden, dtype=torch.bfloat16, device=DEVICE)
    except RuntimeError:
        pytest.skip("cannot reserve 8 GiB")
    generator = torch.Generator().manual_seed(5)
    x, gate_up, down, weights, experts = make_inputs(3, hidden, 2, 2, 1, generator)
    memory[:hidden] = float("nan")  # what the wrapped offset reads in place of token 2's row
    strided = memory.as_strided(x.shape, (row_stride, 1), 2 ** 31)
    strided.copy_(x)
    got = triton_moe.routed_experts(strided, gate_up, down, weights, experts.clamp(0, 1))
    assert_close(got, routed_experts_reference(x, gate_up, down, weights, experts.clamp(0, 1)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tokens", [1, 2])
def test_op_at_v2_lite_shapes_in_a_cuda_graph(reference_runs, tokens):
    generator = torch.Generator().manual_seed(tokens)
    inputs = make_inputs(tokens, 2048, 1408, 64, 6, generator)
    assert ops.routed_experts(*inputs).shape == (tokens, 2048)
    assert reference_runs == []  # the Triton kernel (the reference would capture and replay too)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.routed_experts(*inputs)
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, routed_experts_reference(*inputs))
