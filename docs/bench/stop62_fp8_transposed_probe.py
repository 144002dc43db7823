"""Stop 62: does the Triton FP8 dense decode of 16 heads get faster with its products transposed? Stop 61 found the
row (fp8 b128 h16 16k) bound by shared memory: every warp reads q's 16 x 576 from shared memory at each step, as the
A operand of the logits' mma.sync (`docs/HISTORY.md`, stop 61). Transposed, the logits are K q^T (the keys the A
operand, q^T the B operand) and P V is acc^T += K^T P^T, so the 512 x 16 accumulators are M x N.
Two stripped kernels, neither paged nor masked (each program reads its own `L` contiguous 656-byte rows and its
own 16 x 576 q; f16 products on hardware e4m3 conversion, the tile scales multiplied through the products as the
shipped kernel does; the RoPE columns too go to f16, exactly for these values, so that the kernels also check under
the CPU interpreter, which mis-multiplies bf16): `direct` (the shipped kernel's products: q K^T, P V) and
`transposed`. Each is checked against a float64 reference first, then timed (CUDA-graph replays,
bench_decode.time_ms) at the SPEC row's shape: 256 programs (b128 x two splits) of 8192 tokens; with the shipped
op on the row itself for scale.
`python docs/bench/stop62_fp8_transposed_probe.py` from the repository root, PYTHONPATH=$PWD:$PWD/scripts.
"""
import sys

import torch
import triton
import triton.language as tl

import bench_decode
from bench_decode import D_QK, KV_LORA_RANK, make_inputs, time_ms

ROW_BYTES, TILE, ROPE = 656, 128, 64


@triton.jit
def _transposed_kernel(Q, KV, Out, L, sm_scale_log2, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr):
    TILE: tl.constexpr = 128
    pid = tl.program_id(0).to(tl.int64)
    Q += pid * BLOCK_H * 576
    KV += pid * L * 656
    Out += pid * BLOCK_H * 512
    heads = tl.arange(0, BLOCK_H)
    d = tl.arange(0, TILE)
    r = tl.arange(0, 64)
    q0 = tl.load(Q + heads[None, :] * 576 + 0 * TILE + d[:, None]).to(tl.float16)
    q1 = tl.load(Q + heads[None, :] * 576 + 1 * TILE + d[:, None]).to(tl.float16)
    q2 = tl.load(Q + heads[None, :] * 576 + 2 * TILE + d[:, None]).to(tl.float16)
    q3 = tl.load(Q + heads[None, :] * 576 + 3 * TILE + d[:, None]).to(tl.float16)
    qr = tl.load(Q + heads[None, :] * 576 + 512 + r[:, None]).to(tl.float16)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc0 = tl.zeros([TILE, BLOCK_H], dtype=tl.float32)
    acc1 = tl.zeros([TILE, BLOCK_H], dtype=tl.float32)
    acc2 = tl.zeros([TILE, BLOCK_H], dtype=tl.float32)
    acc3 = tl.zeros([TILE, BLOCK_H], dtype=tl.float32)
    for start in range(0, L, BLOCK_N):
        row = (start + tl.arange(0, BLOCK_N)).to(tl.int64) * 656
        k0 = tl.load(KV + row[:, None] + 0 * TILE + d[None, :]).to(tl.float8e4nv, bitcast=True).to(tl.float16)
        k1 = tl.load(KV + row[:, None] + 1 * TILE + d[None, :]).to(tl.float8e4nv, bitcast=True).to(tl.float16)
        k2 = tl.load(KV + row[:, None] + 2 * TILE + d[None, :]).to(tl.float8e4nv, bitcast=True).to(tl.float16)
        k3 = tl.load(KV + row[:, None] + 3 * TILE + d[None, :]).to(tl.float8e4nv, bitcast=True).to(tl.float16)
        scale_ptr = (KV + row + 512).to(tl.pointer_type(tl.float32), bitcast=True)
        s0 = tl.load(scale_ptr)
        s1 = tl.load(scale_ptr + 1)
        s2 = tl.load(scale_ptr + 2)
        s3 = tl.load(scale_ptr + 3)
        rope_ptr = (KV + row + 528).to(tl.pointer_type(tl.bfloat16), bitcast=True)
        rope = tl.load(rope_ptr[:, None] + r[None, :]).to(tl.float16)  # exact (bf16 normal values)
        s = tl.dot(rope, qr)
        s += (tl.dot(k0, q0) * s0[:, None] + tl.dot(k1, q1) * s1[:, None] + tl.dot(k2, q2) * s2[:, None]
              + tl.dot(k3, q3) * s3[:, None])
        s = s * sm_scale_log2
        m_new = tl.maximum(m_i, tl.max(s, 0))
        p = tl.exp2(s - m_new[None, :])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc0 = acc0 * alpha[None, :] + tl.dot(tl.trans(k0), (p * s0[:, None]).to(tl.float16))
        acc1 = acc1 * alpha[None, :] + tl.dot(tl.trans(k1), (p * s1[:, None]).to(tl.float16))
        acc2 = acc2 * alpha[None, :] + tl.dot(tl.trans(k2), (p * s2[:, None]).to(tl.float16))
        acc3 = acc3 * alpha[None, :] + tl.dot(tl.trans(k3), (p * s3[:, None]).to(tl.float16))
        m_i = m_new
    out = Out + heads[None, :] * 512 + d[:, None]
    tl.store(out + 0 * TILE, acc0 / l_i[None, :])
    tl.store(out + 1 * TILE, acc1 / l_i[None, :])
    tl.store(out + 2 * TILE, acc2 / l_i[None, :])
    tl.store(out + 3 * TILE, acc3 / l_i[None, :])


@triton.jit
def _direct_kernel(Q, KV, Out, L, sm_scale_log2, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr):
    TILE: tl.constexpr = 128
    pid = tl.program_id(0).to(tl.int64)
    Q += pid * BLOCK_H * 576
    KV += pid * L * 656
    Out += pid * BLOCK_H * 512
    heads = tl.arange(0, BLOCK_H)
    d = tl.arange(0, TILE)
    r = tl.arange(0, 64)
    q0 = tl.load(Q + heads[:, None] * 576 + 0 * TILE + d[None, :]).to(tl.float16)
    q1 = tl.load(Q + heads[:, None] * 576 + 1 * TILE + d[None, :]).to(tl.float16)
    q2 = tl.load(Q + heads[:, None] * 576 + 2 * TILE + d[None, :]).to(tl.float16)
    q3 = tl.load(Q + heads[:, None] * 576 + 3 * TILE + d[None, :]).to(tl.float16)
    qr = tl.load(Q + heads[:, None] * 576 + 512 + r[None, :]).to(tl.float16)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_H, TILE], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_H, TILE], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_H, TILE], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_H, TILE], dtype=tl.float32)
    for start in range(0, L, BLOCK_N):
        row = (start + tl.arange(0, BLOCK_N)).to(tl.int64) * 656
        k0 = tl.load(KV + row[:, None] + 0 * TILE + d[None, :]).to(tl.float8e4nv, bitcast=True).to(tl.float16)
        k1 = tl.load(KV + row[:, None] + 1 * TILE + d[None, :]).to(tl.float8e4nv, bitcast=True).to(tl.float16)
        k2 = tl.load(KV + row[:, None] + 2 * TILE + d[None, :]).to(tl.float8e4nv, bitcast=True).to(tl.float16)
        k3 = tl.load(KV + row[:, None] + 3 * TILE + d[None, :]).to(tl.float8e4nv, bitcast=True).to(tl.float16)
        scale_ptr = (KV + row + 512).to(tl.pointer_type(tl.float32), bitcast=True)
        s0 = tl.load(scale_ptr)
        s1 = tl.load(scale_ptr + 1)
        s2 = tl.load(scale_ptr + 2)
        s3 = tl.load(scale_ptr + 3)
        rope_ptr = (KV + row + 528).to(tl.pointer_type(tl.bfloat16), bitcast=True)
        rope = tl.load(rope_ptr[:, None] + r[None, :]).to(tl.float16)  # exact (bf16 normal values)
        s = tl.dot(qr, tl.trans(rope))
        s += (tl.dot(q0, tl.trans(k0)) * s0[None, :] + tl.dot(q1, tl.trans(k1)) * s1[None, :]
              + tl.dot(q2, tl.trans(k2)) * s2[None, :] + tl.dot(q3, tl.trans(k3)) * s3[None, :])
        s = s * sm_scale_log2
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc0 = acc0 * alpha[:, None] + tl.dot((p * s0[None, :]).to(tl.float16), k0)
        acc1 = acc1 * alpha[:, None] + tl.dot((p * s1[None, :]).to(tl.float16), k1)
        acc2 = acc2 * alpha[:, None] + tl.dot((p * s2[None, :]).to(tl.float16), k2)
        acc3 = acc3 * alpha[:, None] + tl.dot((p * s3[None, :]).to(tl.float16), k3)
        m_i = m_new
    out = Out + heads[:, None] * 512 + d[None, :]
    tl.store(out + 0 * TILE, acc0 / l_i[:, None])
    tl.store(out + 1 * TILE, acc1 / l_i[:, None])
    tl.store(out + 2 * TILE, acc2 / l_i[:, None])
    tl.store(out + 3 * TILE, acc3 / l_i[:, None])


KERNELS = {"direct": _direct_kernel, "transposed": _transposed_kernel}
# (kernel, tokens a step, warps, stages): the shipped default's shape first
CONFIGS = [("direct", 32, 4, 3), ("transposed", 32, 4, 3), ("transposed", 32, 4, 2), ("transposed", 64, 4, 2),
           ("transposed", 64, 8, 2), ("direct", 64, 8, 2)]


def make_probe_inputs(programs, length, device):
    """q (programs, 16, 576) bf16, rows scaled into f16's range; the programs' cache rows (programs * length, 656
    bytes): e4m3 latents, float32 tile scales (powers of two times [0.5, 1)), bf16 RoPE columns."""
    q = (torch.randn(programs, 16, D_QK, device=device) * 0.5).to(torch.bfloat16)
    rows = programs * length
    kv = torch.empty(rows, ROW_BYTES, dtype=torch.uint8, device=device)
    latent = (torch.randn(rows, KV_LORA_RANK, device=device) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    kv[:, :KV_LORA_RANK] = latent.view(torch.uint8)
    scales = torch.rand(rows, 4, device=device) * 0.5 / 100 + 0.5 / 100
    kv[:, KV_LORA_RANK:KV_LORA_RANK + 16] = scales.contiguous().view(torch.uint8)
    rope = torch.randn(rows, ROPE, device=device).to(torch.bfloat16)
    kv[:, KV_LORA_RANK + 16:] = rope.contiguous().view(torch.uint8)
    return q, kv


def reference(q, kv, programs, length, sm_scale):
    """float64 attention of each program's 16 heads over its rows."""
    latent = kv[:, :KV_LORA_RANK].contiguous().view(torch.float8_e4m3fn).double()
    scales = kv[:, KV_LORA_RANK:KV_LORA_RANK + 16].contiguous().view(torch.float32).double()
    latent = (latent.view(-1, 4, TILE) * scales[:, :, None]).view(-1, KV_LORA_RANK)
    rope = kv[:, KV_LORA_RANK + 16:].contiguous().view(torch.bfloat16).double()
    keys = torch.cat([latent, rope], 1).view(programs, length, D_QK)
    q64 = q.double()
    q64[..., :KV_LORA_RANK] = q64[..., :KV_LORA_RANK].half().double()  # the kernels' f16 q latent
    weights = torch.softmax(q64 @ keys.transpose(1, 2) * sm_scale, -1)
    return weights @ keys[..., :KV_LORA_RANK]


def launch(name, block_n, warps, stages, q, kv, out, length, sm_scale):
    KERNELS[name][(q.shape[0],)](q, kv, out, length, sm_scale * 1.4426950408889634, BLOCK_H=16,
                                 BLOCK_N=block_n, num_warps=warps, num_stages=stages)


def main():
    torch.manual_seed(0)
    device = torch.device("cuda")
    sm_scale = D_QK ** -0.5
    bench_decode.SETTLE_S = 2.0
    q, kv = make_probe_inputs(4, 448, device)
    want = reference(q, kv, 4, 448, sm_scale)
    for config in CONFIGS:
        out = torch.full((4, 16, KV_LORA_RANK), float("nan"), device=device)
        launch(*config, q, kv, out, 448, sm_scale)
        err = ((out.double() - want).abs().max() / want.abs().max()).item()
        print(f"{config}: error {err:.2e}", flush=True)
    programs, length = 256, 8192
    sets = []
    for _ in range(2):
        q, kv = make_probe_inputs(programs, length, device)
        sets.append((q, kv, torch.empty(programs, 16, KV_LORA_RANK, device=device)))
    for round_ in range(2):
        for config in CONFIGS if round_ == 0 else CONFIGS[::-1]:
            us = time_ms(lambda q, kv, out: launch(*config, q, kv, out, length, sm_scale), sets) * 1e3
            gbs = programs * length * ROW_BYTES / us / 1e3
            print(f"{config}: {us:8.1f} us {gbs:7.0f} GB/s{bench_decode.clock_note(bench_decode.LAST_CLOCK)}",
                  flush=True)
    del sets
    torch.cuda.empty_cache()
    from flashmla_ops.triton import decode as triton_decode
    op_sets, seqlens = make_inputs(128, 1, 16, [16384] * 128, True, device, copies=2)
    us = time_ms(lambda qq, cache, table: triton_decode.dense_decode(
        qq, cache, table, seqlens, KV_LORA_RANK, sm_scale, False, True), op_sets) * 1e3
    print(f"shipped op, fp8 b128 h16 16k: {us:8.1f} us", flush=True)


if __name__ == "__main__":
    sys.exit(main())
