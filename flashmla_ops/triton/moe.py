"""Routed experts for a few tokens in Triton: two GEMV kernels over the chosen experts' weights.

gate_up: one program per (choice, BLOCK_N rows of inter): the rows n of the expert's gate and up halves times
x[token], accumulated in float32 over BLOCK_K columns at a time, then h = silu(gate) * up (float32, to a small buffer).
down: one program per (token, BLOCK_N rows of hidden): for each of the token's choices in order, the expert's down rows
times h, scaled by the router weight and summed in float32; one store, no atomics (the same sum every run).
A choice of an expert this rank does not hold reads nothing and adds nothing. Both kernels stream the weights once
per choice: with one token and V2-Lite's 6 of 64 experts, 104 MB per layer, at 1.8 TB/s on the H200.
"""
import torch
import triton
import triton.language as tl

GATE_UP_BLOCK_N, GATE_UP_BLOCK_K = 16, 256
DOWN_BLOCK_N, DOWN_BLOCK_K = 16, 512


@triton.jit
def _gate_up_kernel(X, W, Experts, H, stride_xt, stride_we, stride_wn, TOP_K, NUM_EXPERTS, INTER, HIDDEN,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    choice = tl.program_id(0)
    token = (choice // TOP_K).to(tl.int64)  # offsets in int64: views of 2**31 elements or more
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    expert = tl.load(Experts + choice + rows * 0).to(tl.int64)  # per row, so that the masks are vectors
    held = (expert >= 0) & (expert < NUM_EXPERTS)
    expert = tl.where(held, expert, 0)
    row_mask = (rows < INTER) & held
    gate_rows = W + expert[:, None] * stride_we + rows.to(tl.int64)[:, None] * stride_wn
    up_rows = W + expert[:, None] * stride_we + (rows + INTER).to(tl.int64)[:, None] * stride_wn  # not INTER * stride
    gate = tl.zeros([BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, HIDDEN, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < HIDDEN
        x = tl.load(X + token * stride_xt + cols, mask=col_mask, other=0.0).to(tl.float32)
        mask = row_mask[:, None] & col_mask[None, :]
        gate += tl.sum(tl.load(gate_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32) * x[None, :], axis=1)
        up += tl.sum(tl.load(up_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32) * x[None, :], axis=1)
    h = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(H + choice.to(tl.int64) * INTER + rows, h, mask=rows < INTER)  # tokens * top_k * inter: int64


@triton.jit
def _down_kernel(H, W, Experts, Weights, Out, stride_we, stride_wn, stride_ot, TOP_K, NUM_EXPERTS, INTER, HIDDEN,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < HIDDEN
    out = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k in range(TOP_K):
        choice = token * TOP_K + k
        expert = tl.load(Experts + choice + rows * 0).to(tl.int64)  # per row, so that the masks are vectors
        held = (expert >= 0) & (expert < NUM_EXPERTS)
        weight = tl.where(held, tl.load(Weights + choice + rows * 0), 0.0)
        down_rows = W + tl.where(held, expert, 0)[:, None] * stride_we + rows.to(tl.int64)[:, None] * stride_wn
        part = tl.zeros([BLOCK_N], dtype=tl.float32)
        for j0 in range(0, INTER, BLOCK_K):
            cols = j0 + tl.arange(0, BLOCK_K)
            col_mask = cols < INTER
            h = tl.load(H + choice * INTER + cols, mask=col_mask, other=0.0)
            mask = (row_mask & held)[:, None] & col_mask[None, :]
            part += tl.sum(tl.load(down_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32) * h[None, :], axis=1)
        out += weight * part
    tl.store(Out + token * stride_ot + rows, out.to(Out.dtype.element_ty), mask=row_mask)


def supports(x, gate_up_proj, down_proj) -> bool:
    """Rows of x and of both weights contiguous (what the kernels stream)."""
    return all(t.stride(-1) == 1 for t in (x, gate_up_proj, down_proj))


def routed_experts(x, gate_up_proj, down_proj, weights, experts):
    tokens, hidden = x.shape
    num_experts, inter = down_proj.shape[0], down_proj.shape[2]
    top_k = experts.shape[1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous, as the fake impl says
    if tokens == 0:
        return out
    experts = experts.contiguous()
    weights = weights.contiguous()
    h = torch.empty(tokens * top_k, inter, dtype=torch.float32, device=x.device)
    _gate_up_kernel[(tokens * top_k, triton.cdiv(inter, GATE_UP_BLOCK_N))](
        x, gate_up_proj, experts, h, x.stride(0), gate_up_proj.stride(0), gate_up_proj.stride(1), top_k, num_experts,
        inter, hidden, BLOCK_N=GATE_UP_BLOCK_N, BLOCK_K=GATE_UP_BLOCK_K)
    _down_kernel[(tokens, triton.cdiv(hidden, DOWN_BLOCK_N))](
        h, down_proj, experts, weights, out, down_proj.stride(0), down_proj.stride(1), out.stride(0), top_k,
        num_experts, inter, hidden, BLOCK_N=DOWN_BLOCK_N, BLOCK_K=DOWN_BLOCK_K)
    return out
