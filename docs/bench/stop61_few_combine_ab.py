"""Stop 61: the Triton combine of at most eight splits (decode._combine_few_kernel: a program's LSEs, scales and
partials loaded at once, four rows a program at two splits; "few x16": eight) against _combine_kernel (one row a
program, the LSEs' pass then the partials': decode.COMBINE_FEW_SPLITS 0), on the SPEC rows of two splits: the sparse
FP8 decode b64 h64 and the dense b128 h16 rows. The whole op, then the combine alone on the row's partials (random,
every split written), CUDA-graph replays (bench_decode.time_ms), each side checked against the reference op first;
sides alternate by round (in order, then reversed) in one process.
`python docs/bench/stop61_few_combine_ab.py [--rounds N]` from the repository root, PYTHONPATH=$PWD:$PWD/scripts
(the rows and their rounds are docs/bench/stop60_partials_ab.py's; call 3 ran this script before they moved there).
"""
import argparse
import sys

import torch

import bench_decode
from bench_decode import KV_LORA_RANK, time_ms

from stop60_partials_ab import DENSE_ROWS, dense_row, sparse_row  # the rows of two splits, their A/B rounds

from flashmla_ops.triton import decode as triton_decode

TREE_FEW, TREE_TILE = triton_decode.COMBINE_FEW_SPLITS, triton_decode.COMBINE_FEW_TILE


def side(few_splits=TREE_FEW, tile=TREE_TILE):
    """Sets the most splits the few-splits combine takes (0: none, every combine is _combine_kernel's) and its values
    a column a program (COMBINE_FEW_TILE: rows times splits)."""
    def setup():
        triton_decode.COMBINE_FEW_SPLITS, triton_decode.COMBINE_FEW_TILE = few_splits, tile
    return setup


SIDES = [("few", side()), ("two-pass", side(0)), ("few x16", side(tile=16))]


def combine_alone(name, batch, rows, splits, half, device, rounds):
    """The combine by itself on random partials of `batch` sequences of `rows` rows and `splits` splits."""
    out = torch.empty(batch, 1, rows, KV_LORA_RANK, dtype=torch.bfloat16, device=device)
    lse = torch.empty(batch, rows, 1, device=device)
    sets = []
    for _ in range(2):
        partials = triton_decode.Partials.empty(out, batch, splits, half=half)
        partials.out.normal_()
        partials.lse.normal_()
        partials.scale.fill_(1.0)
        sets.append((partials,))
    times = {label: [] for label, _ in SIDES}
    for round_ in range(rounds):
        for label, setup in SIDES if round_ % 2 == 0 else SIDES[::-1]:
            setup()
            us = time_ms(lambda partials: triton_decode.combine(partials, None, out, lse), sets) * 1e3
            times[label].append(us)
    side()()
    for label, values in times.items():
        print(f"{name + ' combine alone':28} {label:13}: " + ", ".join(f"{v:.1f}" for v in values) + " us",
              flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--settle", type=float, default=3.0)
    args = parser.parse_args()
    bench_decode.SETTLE_S = args.settle
    torch.manual_seed(0)
    device = torch.device("cuda")
    sparse_row(device, args.rounds, SIDES)
    combine_alone("sparse fp8 b64 h64", 64, 64, 2, False, device, args.rounds)
    for row in DENSE_ROWS:
        dense_row(*row, device, args.rounds, SIDES)
        combine_alone(row[0], row[1], row[2] * row[3], 2, False, device, args.rounds)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
