"""Stop 64: the Triton FP8 dense decode of 16 heads with the four latent tiles as the batch of 3-d products. Stop 61
found the row (fp8 b128 h16 16k) bound by shared memory: each of the 4 warps reads q's whole 16 x 576 from shared
memory at each step (the A operand of mma.sync over all 576 columns), and the widened keys go through shared memory
to both products. Here the logits are four products of 128 columns, one per FP8 scale tile, as one batched
`tl.dot` of `(4, 16, 128) x (4, 128, N)`, and P V is `(4, 16, N) x (4, N, 128)`: Triton puts the batch over the
warps, so each warp holds its tile's 16 x 128 of q in registers (32 a thread) and reads only its tile's keys; the
logits' four partial sums meet in one (4, 16, N) -> (16, N) sum. The RoPE columns are four more batched products of
16 columns. Kernels as stop 62's probe (`docs/bench/stop62_fp8_transposed_probe.py`: no paging, no masking; each
program reads its own `L` contiguous 656-byte rows and its own 16 x 576 q), checked against its float64 reference,
then timed against stop 62's `direct` kernel (the shipped kernel's products) and the shipped op on the SPEC row.
`python docs/bench/stop64_fp8_tiles_probe.py` from the repository root, PYTHONPATH=$PWD:$PWD/scripts.
Stop 64 call 1 on the H100 (docs/bench/stop64_call1_tiles_probe.log, us, two rounds): direct 32/4/3 1241.3, 1221.9;
tiles 32/4/3 1297.8, 1280.6; 16/4/3 1211.5, 1212.4; 16/4/4 1213.2, 1213.8; 32/8/2 2037.7, 2037.9 (the shipped op on
the row 948.4). A quarter fewer shared-memory bytes bought at most 1%: not the bound (stop 62's transposed probe
found the same), so not carried into the op.
"""
import os
import sys

import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stop62_fp8_transposed_probe as stop62  # noqa: E402


@triton.jit
def _tiles_kernel(Q, KV, Out, L, sm_scale_log2, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr):
    TILE: tl.constexpr = 128
    pid = tl.program_id(0).to(tl.int64)
    Q += pid * BLOCK_H * 576
    KV += pid * L * 656
    Out += pid * BLOCK_H * 512
    t = tl.arange(0, 4)[:, None, None]
    heads = tl.arange(0, BLOCK_H)[None, :, None]
    d = tl.arange(0, TILE)[None, None, :]
    c = tl.arange(0, 16)[None, None, :]
    q = tl.load(Q + heads * 576 + t * TILE + d).to(tl.float16)  # (4, H, 128): tile t of each head's latent
    qr = tl.load(Q + heads * 576 + 512 + t * 16 + c).to(tl.float16)  # (4, H, 16): the RoPE columns in 4 parts
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([4, BLOCK_H, TILE], dtype=tl.float32)
    tokens = tl.arange(0, BLOCK_N)
    for start in range(0, L, BLOCK_N):
        row = (start + tokens).to(tl.int64) * 656  # (N,)
        raw = tl.load(KV + row[None, :, None] + t * TILE + d)  # (4, N, 128) bytes
        k = raw.to(tl.float8e4nv, bitcast=True).to(tl.float16)
        scale_ptr = (KV + row + 512).to(tl.pointer_type(tl.float32), bitcast=True)
        scales = tl.load(scale_ptr[None, :] + tl.arange(0, 4)[:, None])  # (4, N)
        rope_ptr = (KV + row + 528).to(tl.pointer_type(tl.bfloat16), bitcast=True)
        rope = tl.load(rope_ptr[None, :, None] + t * 16 + c).to(tl.float16)  # (4, N, 16), exact
        parts = tl.dot(q, tl.permute(k, (0, 2, 1))) * scales[:, None, :] + tl.dot(qr, tl.permute(rope, (0, 2, 1)))
        s = tl.sum(parts, 0) * sm_scale_log2  # (H, N)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        weights = (p[None, :, :] * scales[:, None, :]).to(tl.float16)  # (4, H, N)
        acc = acc * alpha[None, :, None] + tl.dot(weights, k)
        m_i = m_new
    tl.store(Out + heads * 512 + t * TILE + d, acc / l_i[None, :, None])


stop62.KERNELS["tiles"] = _tiles_kernel
# (kernel, tokens a step, warps, stages). Compiled here for sm_90 by Triton 3.6 (registers, spilled bytes; the loop's
# shared-memory bytes a warp per 32 tokens, stores + loads): direct 32/4/3 255, 32, 37.5 KB; tiles 32/4/3 255, 224,
# 27.0 KB; 32/4/2 255, 220; 32/8/2 255, 60, 20.9 KB; 16/4/3 228, 0, 31.2 KB (64 tokens at 8 warps spill 868).
CONFIGS = [("direct", 32, 4, 3), ("tiles", 32, 4, 3), ("tiles", 32, 4, 2), ("tiles", 16, 4, 3), ("tiles", 16, 4, 4),
           ("tiles", 32, 8, 2)]


if __name__ == "__main__":
    stop62.CONFIGS = CONFIGS
    sys.exit(stop62.main())
