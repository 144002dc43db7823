"""Phase clocks of the wide decode kernel (csrc/dense_decode.cu) over the FP8 and BF16 caches at b128 h128 4k and
b64 h64 4k (stop 67: the FP8 cache takes 1.74x the BF16 time at 128 rows, 1.17x at 64): runs each shape three times
(warm) on a FLASHMLA_PHASES build, and the launcher prints, after the third, the cycles per block of each phase for
the first two CTAs' warpgroups (`attend_piece`'s phases for the FP8 cache, `attend_pairs`' for BF16: listed above
each `PhaseClock clock`). From the repository root on a Hopper GPU:

    FLASHMLA_EXTRA_CUDA_FLAGS=-DFLASHMLA_PHASES PYTHONPATH=$PWD:$PWD/scripts python docs/bench/phases_wide.py
"""
from phases_narrow import run_phases  # the same runner, over the wide kernel's shapes

SHAPES = [  # (name, batch, s_q, h_q, seqlen, FP8 cache)
    ("wide fp8 b128 h128 4k", 128, 1, 128, 4096, True),
    ("wide bf16 b128 h128 4k", 128, 1, 128, 4096, False),
    ("wide fp8 b64 h64 4k", 64, 1, 64, 4096, True),
    ("wide bf16 b64 h64 4k", 64, 1, 64, 4096, False),
]

if __name__ == "__main__":
    run_phases(SHAPES)
