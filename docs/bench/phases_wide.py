"""Phase clocks of the wide decode kernel (csrc/dense_decode.cu) over the FP8 and BF16 caches at b128 h128 4k and
b64 h64 4k (stop 67: the FP8 cache takes 1.74x the BF16 time at 128 rows, 1.17x at 64): runs each shape three times
(warm) on a FLASHMLA_PHASES build, and the launcher prints, after the third, the cycles per block of each phase for
the first two CTAs' warpgroups (`attend_piece`'s phases for the FP8 cache, `attend_pairs`' for BF16: listed above
each `PhaseClock clock`). From the repository root on a Hopper GPU:

    FLASHMLA_EXTRA_CUDA_FLAGS=-DFLASHMLA_PHASES PYTHONPATH=$PWD:$PWD/scripts python docs/bench/phases_wide.py
"""
import sys

import torch

import flashmla_ops  # noqa: F401 (registers the ops)
from bench_decode import D_QK, KV_LORA_RANK, make_inputs

device = torch.device("cuda")
for name, batch, s_q, h_q, seqlen, fp8 in [
    ("wide fp8 b128 h128 4k", 128, 1, 128, 4096, True),
    ("wide bf16 b128 h128 4k", 128, 1, 128, 4096, False),
    ("wide fp8 b64 h64 4k", 64, 1, 64, 4096, True),
    ("wide bf16 b64 h64 4k", 64, 1, 64, 4096, False),
]:
    sets, lengths = make_inputs(batch, s_q, h_q, [seqlen] * batch, fp8, device, 1)
    q, cache, table = sets[0]
    for rep in range(3):
        torch.cuda.synchronize()
        if rep == 2:
            print("==", name, flush=True)
        torch.ops.flashmla.dense_decode(q, cache, table, lengths, None, None, KV_LORA_RANK, D_QK ** -0.5, False, fp8,
                                        None)
        torch.cuda.synchronize()
        sys.stdout.flush()
