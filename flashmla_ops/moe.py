"""Routed experts for a few tokens (decode at small batch): the chosen experts' SwiGLU, mixed by the router weights.

    h[t, k]  = silu(gate[e] x[t]) * (up[e] x[t])           e = experts[t, k]; gate / up: the halves of gate_up_proj[e]
    out[t]   = sum_k weights[t, k] * down[e] h[t, k]       (k in order, float32)

A choice whose expert is outside `[0, E)` (another rank's, under expert parallelism) contributes nothing. For one
token the model's grouped-GEMM path spends about ten small kernels per layer on sorting and group offsets, and its
GEMM tiles are mostly padding; the Triton path here is two GEMV kernels that read each chosen expert's weights once
per choice (`flashmla_ops/triton/moe.py`): on the H200, one V2-Lite layer in 57 us against 93
(docs/bench/moe_few_tokens_h200.log). Past a few tokens the grouped GEMM reads each expert once for all its tokens and
wins. The model calls this op for up to `FEW_TOKENS` tokens: batch-1 decode, which compiles to a graph of its own
anyway (a larger bound would add one more graph for the batch sizes under it).
"""
import torch
import torch.nn.functional as F

from . import _ext
from ._checks import FLOAT_DTYPES, check_same_device, check_tensor

FEW_TOKENS = 1  # tokens up to which the model takes this op
EXPERT_DTYPES = (torch.int32, torch.int64)  # the router's top-k indices are int64


def _check(op, x, gate_up_proj, down_proj, weights, experts):
    dims = {}
    check_tensor(op, "x", x, FLOAT_DTYPES, ("tokens", "hidden"), dims)
    check_tensor(op, "gate_up_proj", gate_up_proj, (x.dtype,), ("num_experts", "two_inter", "hidden"), dims,
                 dtype_from="x")
    check_tensor(op, "down_proj", down_proj, (x.dtype,), ("num_experts", "hidden", "inter"), dims, dtype_from="x")
    if dims["two_inter"] != 2 * dims["inter"]:
        raise ValueError(f"{op}: gate_up_proj must be (num_experts, 2 * inter, hidden) with down_proj's inter="
                         f"{dims['inter']}, got {tuple(gate_up_proj.shape)}")
    check_tensor(op, "weights", weights, (torch.float32,), ("tokens", "top_k"), dims)
    check_tensor(op, "experts", experts, EXPERT_DTYPES, ("tokens", "top_k"), dims)
    check_same_device(op, x=x, gate_up_proj=gate_up_proj, down_proj=down_proj, weights=weights, experts=experts)


def routed_experts_reference(x, gate_up_proj, down_proj, weights, experts):
    num_experts, inter = down_proj.shape[0], down_proj.shape[2]
    if num_experts == 0:  # a rank that holds no expert: nothing to gather
        return torch.zeros(x.shape, dtype=x.dtype, device=x.device)  # contiguous, whatever x's strides
    held = (experts >= 0) & (experts < num_experts)
    chosen = experts.long().clamp(0, num_experts - 1)
    gate_up = torch.einsum("tkoh,th->tko", gate_up_proj[chosen].float(), x.float())
    h = F.silu(gate_up[..., :inter]) * gate_up[..., inter:]
    down = torch.einsum("tkhi,tki->tkh", down_proj[chosen].float(), h)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for k in range(experts.shape[1]):  # in order: the sum is the same in every path
        out += torch.where(held[:, k, None], weights[:, k, None] * down[:, k], 0)
    return out.to(x.dtype)


@torch.library.custom_op("flashmla::routed_experts", mutates_args=())
def routed_experts(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, weights: torch.Tensor,
                   experts: torch.Tensor) -> torch.Tensor:
    """The routed experts' output for a few tokens.

    x `(tokens, hidden)`; gate_up_proj `(num_experts, 2 * inter, hidden)` (each expert's gate rows, then its up rows)
    and down_proj `(num_experts, hidden, inter)`, in x's dtype; weights `(tokens, top_k)` float32 and experts
    `(tokens, top_k)` int32/int64 from the router (an expert outside `[0, num_experts)` counts as not chosen).
    Returns `(tokens, hidden)` in x's dtype.
    """
    _check("routed_experts", x, gate_up_proj, down_proj, weights, experts)
    if _ext.backend("routed_experts", x.device) == "triton":
        from .triton import moe as triton_moe

        if triton_moe.supports(x, gate_up_proj, down_proj):
            return triton_moe.routed_experts(x, gate_up_proj, down_proj, weights, experts)
    _ext.reference_fallback("routed_experts", x.device)
    return routed_experts_reference(x, gate_up_proj, down_proj, weights, experts)


@routed_experts.register_fake
def _(x, gate_up_proj, down_proj, weights, experts):
    _check("routed_experts", x, gate_up_proj, down_proj, weights, experts)
    return x.new_empty(x.shape)  # contiguous like every path's output (empty_like kept a transposed x's strides)
