"""Phase clocks of the narrow decode kernel (csrc/dense_decode_narrow.cu) at the fp8 and bf16 b128 h16 16k rows: runs
each shape three times (warm) on a FLASHMLA_PHASES build, and the launcher prints, after the third, the cycles per own
block of each phase for the first two CTAs' warpgroups (the phases are listed above the kernel's `PhaseClock clock`).
From the repository root on a Hopper GPU (stop 32's bench/phases32.py, the FP8 unit loop's wgmma waits apart since
stop 33: phase 8):

    FLASHMLA_EXTRA_CUDA_FLAGS=-DFLASHMLA_PHASES PYTHONPATH=$PWD:$PWD/scripts python docs/bench/phases_narrow.py
"""
import sys

import torch

import flashmla_ops  # noqa: F401 (registers the ops)
from bench_decode import D_QK, KV_LORA_RANK, make_inputs

SHAPES = [  # (name, batch, s_q, h_q, seqlen, FP8 cache)
    ("narrow fp8 b128 h16 16k", 128, 1, 16, 16384, True),
    ("narrow bf16 b128 h16 16k", 128, 1, 16, 16384, False),
]


def run_phases(shapes) -> None:
    """Each shape's decode three times (warm); a FLASHMLA_PHASES build's launcher prints the phases after the third."""
    device = torch.device("cuda")
    for name, batch, s_q, h_q, seqlen, fp8 in shapes:
        sets, lengths = make_inputs(batch, s_q, h_q, [seqlen] * batch, fp8, device, 1)
        q, cache, table = sets[0]
        for rep in range(3):
            torch.cuda.synchronize()
            if rep == 2:
                print("==", name, flush=True)
            torch.ops.flashmla.dense_decode(q, cache, table, lengths, None, None, KV_LORA_RANK, D_QK ** -0.5, False,
                                            fp8, None)
            torch.cuda.synchronize()
            sys.stdout.flush()


if __name__ == "__main__":
    run_phases(SHAPES)
